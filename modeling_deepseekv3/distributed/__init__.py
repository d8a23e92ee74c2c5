"""Everything that speaks torch.distributed: training checkpoints (DCP), pipeline, expert and data parallelism,
the training layouts on paper. The only subpackage that imports ``torch.distributed`` -- model code stays
single-device and is rewritten from here. Importing the package imports none of it (the CLI reads the schedule
vocabulary, :mod:`.schedules`, at start-up): the names below load their module on first use."""

from __future__ import annotations

import importlib

_LAZY = {
    "TrainingCheckpointError": "checkpoint",
    "latest_checkpoint": "checkpoint",
    "load_training_state": "checkpoint",
    "save_training_state": "checkpoint",
}
__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
