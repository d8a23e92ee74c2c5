"""CPU compute for ``y = x @ dequant(W_fp8, S).T``: the native kernels' entry points, each beside its slow
reference twin.

The fast paths are the C++ kernels of :mod:`.native` (they read the FP8 weight directly, 1 byte per
parameter; decode is memory-bound, so that is up to 4x less traffic than an fp32-resident weight). Eager
torch has no fast FP8 -> float conversion (~3-6 ns per element, 20-60x the cost of the matmul it feeds), no
CPU built-in takes 128x128 block scales (``torch._scaled_mm`` on CPU accepts tensor- and row-wise scales
only), and a torch.compile'd kernel compiled for seconds per weight shape and process and was still
slower than fp32 on AVX2 machines -- hence native code. The entry points here return None wherever the
native kernels do not apply (no compiler, no AVX2, another device or dtype), and callers then take the
dequantize-then-``F.linear`` path, which gives the same answer more slowly.
"""

from __future__ import annotations

import torch

from . import native
from .format import FP8_DTYPE, block_dequantize

__all__ = [
    "fp8_dequantize",
    "fp8_head_matmul",
    "fp8_head_matmul_reference",
    "fp8_matmul",
    "fp8_matmul_reference",
    "native_applies",
]

_INPUT_DTYPES = (torch.float32, torch.bfloat16)


def fp8_matmul_reference(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_size) -> torch.Tensor:
    """``x [T, N] @ dequant(weight [M, N]).T`` computed as in spec §4.3: partial sums over each 128-wide
    K block, each multiplied by its block scale, accumulated in float32. The slow, readable twin of the
    fast kernels (same formula, eager)."""
    bm, bn = block_size
    m, n = weight.shape
    full = (n // bn) * bn
    s_rows = scale_inv.float().repeat_interleave(bm, dim=0)[:m]  # (M, Nb)
    xf = x.float()
    y = xf.new_zeros(x.shape[0], m)
    if full:
        q = weight[:, :full].float().view(m, full // bn, bn)  # (M, Kb, bn)
        part = (q[None] * xf[:, :full].reshape(x.shape[0], 1, full // bn, bn)).sum(-1)  # (T, M, Kb)
        y = (part * s_rows[None, :, : full // bn]).sum(-1)  # (T, M)
    if full < n:  # partial last K block
        tail = (weight[:, full:].float()[None] * xf[:, None, full:]).sum(-1)  # (T, M)
        y = y + tail * s_rows[None, :, -1]
    return y.to(x.dtype)


def fp8_head_matmul_reference(
    x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_size, row_stride: int, row_offset: int,
    rows: int, transpose: bool,
) -> torch.Tensor:
    """Twin of :func:`fp8_head_matmul`: group ``g`` multiplies with ``W_g = dequant(W)[g * row_stride +
    row_offset :][:rows]`` in float32, ``x [G, T, N] @ W_g.T`` or (``transpose``) ``x [G, T, rows] @ W_g``."""
    w = block_dequantize(weight, scale_inv, block_size)  # (M, N) fp32
    starts = torch.arange(x.shape[0]) * row_stride + row_offset
    w_g = w[starts[:, None] + torch.arange(rows)]  # (G, rows, N)
    out = torch.matmul(x.float(), w_g if transpose else w_g.transpose(1, 2))  # (G, T, N) or (G, T, rows)
    return out.to(x.dtype)


def native_applies(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_size) -> bool:
    """Whether the native kernels can compute this product: CPU tensors, float32/bfloat16 input, a
    contiguous float8_e4m3fn weight with a well-shaped scale grid, and the library loaded (built on first
    use; warns once and says False where it cannot be). Cheap: it runs on every FP8 linear call."""
    return x.is_cpu and x.dtype in _INPUT_DTYPES and _weight_applies(weight, scale_inv, block_size)


def _weight_applies(weight: torch.Tensor, scale_inv: torch.Tensor, block_size) -> bool:
    if not (weight.is_cpu and scale_inv.is_cpu and weight.dtype == FP8_DTYPE and weight.dim() == 2):
        return False
    if scale_inv.dim() != 2 or not weight.is_contiguous():
        return False
    (m, n), (bm, bn) = weight.shape, block_size
    if scale_inv.shape[0] != -(-m // bm) or scale_inv.shape[1] != -(-n // bn):
        return False  # the reference path raises the explanatory error
    return native.available()


def _scale(scale_inv: torch.Tensor) -> torch.Tensor:
    if scale_inv.dtype == torch.float32 and scale_inv.is_contiguous():
        return scale_inv
    return scale_inv.float().contiguous()


def fp8_matmul(x2d: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_size) -> torch.Tensor | None:
    """``x2d [T, N] @ dequant(weight).T`` in ``x2d``'s dtype by the native kernel, or None where it does not
    apply (see :func:`native_applies`). No autograd: for inference (the weight never requires grad)."""
    if not native_applies(x2d, weight, scale_inv, block_size):
        return None
    return native.linear(x2d, weight, _scale(scale_inv), block_size)


def fp8_head_matmul(
    x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_size, row_stride: int, row_offset: int,
    rows: int, transpose: bool,
) -> torch.Tensor | None:
    """Per-group products with row ranges of one FP8 weight (:func:`.native.head_matmul`), or None where
    the native kernels do not apply. No autograd: for inference."""
    if not native_applies(x, weight, scale_inv, block_size):
        return None
    return native.head_matmul(x, weight, _scale(scale_inv), block_size, row_stride, row_offset, rows, transpose)


def fp8_dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block_size, dtype: torch.dtype) -> torch.Tensor:
    """The dense weight in ``dtype``: bit-identical to :func:`~.format.block_dequantize` (its reference twin),
    by the native kernel on CPU where it applies (~10x faster than eager torch, which converts FP8 at a few ns
    per element)."""
    if dtype in _INPUT_DTYPES and _weight_applies(weight, scale_inv, block_size):
        w = native.dequantize(weight, _scale(scale_inv), block_size)  # (M, N) fp32
        return w if dtype == torch.float32 else w.to(dtype)
    return block_dequantize(weight, scale_inv, block_size, dtype)
