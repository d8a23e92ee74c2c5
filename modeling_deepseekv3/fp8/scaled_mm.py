"""The ``"scaled_mm"`` backend: torch's block-scaled FP8 GEMM on Hopper (SM90), DeepSeek's inference recipe.

The activation is quantized on the fly per 1x128 tile (``amax / 448`` per token and 128 input channels,
activation scheme "dynamic"), the weight keeps the checkpoint's 128x128 ``weight_scale_inv``, and torch's
block-scaled ``torch.nn.functional.scaled_mm`` (``BlockWise1x128`` x ``BlockWise128x128``, cuBLASLt)
multiplies on the FP8 tensor cores with fp32 accumulation, output in the activation's dtype. cuBLAS wants
the scales in its own layout: the weight's are prepared once per weight and cached on the module
(:func:`weight_scale_layout`). The training recipe's CUDA GEMMs go through the same wrapper,
:func:`blockwise_scaled_mm`.

torch only implements these scale recipes for SM90 with cuBLASLt >= 12.9 (``_check_deepseek_support`` in
ATen's ``ScaledBlas.cpp``): Ada (SM89) and Blackwell (SM100) have FP8 tensor cores but not this recipe in
torch, which is why :mod:`.dispatch` sends them to W8A16 under "auto".

Nothing here touches CUDA at import time. Without a device the layouts are checked through
:func:`blockwise_scaled_mm_emulated` (a pure-torch reader of the cuBLAS layouts) and torch's own meta-device
shape checks; see the README's "FP8 on GPUs" for what has been measured on a device.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .format import FP8_DTYPE, block_quantize

__all__ = [
    "INPUT_DTYPES",
    "TILE",
    "blockwise_scaled_mm",
    "blockwise_scaled_mm_emulated",
    "cuda_capability",
    "prepare_scales",
    "scaled_mm_linear",
    "scaled_mm_supported",
    "scaled_mm_weight_applies",
    "tile_scale_layout",
    "weight_scale_layout",
]

TILE = 128
#: What torch / cuBLASLt take (CUDA 13.0, H200): ``K`` a multiple of 16 (a ValueError from torch: a routed
#: expert's Wgrad contracts over the tokens routed to it, 2133 say), and no block-scaled algorithm for a one-row
#: ``A`` (CUBLAS_STATUS_NOT_SUPPORTED at decode batch 1) while 16 rows and up run. :func:`blockwise_scaled_mm`
#: pads ``M``, ``N`` and ``K`` to multiples of this with zeros.
PAD = 16
#: Activation dtypes :func:`scaled_mm_linear` takes (it quantizes them itself).
INPUT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def cuda_capability(device: torch.device) -> tuple[int, int]:
    """``(major, minor)`` of a CUDA device; one place to ask, so tests can simulate a GPU."""
    return torch.cuda.get_device_capability(device)


def scaled_mm_supported(device: torch.device) -> bool:
    """Whether torch's block-scaled ``scaled_mm`` (1x128 x 128x128) runs on ``device``: a CUDA (not ROCm)
    build, an SM90 GPU, and CUDA >= 12.9 (ATen refuses the recipe otherwise)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available() or torch.version.hip is not None:
        return False
    if not hasattr(F, "scaled_mm") or cuda_capability(device)[0] != 9:
        return False
    cuda = tuple(int(p) for p in (torch.version.cuda or "0.0").split(".")[:2])
    return cuda >= (12, 9)


def scaled_mm_weight_applies(weight: torch.Tensor, block_size) -> bool:
    """Shapes ``scaled_mm`` takes: 128x128 blocks, a row-major float8 weight, ``N`` and ``K`` multiples of 16."""
    n, k = weight.shape
    return (
        tuple(block_size) == (TILE, TILE)
        and weight.dtype == FP8_DTYPE
        and weight.is_contiguous()
        and n % 16 == 0
        and k % 16 == 0
    )


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


def _pad_fp8(t: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """float8 ``t`` in the top-left corner of ``[rows, cols]`` zeros (byte 0 is +0.0 in e4m3)."""
    if t.shape == (rows, cols):
        return t
    out = torch.zeros(rows, cols, dtype=torch.uint8, device=t.device).view(t.dtype)
    out[: t.shape[0], : t.shape[1]].copy_(t)
    return out


def _pad_tile_scales(scale: torch.Tensor, rows: int) -> torch.Tensor:
    """1x128 tile scales ``[R, Kb]`` grown to ``rows`` (scale 1 for the zero rows), in cuBLAS's layout."""
    if scale.shape[0] == rows:
        return scale
    return tile_scale_layout(torch.cat([scale, scale.new_ones(rows - scale.shape[0], scale.shape[1])]))


def blockwise_scaled_mm(a_q, a_scale, b_q, b_scale, b_block, out_dtype) -> torch.Tensor:
    """``A @ B^T`` on FP8 tensor cores: ``a_q [M, K]`` float8 with 1x128 tile scales, ``b_q [N, K]`` float8
    (row-major, so ``b_q.t()`` is the column-major operand cuBLAS needs, no copy) with ``b_block`` = (1, 128)
    tiles or (128, 128) blocks. Scales already in cuBLAS layout (:func:`prepare_scales`). fp32 accumulation
    (``use_fast_accum=False``), output ``[M, N]`` in ``out_dtype``. The one wrapper shared by inference
    (:func:`scaled_mm_linear`) and the training recipe's CUDA backend. Any ``M``, ``N``, ``K``: dimensions that
    are not multiples of :data:`PAD` are padded with zeros (zero codes; scale 1 on padded rows), which changes
    no sum and no block count (a multiple of 16 never crosses a multiple of 128), and the output is cut back."""
    recipes = {(1, TILE): F.ScalingType.BlockWise1x128, (TILE, TILE): F.ScalingType.BlockWise128x128}
    (m, k), n = a_q.shape, b_q.shape[0]
    mp, np_, kp = (d + (-d % PAD) for d in (m, n, k))
    if (mp, np_, kp) != (m, n, k):
        a_q, b_q = _pad_fp8(a_q, mp, kp), _pad_fp8(b_q, np_, kp)
        a_scale = _pad_tile_scales(a_scale, mp)
        if tuple(b_block) == (1, TILE):
            b_scale = _pad_tile_scales(b_scale, np_)
        return blockwise_scaled_mm(a_q, a_scale, b_q, b_scale, b_block, out_dtype)[:m, :n]  # (M, N)
    return F.scaled_mm(
        a_q,
        b_q.t(),
        a_scale,
        F.ScalingType.BlockWise1x128,
        b_scale,
        recipes[tuple(b_block)],
        output_dtype=out_dtype,
        use_fast_accum=False,
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


def scaled_mm_linear(
    x2d: torch.Tensor, weight: torch.Tensor, scale_b: torch.Tensor, scale_fmt: str | None = None
) -> torch.Tensor:
    """``x2d [T, K] @ dequant(weight [N, K]).T`` in ``x2d``'s dtype: ``x2d`` quantized per 1x128 tile now
    (power-of-two scales when the checkpoint's ``scale_fmt`` is ``"ue8m0"``, as DeepSeek's V3.1 inference
    does), ``scale_b`` the weight's scales in :func:`weight_scale_layout` (cached by the caller)."""
    x_q, x_s = block_quantize(x2d, (1, TILE), scale_fmt)  # (T, K) fp8, (T, Kb) fp32
    return blockwise_scaled_mm(x_q, tile_scale_layout(x_s), weight, scale_b, (TILE, TILE), x2d.dtype)  # (T, N)
