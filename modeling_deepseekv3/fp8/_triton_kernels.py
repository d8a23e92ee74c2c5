"""The Triton kernels behind :mod:`.w8a16` (this module imports Triton at its top: only :func:`.w8a16._kernels`
imports it, on first use). Kept in their own module because ``triton.jit`` resolves names through the module's
globals, and so that :mod:`.w8a16` can load a second, interpreted copy for CPU tensors. That copy works even
when Triton was imported normally first, as long as these kernels call only Triton builtins and each other:
the standard library's ``@jit`` helpers (``tl.zeros``, ``tl.cdiv``, ...) were not decorated interpreted."""

import triton
import triton.language as tl


@triton.jit
def decode_e4m3(b):
    """uint8 e4m3fn codes -> float32, exactly: sign | 4-bit exponent (bias 7) | 3-bit mantissa;
    exponent 0 is subnormal (m * 2^-9); 0x7F / 0xFF are NaN (e4m3fn has no infinities)."""
    b = b.to(tl.int32)
    exp = (b >> 3) & 0xF
    man = b & 0x7
    normal = ((exp + 120) << 23) | (man << 20)  # fp32 bits: exponent re-biased 7 -> 127, mantissa on top
    mag = tl.where(exp == 0, man.to(tl.float32) * 0.001953125, normal.to(tl.float32, bitcast=True))
    mag = tl.where((exp == 15) & (man == 7), float("nan"), mag)
    return tl.where((b & 0x80) != 0, -mag, mag)


@triton.jit
def decode_kernel(src, dst, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    tl.store(dst + offs, decode_e4m3(tl.load(src + offs, mask=mask, other=0)), mask=mask)


@triton.jit
def w8a16_kernel(
    x_ptr,
    w_ptr,
    s_ptr,
    y_ptr,
    tile_expert_ptr,
    tile_row0_ptr,
    tile_row1_ptr,
    M,
    N,
    K,
    sxm,
    sxk,
    swe,
    swn,
    swk,
    sse,
    ssn,
    ssk,
    sym,
    syn,
    SCALE_N: tl.constexpr,
    SCALE_K: tl.constexpr,
    GROUPED: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    BK: tl.constexpr,
    PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    """``y[rows] = x[rows] @ dequant(W_e)^T`` for one (row tile, N tile). Ungrouped: row tile ``pid_m``
    of ``x`` and expert 0. Grouped: the tile table says which expert and rows (an unused tile has
    row0 == row1 and loads nothing)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    if GROUPED:
        e = tl.load(tile_expert_ptr + pid_m).to(tl.int64)
        row0 = tl.load(tile_row0_ptr + pid_m)
        row1 = tl.load(tile_row1_ptr + pid_m)
    else:
        e = 0
        row0 = pid_m * BM
        row1 = M
    offs_m = row0 + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_mask = offs_m < row1
    n_mask = offs_n < N
    if GROUPED:
        n_mask = n_mask & (offs_n * 0 + row0 < row1)  # an unused tile reads no weight bytes
    w_base = w_ptr + e * swe
    s_base = s_ptr + e * sse + (offs_n // SCALE_N) * ssn  # (BN,) pointers: this column's scale row
    acc = tl.full(
        (BM, BN), 0.0, tl.float32
    )  # tl.full, a builtin: tl.zeros is a jit function the interpreted copy cannot call
    for k0 in range(0, K, BK):
        offs_k = k0 + tl.arange(0, BK)
        k_mask = offs_k < K
        x = tl.load(
            x_ptr + offs_m[:, None] * sxm + offs_k[None, :] * sxk,
            mask=m_mask[:, None] & k_mask[None, :],
            other=0.0,
        )  # (BM, BK)
        codes = tl.load(
            w_base + offs_n[None, :] * swn + offs_k[:, None] * swk,
            mask=n_mask[None, :] & k_mask[:, None],
            other=0,
        )  # (BK, BN) uint8: W^T's tile, 1 byte per weight from memory
        if DOT_FP32:  # the interpreter (its bf16 dot is wrong): same products, exact in fp32
            x = x.to(tl.float32)
        w = decode_e4m3(codes).to(x.dtype)  # exact: every e4m3 value is a bf16/fp16/fp32 value
        part = tl.dot(x, w, input_precision=PRECISION)  # (BM, BN) fp32
        scale = tl.load(s_base + (k0 // SCALE_K) * ssk, mask=n_mask, other=0.0)  # (BN,)
        acc += part * scale[None, :]
    tl.store(
        y_ptr + offs_m[:, None] * sym + offs_n[None, :] * syn,
        acc.to(y_ptr.dtype.element_ty),
        mask=m_mask[:, None] & n_mask[None, :],
    )
