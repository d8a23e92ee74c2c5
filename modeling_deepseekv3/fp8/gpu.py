"""FP8 inference on GPUs: the backend choice, the block-scaled ``scaled_mm`` GEMM, and a W8A16 Triton kernel.

Two ways to multiply by a block-scaled FP8 weight on a GPU without dequantizing all of it first (what
``fp8_compute="dequant"`` does: a transient BF16 copy of the weight per layer per call):

* ``"scaled_mm"`` (Hopper, SM90): DeepSeek's own inference recipe. The activation is quantized on the fly
  per 1x128 tile (``amax / 448`` per token and 128 input channels, activation scheme "dynamic"), the weight
  keeps the checkpoint's 128x128 ``weight_scale_inv``, and torch's block-scaled
  ``torch.nn.functional.scaled_mm`` (``BlockWise1x128`` x ``BlockWise128x128``, cuBLASLt) multiplies on the
  FP8 tensor cores with fp32 accumulation, output in the activation's dtype. The weight scales are laid out
  as cuBLAS wants them once per weight and cached on the module (:func:`weight_scale_layout`); the training
  recipe's CUDA GEMMs go through the same wrapper, :func:`blockwise_scaled_mm`. torch only implements these
  scale recipes for SM90 with cuBLASLt >= 12.9 (``_check_deepseek_support`` in ATen's ``ScaledBlas.cpp``):
  Ada (SM89) and Blackwell (SM100) have FP8 tensor cores but not this recipe in torch, so "auto" gives them
  the W8A16 kernel.
* ``"w8a16"`` (any CUDA GPU with Triton; the only FP8-resident option before SM89): a weight-only kernel
  that reads the FP8 weight as bytes (1 byte per parameter: V3 stays ~671 GB) and decodes the e4m3 bits in
  the GEMM tile -- Triton's ``fp8e4nv`` type needs SM89, so the decode is integer bit operations -- then
  multiplies in the activation dtype on the tensor cores, one fp32 partial sum per 128-wide K block times
  its block scale (the formula of :func:`~.kernels.fp8_matmul_reference`). The same kernel runs the MoE's
  routed experts as one grouped GEMM over the experts that received tokens (:func:`w8a16_grouped_matmul`).
  It also runs, slowly, under Triton's interpreter (``TRITON_INTERPRET=1``) on CPU tensors: that is how it
  is tested on machines without a GPU.

Nothing here imports Triton or touches CUDA at import time. Status: written and tested through twins
(interpreter, pure-torch emulation of the scale layouts, torch's own meta-device shape checks); see the
README's "FP8 on GPUs" for what has and has not been measured on a device.
"""

from __future__ import annotations

import functools
import math

import torch
import torch.nn.functional as F

from ..core.configuration import FP8_COMPUTE_MODES
from .format import FP8_DTYPE, block_quantize

__all__ = [
    "FP8BackendError",
    "blockwise_scaled_mm",
    "blockwise_scaled_mm_emulated",
    "resolve_backend",
    "scaled_mm_linear",
    "scaled_mm_supported",
    "tile_scale_layout",
    "triton_available",
    "w8a16_grouped_matmul",
    "w8a16_matmul",
    "weight_scale_layout",
]

TILE = 128
_GPU_INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class FP8BackendError(ValueError):
    """An ``fp8_compute`` backend was asked for on a device that cannot run it."""


# ------------------------------------------------------------------------------------------ backend choice
@functools.cache
def triton_available() -> bool:
    """Whether Triton imports here (cached). Never imported otherwise."""
    try:
        import triton.language  # noqa: F401 -- importable is the question
    except ImportError:
        return False
    return True


