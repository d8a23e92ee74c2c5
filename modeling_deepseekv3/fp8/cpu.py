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
import torch.nn.functional as F
from torch import nn

from . import native
from .format import FP8_DTYPE, block_dequantize

__all__ = [
    "DENSE_MAX_ROWS",
    "INPUT_DTYPES",
    "NativeHeadLinear",
    "fp8_dequantize",
    "native_applies",
    "native_experts",
    "native_head_matmul",
    "native_linear",
    "native_weight_applies",
    "use_native_heads",
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


def native_experts(
    x_AD: torch.Tensor, counts: list[int], weights: list[torch.Tensor], scales: list[torch.Tensor], block_size
) -> torch.Tensor:
    """One MoE layer's SwiGLU experts on rows sorted by expert (:func:`.native.experts`), for weights each of which
    :func:`native_weight_applies` to. Inference only."""
    return native.experts(x_AD, counts, weights, [_scale(s) for s in scales], block_size)


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


# ---- dense output heads ----------------------------------------------------------------------------------------

#: Input rows up to which a head's product streams its dense weight (decode: one row per sequence); more go to BLAS.
DENSE_MAX_ROWS = 4
_DENSE_WEIGHTS = (torch.bfloat16, torch.float32)


class NativeHeadLinear(nn.Linear):
    """An output head (``lm_head``, MTP's ``shared_head.head``) whose decode-sized products run on the native dense
    tiles (:func:`.native.dense_linear`).

    Why: the head is the largest single weight a decode step reads (Moonlight: 163840 x 2048 in BF16, 0.67 GB,
    a fifth of the step's bytes), it stays BF16 in FP8 checkpoints, and torch's CPU product of one row with it
    reads about half the bandwidth the FP8 kernels reach. Everything else is ``nn.Linear``'s: the parameters,
    their names and ties, saving, and every call the tiles do not take (autograd, more than
    :data:`DENSE_MAX_ROWS` rows, other devices or dtypes) runs ``nn.Linear.forward``, which is also the reference
    twin the tests compare against. Installed by :func:`use_native_heads`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows = x.numel() // x.shape[-1] if x.shape[-1] else 0
        if (
            0 < rows <= DENSE_MAX_ROWS
            and self.bias is None
            and x.is_cpu
            and w.is_cpu
            and x.dtype == w.dtype  # (F.linear refuses mixed dtypes; so does this)
            and w.dtype in _DENSE_WEIGHTS
            and w.is_contiguous()
            and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad))
        ):
            return native.dense_linear(x.reshape(rows, x.shape[-1]), w).view(*x.shape[:-1], w.shape[0])
        return F.linear(x, w, self.bias)


def use_native_heads(model) -> list[str]:
    """Give the model's dense output heads (``lm_head`` and each MTP ``shared_head.head``) the native decode
    product (:class:`NativeHeadLinear`) where they are plain bias-free ``nn.Linear`` modules whose weight is on
    the CPU in BF16 or FP32 and the native kernels load. The module's class is switched in place, so the
    parameter objects, ties, hooks and names are untouched. Returns the names of the switched heads."""
    heads = {"lm_head"} | {name for name, _ in model.named_modules() if name.endswith("shared_head.head")}
    candidates = []
    for name in sorted(heads):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            continue
        w = getattr(module, "weight", None)
        if (
            type(module) is nn.Linear
            and module.bias is None
            and w is not None
            and w.is_cpu
            and w.dtype in _DENSE_WEIGHTS
        ):
            candidates.append((name, module))
    if (
        not candidates or not native.available()
    ):  # (asked only when a head could use the kernels: no GPU model loads them)
        return []
    for _, module in candidates:
        module.__class__ = NativeHeadLinear
    return [name for name, _ in candidates]
