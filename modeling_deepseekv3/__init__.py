"""DeepSeek-V3 family models for Hugging Face Transformers, with FP8 weights kept as FP8.

Importing this package registers nothing with transformers; call :func:`register` for the Auto* route. Nor does
it import torch: each public name loads its module on first use (PEP 562), so ``deepseek-v3 --help`` and the
other light entry points start in well under a second.
"""

# ruff: noqa: F401  (the TYPE_CHECKING block at the end re-exports, for static tools, what __getattr__ loads)
from __future__ import annotations

from typing import TYPE_CHECKING

from ._lazy import lazy_exports

__version__ = "0.1.0"

#: public name -> the module that defines it
_EXPORTS = {
    "CheckpointError": ".checkpoint",
    "checkpoint_layout": ".checkpoint",
    "convert_checkpoint": ".checkpoint",
    "make_tiny_checkpoint": ".checkpoint",
    "LatentCache": ".core.cache",
    "StaticLatentCache": ".core.cache",
    "DeepseekV3Config": ".core.configuration",
    "DeepseekV3PluginConfig": ".core.configuration",
    "KimiK2Config": ".core.configuration",
    "FP8Linear": ".fp8",
    "block_dequantize": ".fp8",
    "block_quantize": ".fp8",
    "build_tiny_tokenizer": ".integrations.tokenizer",
    "deepseek_v3_tokenizer": ".integrations.tokenizer",
    "load_tokenizer": ".integrations.tokenizer",
    "DeepseekV3ForCausalLM": ".modeling",
    "DeepseekV3Model": ".modeling",
    "DeepseekV3PreTrainedModel": ".modeling",
    "KimiK2ForCausalLM": ".modeling",
    "KimiK2Model": ".modeling",
    "plan_device_map": ".placement",
    "plan_placement": ".placement",
    "register": ".registration",
    "FP8TrainingRecipe": ".training",
    "convert_to_fp8_training": ".training",
}
__all__ = sorted(_EXPORTS, key=str.lower)


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)


if TYPE_CHECKING:  # what static tools and IDEs read
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