def _cuda_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def scaled_mm_supported(device: torch.device) -> bool:
    """Whether torch's block-scaled ``scaled_mm`` (1x128 x 128x128) runs on ``device``: a CUDA (not ROCm)
    build, an SM90 GPU, and CUDA >= 12.9 (ATen refuses the recipe otherwise)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    if not hasattr(F, "scaled_mm") or _cuda_capability(device)[0] != 9:
        return False
    cuda = tuple(int(p) for p in (torch.version.cuda or "0.0").split(".")[:2])
    return cuda >= (12, 9)


def _describe(device: torch.device) -> str:
    if device.type != "cuda" or not torch.cuda.is_available():
        return f"device {device}"
    major, minor = _cuda_capability(device)
    return f"{device} ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor}, CUDA {torch.version.cuda})"


def resolve_backend(requested: str, device: torch.device | str) -> str:
    """The backend that ``fp8_compute=requested`` means for FP8 weights on ``device``.

    ``"auto"``: CPU -> ``"native"`` (the C++ kernels of :mod:`.native`; they fall back to dequantization
    themselves where they cannot be built); CUDA SM90 with CUDA >= 12.9 -> ``"scaled_mm"``; any other CUDA
    GPU with Triton installed -> ``"w8a16"``; everything else -> ``"dequant"``. An explicit backend on a
    device that cannot run it raises :class:`FP8BackendError` naming the device and what to set instead.
    Explicit requests are per device, not per shape: a weight whose shape a backend cannot take (say an
    inner dimension not a multiple of 16 for ``scaled_mm``) computes by dequantization, and
    ``model.fp8_backend()`` shows it."""
    if requested in _CPU_NATIVE and getattr(device, "type", None) == "cpu":  # the per-call hot path on CPU
        return "native"
    device = torch.device(device)
    return _resolve(requested, device.type, device.index)


_CPU_NATIVE = ("auto", "native")


@functools.cache
def _resolve(requested: str, device_type: str, index: int | None) -> str:
    if requested not in FP8_COMPUTE_MODES:
        raise ValueError(f"fp8_compute must be one of {FP8_COMPUTE_MODES}, got {requested!r}.")
    device = torch.device(device_type, index) if index is not None else torch.device(device_type)
    is_cuda = device_type == "cuda" and torch.cuda.is_available()
    if requested == "auto":
        if device_type == "cpu":
            return "native"
        if is_cuda and scaled_mm_supported(device):
            return "scaled_mm"
        if is_cuda and triton_available():
            return "w8a16"
        return "dequant"
    if requested == "native" and device_type != "cpu":
        raise FP8BackendError(
            f"fp8_compute='native' is the CPU kernel, but the FP8 weights are on {_describe(device)}. "
            "Set fp8_compute='auto' (picks the best backend per device) or 'dequant'."
        )
    if requested == "scaled_mm" and not scaled_mm_supported(device):
        raise FP8BackendError(
            f"fp8_compute='scaled_mm' needs torch's block-scaled FP8 GEMM (a Hopper GPU, compute capability 9.x, "
            f"with CUDA >= 12.9), but the FP8 weights are on {_describe(device)}. Set fp8_compute='auto', or "
            "'w8a16' on other CUDA GPUs (needs triton), 'native' on CPU, or 'dequant' anywhere."
        )
    if requested == "w8a16" and not (is_cuda and triton_available()):
        why = "triton is not installed (pip install triton)" if is_cuda else f"the FP8 weights are on {_describe(device)}"
        raise FP8BackendError(
            f"fp8_compute='w8a16' is a Triton kernel for CUDA GPUs, but {why}. Set fp8_compute='auto', "
            "'native' on CPU, or 'dequant' anywhere."
        )
    return requested


# ------------------------------------------------------------------------------------ block-scaled scaled_mm
def tile_scale_layout(scale: torch.Tensor) -> torch.Tensor:
    """Scales of a 1x128-tiled operand ``[R, ceil(K/128)]`` as cuBLAS reads them: the same shape, outer-dim
    major (strides ``(1, R)``, literally: ATen checks the strides even of size-1 dimensions, which
    ``.t().contiguous().t()`` leaves as it finds them -- a one-token decode would be refused)."""
    rows, kb = scale.shape
    return torch.empty_strided((rows, kb), (1, rows), dtype=torch.float32, device=scale.device).copy_(scale)


def weight_scale_layout(scale_inv: torch.Tensor) -> torch.Tensor:
    """Scales of a 128x128-blocked ``B [N, K]`` (``weight_scale_inv [ceil(N/128), ceil(K/128)]``) as
    ``scaled_mm`` wants them for the column-major ``B^T [K, N]``: shape ``(L4, ceil(N/128))`` with
    ``L4 = ceil(K/128)`` rounded up to a multiple of 4 (zero padding), strides ``(1, L4)``. Computed once
    per weight (the module caches it)."""
    nb, kb = scale_inv.shape
    l4 = kb + (-kb % 4)
    out = torch.empty_strided((l4, nb), (1, l4), dtype=torch.float32, device=scale_inv.device).zero_()  # (L4, Nb)
    out[:kb].copy_(scale_inv.t())
    return out


def prepare_scales(scale: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    """The cuBLAS layout of an operand's scales, by its block shape: ``(1, 128)`` tiles or ``(128, 128)``."""
    if tuple(block) == (1, TILE):
        return tile_scale_layout(scale)
    if tuple(block) == (TILE, TILE):
        return weight_scale_layout(scale)
    raise ValueError(f"scaled_mm takes 1x{TILE} or {TILE}x{TILE} scale blocks, got {tuple(block)}.")


