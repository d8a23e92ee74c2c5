"""DeepSeek-V3 family models for Hugging Face Transformers, with FP8 weights kept as FP8.

Importing this package registers nothing with transformers; call :func:`register` for the Auto* route.
"""

from .checkpoint import CheckpointError, checkpoint_layout, convert_checkpoint, make_tiny_checkpoint
from .core.cache import LatentCache, StaticLatentCache
from .core.configuration import DeepseekV3Config, DeepseekV3PluginConfig, KimiK2Config
from .fp8 import FP8Linear, block_dequantize, block_quantize
from .integrations.tokenizer import build_tiny_tokenizer, deepseek_v3_tokenizer, load_tokenizer
from .modeling import (
    DeepseekV3ForCausalLM,
    DeepseekV3Model,
    DeepseekV3PreTrainedModel,
    KimiK2ForCausalLM,
    KimiK2Model,
)
from .placement import plan_device_map, plan_placement
from .registration import register
from .training import FP8TrainingRecipe, convert_to_fp8_training

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "DeepseekV3Config",
    "DeepseekV3ForCausalLM",
    "DeepseekV3Model",
    "DeepseekV3PluginConfig",
    "DeepseekV3PreTrainedModel",
    "FP8Linear",
    "FP8TrainingRecipe",
    "KimiK2Config",
    "KimiK2ForCausalLM",
    "KimiK2Model",
    "LatentCache",
    "StaticLatentCache",
    "block_dequantize",
    "block_quantize",
    "build_tiny_tokenizer",
    "checkpoint_layout",
    "convert_checkpoint",
    "convert_to_fp8_training",
    "deepseek_v3_tokenizer",
    "load_tokenizer",
    "make_tiny_checkpoint",
    "plan_device_map",
    "plan_placement",
    "register",
]
