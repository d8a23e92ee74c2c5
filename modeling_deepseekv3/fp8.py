"""Block-scaled FP8 weights in the DeepSeek format, kept as FP8.

Format (``spec/deepseek_v3.md`` §4.1): a float8_e4m3fn weight ``W_q [M, N]`` and a float32
``weight_scale_inv [ceil(M/bm), ceil(N/bn)]`` (bm = bn = 128 in every official checkpoint). Despite the
name the scale is *multiplied*: ``W[i, j] = float32(W_q[i, j]) * S[i // bm, j // bn]``. The last block of
a dimension may be partial: V3's ``kv_a_proj_with_mqa`` is 576 rows = 4.5 blocks, and its scale row 4
covers rows 512..575 only. (transformers' own CPU dequantizer derives the block size from the grid,
``M / grid_rows``, which is wrong whenever the last block is partial; we always use the configured block
size.)

Everything here is plain torch and runs on any device; no FP8-capable GPU is needed.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "FP8_DTYPE",
    "FP8_MAX",
    "DEFAULT_BLOCK_SIZE",
    "FP8Linear",
    "block_dequantize",
    "block_quantize",
    "scale_shape",
]

FP8_DTYPE = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite float8_e4m3fn
DEFAULT_BLOCK_SIZE = (128, 128)


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
    scale = amax / FP8_MAX
    if scale_fmt == "ue8m0":
        scale = torch.exp2(torch.ceil(torch.log2(scale)))
    elif scale_fmt is not None:
        raise ValueError(f"scale_fmt must be None or 'ue8m0', got {scale_fmt!r}.")
    q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX)
    q = q.reshape(q.shape[0] * q.shape[1], q.shape[2] * q.shape[3])[:m, :n].to(FP8_DTYPE)
    return q.contiguous(), scale.contiguous()


def apply_keeping_dtype(module: nn.Module, fn, names: tuple[str, ...]) -> None:
    """Apply an ``nn.Module._apply`` conversion to the named tensors but keep their dtypes.

    ``model.to(torch.bfloat16)`` would turn float8 codes into BF16 (2x memory), round FP32 block scales,
    and round the FP32 router bias (spec trap 6); for these tensors only the device part of a
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


# ----------------------------------------------------------------------------------------------------
# Fast CPU compute: eager FP8 -> float conversion runs at ~3-6 ns per element (not vectorized), 20-60x
# the cost of the matmul it feeds. Compiled with torch.compile (inductor), the conversion is fused into
# the matmul's reduction, so the weight is read once, as one byte per element. That wins while few rows
# share the weight (decode); for more rows one dequantization amortizes and BLAS is faster. Used for
# inference on CPU; training, other devices and ``fp8_compute="dequant"`` take the eager reference path.

FUSED_MAX_ROWS = 24  # measured crossover (benchmarks/moe.py): fused 1.9 ms/row vs ~70 ms per dequant


def fp8_matmul_reference(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_size) -> torch.Tensor:
    """``x [T, N] @ dequant(weight [M, N]).T`` computed as in spec §4.3: partial sums over each 128-wide
    K block, each multiplied by its block scale, accumulated in float32. The slow, readable twin of the
    compiled kernel (same formula, eager)."""
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


def _fast_path_ok(x: torch.Tensor, mode: str) -> bool:
    if mode == "dequant" or _COMPILE_BROKEN or x.device.type != "cpu":
        return False
    return not (torch.is_grad_enabled() and x.requires_grad)


def _run_compiled(name: str, fn, *args):
    """Call the compiled ``fn``; if compilation is impossible here (no C++ compiler, ...) warn once and
    return None so the caller takes the eager path for the rest of the process."""
    global _COMPILE_BROKEN
    try:
        # one kernel per (few rows vs one row) x (aligned vs partial blocks) x ...: more variants than
        # dynamo's default limit of 8 across a model's weight shapes; beyond it dynamo would silently run
        # eager. The limit is raised only while this call runs.
        with torch._dynamo.config.patch(recompile_limit=64):
            return _compiled(name, fn)(*args)
    except Exception as exc:  # noqa: BLE001 -- any compile failure must degrade, not break inference
        _COMPILE_BROKEN = True
        warnings.warn(
            f"FP8 fast path unavailable ({type(exc).__name__}: {exc}); using eager block dequantization, which is "
            "much slower on CPU. Set fp8_compute='dequant' to silence this.",
            RuntimeWarning,
            stacklevel=3,
        )
        return None


