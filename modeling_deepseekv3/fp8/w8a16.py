"""The ``"w8a16"`` backend: a weight-only Triton kernel for any CUDA GPU (the only FP8-resident option before SM89).

It reads the FP8 weight as bytes (1 byte per parameter: V3 stays ~671 GB) and decodes the e4m3 bits inside
the GEMM tile -- Triton's ``fp8e4nv`` type needs SM89, so the decode is integer bit operations -- then
multiplies in the activation dtype on the tensor cores, one fp32 partial sum per 128-wide K block times its
block scale (the formula of :func:`~.reference.fp8_matmul_reference`). The same kernel runs the MoE's routed
experts as one grouped GEMM over the experts that received tokens (:func:`w8a16_grouped_matmul`).

It also runs, slowly, under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors: that is how it is
tested on machines without a GPU. Triton is imported on first use only, never at import time. The kernels
themselves are in :mod:`._triton_kernels`.
"""

from __future__ import annotations

import functools

import torch

from .format import FP8_DTYPE

__all__ = [
    "INPUT_DTYPES",
    "decode_e4m3_bits",
    "group_tiles",
    "triton_available",
    "w8a16_grouped_matmul",
    "w8a16_matmul",
    "w8a16_weight_applies",
]

#: Activation dtypes the kernel multiplies in.
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


@functools.cache
def triton_available() -> bool:
    """Whether Triton imports here (cached). Never imported otherwise."""
    try:
        import triton.language  # noqa: F401 -- importable is the question
    except ImportError:
        return False
    return True


def w8a16_weight_applies(weight: torch.Tensor, block_size) -> bool:
    """Shapes the W8A16 kernel takes: a float8 weight and a K block size that a 16-multiple K tile divides."""
    return weight.dtype == FP8_DTYPE and _k_tile(block_size[1]) is not None


def _k_tile(block_k: int) -> int | None:
    for bk in (64, 32, 16):  # one K tile never straddles two scale blocks
        if block_k % bk == 0:
            return bk
    return None


def _kernels(device: torch.device):
    """The Triton kernels (:mod:`._triton_kernels`, imported here and only here). CPU tensors get a copy
    loaded under Triton's interpreter (``triton.jit`` decides at decoration time whether a function is
    interpreted), so the same code runs compiled on a GPU and interpreted on CPU in one process."""
    return _load_kernels(torch.device(device).type == "cpu")


@functools.cache
def _load_kernels(interpret: bool):
    import importlib
    import importlib.util
    import os

    name = __package__ + "._triton_kernels"
    if not interpret:
        return importlib.import_module(name)
    spec = importlib.util.find_spec(name)
    module = importlib.util.module_from_spec(spec)
    old = os.environ.get("TRITON_INTERPRET")
    os.environ["TRITON_INTERPRET"] = "1"
    try:
        spec.loader.exec_module(module)
    finally:
        if old is None:
            os.environ.pop("TRITON_INTERPRET")
        else:
            os.environ["TRITON_INTERPRET"] = old
    return module


