"""Everything that speaks torch.distributed: training checkpoints (DCP), pipeline, expert and data parallelism,
the training layouts on paper. The only subpackage that imports ``torch.distributed`` -- model code stays
single-device and is rewritten from here. Importing the package imports none of it (the CLI reads the schedule
vocabulary, :mod:`.schedules`, at start-up): the names below load their module on first use."""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "TrainingCheckpointError": ".checkpoint",
    "latest_checkpoint": ".checkpoint",
    "load_training_state": ".checkpoint",
    "save_training_state": ".checkpoint",
}
__all__ = sorted(_LAZY)


__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
