"""Official-layout checkpoints: the key table, safetensors checks, load hooks, save, convert, tiny models."""

from .atomic import atomic_directory, publish_directory
from .convert import convert_checkpoint
from .headers import INDEX_NAME, SCALE_SUFFIX, SINGLE_NAME, CheckpointError, TensorInfo, inspect_checkpoint_dir
from .layout import TensorSpec, checkpoint_layout
from .tiny import FP8_QUANTIZATION_CONFIG, TINY_CONFIG, make_tiny_checkpoint

__all__ = [
    "FP8_QUANTIZATION_CONFIG",
    "INDEX_NAME",
    "SCALE_SUFFIX",
    "SINGLE_NAME",
    "TINY_CONFIG",
    "CheckpointError",
    "TensorInfo",
    "TensorSpec",
    "atomic_directory",
    "checkpoint_layout",
    "convert_checkpoint",
    "inspect_checkpoint_dir",
    "make_tiny_checkpoint",
    "publish_directory",
]