def decode_e4m3_bits(codes: torch.Tensor) -> torch.Tensor:
    """The kernels' in-register e4m3 decode applied to a uint8 tensor (for tests): float32 values."""
    k = _kernels(codes.device)
    codes = codes.contiguous().view(-1)
    out = torch.empty(codes.shape, dtype=torch.float32, device=codes.device)
    k.decode_kernel[(-(-codes.numel() // 1024),)](codes, out, codes.numel(), BLOCK=1024)
    return out


def _tiles_for(rows: int) -> tuple[int, int]:
    """(BM, BN): small row tiles for decode (memory-bound: every weight byte is read once per row tile),
    larger for prefill. Untuned: no GPU measurement yet."""
    return (16, 64) if rows <= 16 else (64, 64)


def _launch(x2d, codes, scale, out_dtype, tables, n_tiles, n, k, block_size, bm, bn, grouped):
    interpreted = x2d.device.type == "cpu"
    kernel = _kernels(x2d.device).w8a16_kernel
    # Triton's interpreter multiplies bf16 operands wrongly and casts fp32 -> bf16 by truncation: there the
    # kernel multiplies in fp32 (the same exact products) and torch rounds the fp32 output
    out = torch.empty(x2d.shape[0], n, device=x2d.device, dtype=torch.float32 if interpreted else out_dtype)
    precision = "ieee" if x2d.dtype == torch.float32 else "tf32"  # ignored for bf16/fp16 inputs
    w_strides = codes.stride() if grouped else (0, *codes.stride())
    s_strides = scale.stride() if grouped else (0, *scale.stride())
    kernel[(n_tiles, -(-n // bn))](
        x2d,
        codes,
        scale,
        out,
        *tables,
        x2d.shape[0],
        n,
        k,
        x2d.stride(0),
        x2d.stride(1),
        *w_strides,
        *s_strides,
        out.stride(0),
        out.stride(1),
        SCALE_N=block_size[0],
        SCALE_K=block_size[1],
        GROUPED=grouped,
        BM=bm,
        BN=bn,
        BK=_k_tile(block_size[1]),
        PRECISION=precision,
        DOT_FP32=interpreted,
    )
    return out.to(out_dtype)


def w8a16_matmul(x2d: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_size) -> torch.Tensor:
    """``x2d [T, K] @ dequant(weight [N, K]).T`` in ``x2d``'s dtype by the W8A16 kernel (module docstring).
    ``weight`` float8_e4m3fn (read as its bytes), ``scale_inv [ceil(N/bn), ceil(K/bk)]`` fp32."""
    if x2d.dtype not in INPUT_DTYPES:
        raise TypeError(f"w8a16 takes bfloat16, float16 or float32 input, got {x2d.dtype}.")
    (t, k), n = x2d.shape, weight.shape[0]
    if t == 0:
        return x2d.new_empty(0, n)
    bm, bn = _tiles_for(t)
    codes, scale = weight.view(torch.uint8), scale_inv.float()
    unused = torch.zeros(1, dtype=torch.int32, device=x2d.device)  # no tile table when ungrouped
    return _launch(x2d, codes, scale, x2d.dtype, (unused,) * 3, -(-t // bm), n, k, tuple(block_size), bm, bn, False)


def group_tiles(counts_E: torch.Tensor, bm: int, max_tiles: int):
    """The grouped kernel's tile table, on the device and with no host sync: for row tile ``t`` of
    ``max_tiles`` (an upper bound from the shapes alone), its expert and its rows ``[row0, row1)`` in the
    expert-sorted input; tiles past the last used one get ``row0 == row1`` (empty)."""
    counts = counts_E.to(torch.int64)
    ends = counts.cumsum(0)  # (E,) rows end of each expert
    tiles = (counts + bm - 1) // bm  # (E,)
    tiles_end = tiles.cumsum(0)  # (E,)
    t = torch.arange(max_tiles, device=counts.device)  # (Tt,)
    e = torch.searchsorted(tiles_end, t, right=True)  # (Tt,) expert owning tile t; E past the end
    live = e < counts.numel()
    e = e.clamp(max=counts.numel() - 1)
    first = tiles_end[e] - tiles[e]  # (Tt,) the expert's first tile index
    row0 = ends[e] - counts[e] + (t - first) * bm
    row1 = torch.where(live, ends[e], row0)
    return e.to(torch.int32), row0.to(torch.int32), row1.to(torch.int32)


def w8a16_grouped_matmul(
    x_AK: torch.Tensor, weight_ENK: torch.Tensor, scale_E: torch.Tensor, counts_E: torch.Tensor, block_size
) -> torch.Tensor:
    """Rows sorted by expert (``counts_E[e]`` rows for expert ``e``), each times its expert's FP8 weight:
    ``y[rows_e] = x[rows_e] @ dequant(W_e).T``, one kernel launch for all experts (no per-expert loop, no
    host sync; experts without rows cost nothing). ``weight_ENK [E, N, K]`` float8, ``scale_E [E, Nb, Kb]``."""
    if x_AK.dtype not in INPUT_DTYPES:
        raise TypeError(f"w8a16 takes bfloat16, float16 or float32 input, got {x_AK.dtype}.")
    (a, k), (n_experts, n, _) = x_AK.shape, weight_ENK.shape
    if a == 0:
        return x_AK.new_empty(0, n)
    bm, bn = _tiles_for(a // max(1, min(n_experts, a)))  # rows per active expert decide the tile
    max_tiles = -(-a // bm) + min(n_experts, a)  # each expert adds at most one partial tile
    tables = group_tiles(counts_E.to(x_AK.device), bm, max_tiles)
    codes, scale = weight_ENK.view(torch.uint8), scale_E.float()
    return _launch(x_AK, codes, scale, x_AK.dtype, tables, max_tiles, n, k, tuple(block_size), bm, bn, True)
