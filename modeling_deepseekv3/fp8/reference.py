"""The slow, readable twins every FP8 backend is tested against (CPU, ``scaled_mm``, W8A16 alike).

They compute with the formula of docs/deepseek_v3.md §4.3 in eager torch, on any device: partial sums over each 128-wide K
block, each multiplied by its block scale, accumulated in float32. Nothing on the inference path calls them.
"""

from __future__ import annotations

import torch

from .format import block_dequantize

__all__ = ["fp8_head_matmul_reference", "fp8_matmul_reference"]


def fp8_matmul_reference(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_size) -> torch.Tensor:
    """``x [T, N] @ dequant(weight [M, N]).T``, one fp32 partial sum per K block times that block's scale."""
    bm, bn = block_size
    m, n = weight.shape
    s_rows = scale_inv.float().repeat_interleave(bm, dim=0)[:m]  # (M, Nb)
    xf = x.float()
    y = xf.new_zeros(x.shape[0], m)  # (T, M)
    for b, k0 in enumerate(range(0, n, bn)):  # one K block at a time: memory (T, M), not (T, M, Kb, bn)
        part = xf[:, k0 : k0 + bn] @ weight[:, k0 : k0 + bn].float().t()  # (T, M), fp32
        y += part * s_rows[None, :, b]
    return y.to(x.dtype)


def fp8_head_matmul_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size,
    row_stride: int,
    row_offset: int,
    rows: int,
    transpose: bool,
) -> torch.Tensor:
    """Twin of :func:`.cpu.native_head_matmul`: group ``g`` multiplies with ``W_g = dequant(W)[g * row_stride +
    row_offset :][:rows]`` in float32, ``x [G, T, N] @ W_g.T`` or (``transpose``) ``x [G, T, rows] @ W_g``."""
    w = block_dequantize(weight, scale_inv, block_size)  # (M, N) fp32
    starts = torch.arange(x.shape[0]) * row_stride + row_offset
    w_g = w[starts[:, None] + torch.arange(rows)]  # (G, rows, N)
    out = torch.matmul(x.float(), w_g if transpose else w_g.transpose(1, 2))  # (G, T, N) or (G, T, rows)
    return out.to(x.dtype)
