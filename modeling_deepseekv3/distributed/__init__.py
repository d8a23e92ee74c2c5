"""Everything that speaks torch.distributed: training checkpoints (DCP) now; pipeline, expert and data
parallelism as they land. The only subpackage that imports ``torch.distributed`` -- model code stays
single-device and is rewritten from here."""

from .checkpoint import TrainingCheckpointError, latest_checkpoint, load_training_state, save_training_state

__all__ = ["TrainingCheckpointError", "latest_checkpoint", "load_training_state", "save_training_state"]