def blockwise_scaled_mm(a_q, a_scale, b_q, b_scale, b_block, out_dtype) -> torch.Tensor:
    """``A @ B^T`` on FP8 tensor cores: ``a_q [M, K]`` float8 with 1x128 tile scales, ``b_q [N, K]`` float8
    (row-major, so ``b_q.t()`` is the column-major operand cuBLAS needs, no copy) with ``b_block`` = (1, 128)
    tiles or (128, 128) blocks. Scales already in cuBLAS layout (:func:`prepare_scales`). fp32 accumulation
    (``use_fast_accum=False``), output ``[M, N]`` in ``out_dtype``. The one wrapper shared by inference
    (:func:`scaled_mm_linear`) and the training recipe's CUDA backend."""
    recipes = {(1, TILE): F.ScalingType.BlockWise1x128, (TILE, TILE): F.ScalingType.BlockWise128x128}
    return F.scaled_mm(
        a_q, b_q.t(), a_scale, F.ScalingType.BlockWise1x128, b_scale, recipes[tuple(b_block)],
        output_dtype=out_dtype, use_fast_accum=False,
    )


def blockwise_scaled_mm_emulated(a_q, a_scale, b_q, b_scale, b_block, out_dtype) -> torch.Tensor:
    """The twin of :func:`blockwise_scaled_mm` in plain torch (any device), reading the scales from the
    *cuBLAS layouts*: so a test of this against the dequant reference checks the layout preparation."""
    k, n = a_q.shape[1], b_q.shape[0]
    kb = math.ceil(k / TILE)
    a = a_q.float() * a_scale[:, :kb].repeat_interleave(TILE, dim=1)[:, :k]  # (M, K)
    if tuple(b_block) == (TILE, TILE):
        s = b_scale[:kb].t()  # (L4, Nb) -> (Nb, Kb): the padding rows dropped
        s = s.repeat_interleave(TILE, dim=0)[:n].repeat_interleave(TILE, dim=1)[:, :k]  # (N, K)
    else:
        s = b_scale[:, :kb].repeat_interleave(TILE, dim=1)[:, :k]  # (N, K)
    return (a @ (b_q.float() * s).t()).to(out_dtype)


def scaled_mm_weight_applies(weight: torch.Tensor, block_size) -> bool:
    """Shapes ``scaled_mm`` takes: 128x128 blocks, a row-major float8 weight, ``N`` and ``K`` multiples of 16."""
    n, k = weight.shape
    return tuple(block_size) == (TILE, TILE) and weight.dtype == FP8_DTYPE and weight.is_contiguous() and n % 16 == 0 and k % 16 == 0


def scaled_mm_linear(
    x2d: torch.Tensor, weight: torch.Tensor, scale_b: torch.Tensor, scale_fmt: str | None = None
) -> torch.Tensor:
    """``x2d [T, K] @ dequant(weight [N, K]).T`` in ``x2d``'s dtype: ``x2d`` quantized per 1x128 tile now
    (power-of-two scales when the checkpoint's ``scale_fmt`` is ``"ue8m0"``, as DeepSeek's V3.1 inference
    does), ``scale_b`` the weight's scales in :func:`weight_scale_layout` (cached by the caller)."""
    x_q, x_s = block_quantize(x2d, (1, TILE), scale_fmt)  # (T, K) fp8, (T, Kb) fp32
    return blockwise_scaled_mm(x_q, tile_scale_layout(x_s), weight, scale_b, (TILE, TILE), x2d.dtype)  # (T, N)


# ----------------------------------------------------------------------------------------- W8A16 (Triton)
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
        x2d, codes, scale, out, *tables,
        x2d.shape[0], n, k,
        x2d.stride(0), x2d.stride(1), *w_strides, *s_strides, out.stride(0), out.stride(1),
        SCALE_N=block_size[0], SCALE_K=block_size[1], GROUPED=grouped, BM=bm, BN=bn, BK=_k_tile(block_size[1]),
        PRECISION=precision, DOT_FP32=interpreted,
    )
    return out.to(out_dtype)


def w8a16_matmul(x2d: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_size) -> torch.Tensor:
    """``x2d [T, K] @ dequant(weight [N, K]).T`` in ``x2d``'s dtype by the W8A16 kernel (module docstring).
    ``weight`` float8_e4m3fn (read as its bytes), ``scale_inv [ceil(N/bn), ceil(K/bk)]`` fp32."""
    if x2d.dtype not in _GPU_INPUT_DTYPES:
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
    if x_AK.dtype not in _GPU_INPUT_DTYPES:
        raise TypeError(f"w8a16 takes bfloat16, float16 or float32 input, got {x_AK.dtype}.")
    (a, k), (n_experts, n, _) = x_AK.shape, weight_ENK.shape
    if a == 0:
        return x_AK.new_empty(0, n)
    bm, bn = _tiles_for(a // max(1, min(n_experts, a)))  # rows per active expert decide the tile
    max_tiles = -(-a // bm) + min(n_experts, a)  # each expert adds at most one partial tile
    tables = group_tiles(counts_E.to(x_AK.device), bm, max_tiles)
    codes, scale = weight_ENK.view(torch.uint8), scale_E.float()
    return _launch(x_AK, codes, scale, x_AK.dtype, tables, max_tiles, n, k, tuple(block_size), bm, bn, True)
