"""CPU compute kernels for ``y = x @ dequant(W_fp8, S).T``, each beside its slow reference twin.

Eager FP8 -> float conversion runs at ~3-6 ns per element (not vectorized), 20-60x the cost of the
matmul it feeds. Compiled with torch.compile (inductor), the conversion is fused into the matmul's
reduction, so the weight is read once, as one byte per element. That wins while few rows share the
weight (decode); for more rows one dequantization amortizes and BLAS is faster.
"""

from __future__ import annotations

import warnings

import torch

__all__ = ["FUSED_MAX_ROWS", "compiled_fp8_matmul", "fp8_matmul_reference"]

FUSED_MAX_ROWS = 24  # measured crossover (benchmarks/moe.py): fused 1.9 ms/row vs ~70 ms per dequant


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


_COMPILED: dict[str, object] = {}
_COMPILE_BROKEN = False


def _compiled(name: str, fn):
    if name not in _COMPILED:
        _COMPILED[name] = torch.compile(fn, dynamic=True)
    return _COMPILED[name]


def compiled_fp8_matmul(x2d: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_size):
    """The compiled twin of :func:`fp8_matmul_reference`; returns None (after warning once) when
    compilation is impossible here (no C++ compiler, ...), so the caller takes the eager path."""
    global _COMPILE_BROKEN
    if _COMPILE_BROKEN:
        return None
    try:
        # one kernel per (few rows vs one row) x (aligned vs partial blocks) x ...: more variants than
        # dynamo's default limit of 8 across a model's weight shapes; beyond it dynamo would silently run
        # eager. The limit is raised only while this call runs.
        with torch._dynamo.config.patch(recompile_limit=64):
            return _compiled("matmul", fp8_matmul_reference)(x2d, weight, scale_inv, block_size)
    except Exception as exc:
        _COMPILE_BROKEN = True
        warnings.warn(
            f"FP8 fast path unavailable ({type(exc).__name__}: {exc}); using eager block dequantization, which is "
            "much slower on CPU. Set fp8_compute='dequant' to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None
