"""The ``"native"`` backend: CPU entry points to the C++ kernels of :mod:`.native`.

Why native code at all: the kernels read the FP8 weight directly, 1 byte per parameter, and decode is
memory-bound, so that is up to 4x less traffic than an fp32-resident weight. Eager torch has no fast FP8 ->
float conversion (~3-6 ns per element, 20-60x the cost of the matmul it feeds), no CPU built-in takes
128x128 block scales (``torch._scaled_mm`` on CPU accepts tensor- and row-wise scales only), and a
torch.compile'd kernel compiled for seconds per weight shape and process and was still slower than fp32
on AVX2 machines.

Whether these kernels run for a given call is decided in :mod:`.dispatch` (which asks
:func:`native_weight_applies` / :func:`native_applies` here); :func:`native_linear` and
:func:`native_head_matmul` trust that answer and do not check again, because they sit on the per-token path.
Their reference twins are in :mod:`.reference`.
"""

from __future__ import annotations

import torch

from . import native
from .format import FP8_DTYPE, block_dequantize

__all__ = [
    "INPUT_DTYPES",
    "fp8_dequantize",
    "native_applies",
    "native_head_matmul",
    "native_linear",
    "native_weight_applies",
]

#: Activation dtypes the native kernels take.
INPUT_DTYPES = (torch.float32, torch.bfloat16)


def native_weight_applies(weight: torch.Tensor, scale_inv: torch.Tensor, block_size) -> bool:
    """Whether the native kernels can read this weight: CPU tensors, a contiguous 2-D float8_e4m3fn weight, a
    scale grid of the right shape, and the library loaded (built on first use; where it cannot be, one
    warning and False). Cheap enough to run on every call."""
    if not (weight.is_cpu and scale_inv.is_cpu and weight.dtype == FP8_DTYPE and weight.dim() == 2):
        return False
    if scale_inv.dim() != 2 or not weight.is_contiguous():
        return False
    (m, n), (bm, bn) = weight.shape, block_size
    if scale_inv.shape[0] != -(-m // bm) or scale_inv.shape[1] != -(-n // bn):
        return False  # the torch path raises the explanatory error
    return native.available()


def native_applies(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_size) -> bool:
    """:func:`native_weight_applies`, and an input the kernels take (a CPU tensor in :data:`INPUT_DTYPES`)."""
    return x.is_cpu and x.dtype in INPUT_DTYPES and native_weight_applies(weight, scale_inv, block_size)


def _scale(scale_inv: torch.Tensor) -> torch.Tensor:
    if scale_inv.dtype == torch.float32 and scale_inv.is_contiguous():
        return scale_inv
    return scale_inv.float().contiguous()


def native_linear(x2d: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_size) -> torch.Tensor:
    """``x2d [T, N] @ dequant(weight).T`` in ``x2d``'s dtype, for a call :mod:`.dispatch` gave to ``"native"``.
    No autograd: inference only (the weight never requires grad)."""
    return native.linear(x2d, weight, _scale(scale_inv), block_size)


def native_head_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size,
    row_stride: int,
    row_offset: int,
    rows: int,
    transpose: bool,
) -> torch.Tensor:
    """Per-group products with row ranges of one FP8 weight (:func:`.native.head_matmul`), for a call
    :mod:`.dispatch` gave to ``"native"``. No autograd: inference only."""
    return native.head_matmul(x, weight, _scale(scale_inv), block_size, row_stride, row_offset, rows, transpose)


def fp8_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block_size, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight in ``dtype``: bit-identical to :func:`~.format.block_dequantize` (its twin), by the
    native kernel where it can read the weight (~10x faster than eager torch, which converts FP8 at a few ns
    per element). Not a compute backend: the answer is the same either way, so ``fp8_compute`` is not asked."""
    if dtype in INPUT_DTYPES and native_weight_applies(weight, scale_inv, block_size):
        w = native.dequantize(weight, _scale(scale_inv), block_size)  # (M, N) fp32
        return w if dtype == torch.float32 else w.to(dtype)
    return block_dequantize(weight, scale_inv, block_size, dtype)
