"""The DeepSeek block-scaled FP8 weight format: constants, scale grids, quantize and dequantize.

Format (``docs/deepseek_v3.md`` §4.1): a float8_e4m3fn weight ``W_q [M, N]`` and a float32
``weight_scale_inv [ceil(M/bm), ceil(N/bn)]`` (bm = bn = 128 in every official checkpoint). Despite the
name the scale is *multiplied*: ``W[i, j] = float32(W_q[i, j]) * S[i // bm, j // bn]``. The last block of
a dimension may be partial: V3's ``kv_a_proj_with_mqa`` is 576 rows = 4.5 blocks, and its scale row 4
covers rows 512..575 only. (transformers' own CPU dequantizer derives the block size from the grid,
``M / grid_rows``, which is wrong whenever the last block is partial; we always use the configured block
size.) ``scale_fmt="ue8m0"`` (V3.1) stores power-of-two scales.

Everything here is plain torch and runs on any device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "FP8_DTYPE",
    "FP8_MAX",
    "SCALE_FORMATS",
    "apply_keeping_dtype",
    "block_dequantize",
    "block_quantize",
    "scale_shape",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_BLOCK_SIZE = (128, 128)
SCALE_FORMATS = (None, "ue8m0")  # plain float32 scales, or powers of two (V3.1)


def scale_shape(shape: tuple[int, int] | torch.Size, block_size=DEFAULT_BLOCK_SIZE) -> tuple[int, int]:
    """Shape of ``weight_scale_inv`` for a weight of ``shape``: ``[ceil(M/bm), ceil(N/bn)]``."""
    (m, n), (bm, bn) = shape, block_size
    return math.ceil(m / bm), math.ceil(n / bn)


def _blocked(x: torch.Tensor, block_size) -> tuple[torch.Tensor, int, int]:
    """View ``x [M, N]`` as ``[Mb, bm, Nb, bn]``, zero-padding partial edge blocks (copy only if needed)."""
    (m, n), (bm, bn) = x.shape, block_size
    pm, pn = -m % bm, -n % bn
    if pm or pn:
        x = F.pad(x, (0, pn, 0, pm))
    mb, nb = (m + pm) // bm, (n + pn) // bn
    return x.view(mb, bm, nb, bn), m, n


def check_scale_fmt(scale_fmt: str | None) -> None:
    if scale_fmt not in SCALE_FORMATS:
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}.")


def round_scale(scale: torch.Tensor, scale_fmt: str | None) -> torch.Tensor:
    """``scale_fmt="ue8m0"``: round each scale *up* to a power of two (never overflows the e4m3 range)."""
    check_scale_fmt(scale_fmt)
    return torch.exp2(torch.ceil(torch.log2(scale))) if scale_fmt == "ue8m0" else scale


def block_dequantize(
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size=DEFAULT_BLOCK_SIZE,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``float32(W_q) * S`` blockwise, then cast to ``dtype`` (BF16 output rounds like the official
    ``fp8_cast_bf16``). Partial edge blocks use their block's scale for the real rows/columns."""
    expected = scale_shape(weight.shape, block_size)
    if tuple(scale_inv.shape) != expected:
        raise ValueError(
            f"weight_scale_inv has shape {tuple(scale_inv.shape)} but a {tuple(weight.shape)} weight with "
            f"{tuple(block_size)} blocks needs {expected}."
        )
    w = weight.to(torch.float32)
    blocks, m, n = _blocked(w, block_size)  # (Mb, bm, Nb, bn)
    blocks = blocks * scale_inv.to(device=w.device, dtype=torch.float32)[:, None, :, None]
    out = blocks.reshape(blocks.shape[0] * blocks.shape[1], blocks.shape[2] * blocks.shape[3])[:m, :n]
    return out.to(dtype)


def block_quantize(
    weight: torch.Tensor,
    block_size=DEFAULT_BLOCK_SIZE,
    scale_fmt: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Quantize a dense weight to ``(float8_e4m3fn weight, float32 weight_scale_inv)``.

    Per block: ``s = amax / 448`` over the block's real elements (padding never raises the amax), with
    ``scale_fmt="ue8m0"`` rounded *up* to a power of two as in V3.1; ``W_q = round_to_e4m3(W / s)``.
    Error bound per element, for the e4m3 grid (3 mantissa bits): ``|W - dequant(W_q)| <= max(|W| / 16,
    s / 1024)`` (half an ulp in the normal range, half the subnormal spacing below it).
    """
    if weight.dim() != 2:
        raise ValueError(f"block_quantize expects a 2-D weight, got shape {tuple(weight.shape)}.")
    w = weight.to(torch.float32)
    blocks, m, n = _blocked(w, block_size)  # (Mb, bm, Nb, bn)
    amax = blocks.abs().amax(dim=(1, 3)).clamp(min=1e-12)  # (Mb, Nb)
    scale = round_scale(amax / FP8_MAX, scale_fmt)
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(q.shape[0] * q.shape[1], q.shape[2] * q.shape[3])[:m, :n].to(FP8_DTYPE)
    return q.contiguous(), scale.contiguous()


def apply_keeping_dtype(module: nn.Module, fn, names: tuple[str, ...]) -> None:
    """Apply an ``nn.Module._apply`` conversion to the named tensors but keep their dtypes.

    ``model.to(torch.bfloat16)`` would turn float8 codes into BF16 (2x memory), round FP32 block scales,
    and round the FP32 router weight and bias (spec trap 6); for these tensors only the device part of a
    conversion is honoured. Parameters stay parameters (with their ``requires_grad``), buffers buffers."""
    for name in names:
        if name in module._parameters and module._parameters[name] is not None:
            old = module._parameters[name]
            new = fn(old)
            if new.dtype != old.dtype:
                new = old.detach().to(device=new.device)
            module._parameters[name] = nn.Parameter(new, requires_grad=old.requires_grad)
        elif name in module._buffers and module._buffers[name] is not None:
            old = module._buffers[name]
            new = fn(old)
            module._buffers[name] = new if new.dtype == old.dtype else old.to(device=new.device)