class _FP8LinearFunction(torch.autograd.Function):
    """``x @ dequant(W).T`` whose backward re-dequantizes ``W`` instead of keeping the dense copy: autograd
    would otherwise save the dequantized weight of every FP8 layer for the backward pass (4 bytes per
    parameter in FP32 -- more memory than a dense model, whose weights are saved by reference)."""

    @staticmethod
    def forward(ctx, x, weight, scale_inv, block_size):
        ctx.save_for_backward(weight, scale_inv)
        ctx.block_size = block_size
        return F.linear(x, block_dequantize(weight, scale_inv, block_size, x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale_inv = ctx.saved_tensors
        w = block_dequantize(weight, scale_inv, ctx.block_size, grad_out.dtype)
        return grad_out @ w, None, None, None


def fp8_linear(x: torch.Tensor, weight, scale_inv, block_size, bias=None, mode: str = "auto") -> torch.Tensor:
    """``F.linear(x, dequant(weight))`` choosing the fastest exact-enough path (see above)."""
    if torch.is_grad_enabled() and x.requires_grad:
        out = _FP8LinearFunction.apply(x, weight, scale_inv, tuple(block_size))
        return out + bias.to(x.dtype) if bias is not None else out
    rows = x.numel() // x.shape[-1] if x.numel() else 0
    if 0 < rows <= FUSED_MAX_ROWS and _fast_path_ok(x, mode):
        # plain tensors, not Parameters: dynamo keeps parameter shapes static, which would recompile the
        # kernel for every weight shape (and give up after 8)
        out = _run_compiled(
            "matmul", fp8_matmul_reference, x.reshape(rows, x.shape[-1]), weight.detach(), scale_inv.detach(), block_size
        )
        if out is not None:
            out = out.view(*x.shape[:-1], weight.shape[0])
            return out + bias.to(x.dtype) if bias is not None else out
    w = block_dequantize(weight, scale_inv, block_size, x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)


class FP8Linear(nn.Module):
    """A linear layer whose weight stays float8_e4m3fn with its 128x128 block scales.

    Not an ``nn.Linear`` subclass on purpose: libraries that swap ``nn.Linear`` (transformers' FP8
    quantizer, bitsandbytes) leave it alone, and nobody multiplies the raw FP8 codes without the scales.
    Parameters carry the checkpoint names (``weight``, ``weight_scale_inv``) so keys load 1:1 and
    zero-copy from mmapped shards. Neither ever requires grad.

    Compute (``compute`` attribute, from the config's ``fp8_compute``): ``"dequant"`` block-dequantizes the
    weight to the input's dtype and multiplies with ``F.linear`` (the official demo's default
    ``gemm_impl="bf16"`` path, spec §4.4; in BF16 the weight is rounded to BF16 first, as
    ``fp8_cast_bf16`` does) -- the reference, used for training and on GPUs. ``"auto"`` additionally
    uses, for inference on CPU with few rows (decode), a compiled kernel that converts the FP8 codes inside
    the matmul (see :func:`fp8_linear`).

    Casting: ``model.to(torch.bfloat16)`` / ``.half()`` / ``.float()`` leave this module's weight in
    float8 and its scale in float32 (device moves apply as usual). Use ``dequantize_fp8=True`` or
    ``deepseek-v3 convert`` to get dense weights.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = False,
        block_size=DEFAULT_BLOCK_SIZE,
        device=None,
        dtype=None,
        compute: str = "auto",
        scale_fmt: str | None = None,
    ):
        super().__init__()
        self.compute = compute
        self.scale_fmt = scale_fmt  # "ue8m0": requantization (LoRA merge) keeps power-of-two scales
        self.compute_dtype = dtype  # read by PEFT to create adapters in the compute dtype
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = tuple(int(b) for b in block_size)
        self.weight = nn.Parameter(
            torch.empty(out_features, in_features, dtype=FP8_DTYPE, device=device), requires_grad=False
        )
        self.weight_scale_inv = nn.Parameter(
            torch.empty(scale_shape((out_features, in_features), self.block_size), dtype=torch.float32, device=device),
            requires_grad=False,
        )
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The dense ``[out, in]`` weight in ``dtype``."""
        return block_dequantize(self.weight, self.weight_scale_inv, self.block_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(x, self.weight, self.weight_scale_inv, self.block_size, self.bias, self.compute)

    @torch.no_grad()
    def set_dense_weight(self, weight: torch.Tensor, scale_fmt: str | None = None) -> None:
        """Quantize ``weight`` ([out, in], any float dtype) into this module's FP8 weight and scales."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"expected a weight of shape {(self.out_features, self.in_features)}, got {tuple(weight.shape)}."
            )
        q, s = block_quantize(weight, self.block_size, scale_fmt)
        self.weight.copy_(q.to(self.weight.device))
        self.weight_scale_inv.copy_(s.to(self.weight_scale_inv.device))

    def to_dense(self, dtype: torch.dtype) -> nn.Linear:
        """A dense ``nn.Linear`` holding the dequantized weight (used by ``dequantize_fp8``)."""
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        dense.weight = nn.Parameter(self.dequantized_weight(dtype), requires_grad=False)
        if self.bias is not None:
            dense.bias = nn.Parameter(self.bias.detach().to(dtype), requires_grad=False)
        return dense

    def _apply(self, fn, recurse=True):
        apply_keeping_dtype(self, fn, ("weight", "weight_scale_inv"))
        if self.bias is not None:
            self._parameters["bias"] = nn.Parameter(fn(self.bias), requires_grad=self.bias.requires_grad)
        return self

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"block_size={self.block_size}, bias={self.bias is not None}"
        )
