"""Block-scaled FP8 (the DeepSeek format), kept as FP8: the format, the linear layer, the CPU kernels."""

from .format import (
    DEFAULT_BLOCK_SIZE,
    FP8_DTYPE,
    FP8_MAX,
    SCALE_FORMATS,
    apply_keeping_dtype,
    block_dequantize,
    block_quantize,
    scale_shape,
)
from .linear import FP8Linear, fp8_linear

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "FP8_DTYPE",
    "FP8_MAX",
    "SCALE_FORMATS",
    "FP8Linear",
    "apply_keeping_dtype",
    "block_dequantize",
    "block_quantize",
    "fp8_linear",
    "scale_shape",
]
