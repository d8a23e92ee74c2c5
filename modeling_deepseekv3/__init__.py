"""DeepSeek-V3 family models for Hugging Face Transformers, with FP8 weights kept as FP8.

Importing this package registers nothing with transformers; call :func:`register` for the Auto* route.
"""

from .cache import LatentCache, StaticLatentCache
from .configuration import DeepseekV3Config, DeepseekV3PluginConfig
from .fp8 import FP8Linear, block_dequantize, block_quantize
from .loading import CheckpointError
from .modeling import DeepseekV3ForCausalLM, DeepseekV3Model, DeepseekV3PreTrainedModel
from .conversion import checkpoint_layout, convert_checkpoint, make_tiny_checkpoint

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DeepseekV3Config",
    "DeepseekV3ForCausalLM",
    "DeepseekV3Model",
    "DeepseekV3PluginConfig",
    "DeepseekV3PreTrainedModel",
    "FP8Linear",
    "LatentCache",
    "StaticLatentCache",
    "block_dequantize",
    "block_quantize",
    "checkpoint_layout",
    "convert_checkpoint",
    "make_tiny_checkpoint",
]
