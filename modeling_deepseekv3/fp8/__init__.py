"""Block-scaled FP8 (the DeepSeek format), kept as FP8: the format, the linear layer, the backends and the one
function that picks among them (:func:`~.dispatch.choose_backend`). Imports nothing of the model."""

from .dispatch import FP8_COMPUTE_MODES, FP8BackendError, choose_backend
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
from .linear import FP8Linear, fp8_backends, fp8_linear, fp8_linear_backend, set_fp8_compute

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "FP8_COMPUTE_MODES",
    "FP8_DTYPE",
    "FP8_MAX",
    "SCALE_FORMATS",
    "FP8BackendError",
    "FP8Linear",
    "apply_keeping_dtype",
    "block_dequantize",
    "block_quantize",
    "choose_backend",
    "fp8_backends",
    "fp8_linear",
    "fp8_linear_backend",
    "scale_shape",
    "set_fp8_compute",
]
