"""``FP8Linear``: a linear layer whose weight stays float8_e4m3fn with its 128x128 block scales.

The format is in :mod:`.format`; the CPU kernels (and their reference twins) in :mod:`.kernels`; the GPU
kernels and the backend choice in :mod:`.gpu`. This module picks, per call, how an FP8 linear computes: the
dequantize-then-``F.linear`` reference, or, for inference, the backend ``fp8_compute`` resolves to on the
weight's device (``native`` on CPU, ``scaled_mm`` on Hopper, ``w8a16`` on other CUDA GPUs).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import gpu
from .format import DEFAULT_BLOCK_SIZE, FP8_DTYPE, apply_keeping_dtype, block_dequantize, block_quantize, scale_shape
from .gpu import resolve_backend
from .kernels import _weight_applies, fp8_dequantize, fp8_matmul

__all__ = ["FP8Linear", "fp8_linear", "fp8_linear_backend"]


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


def fp8_linear(
    x: torch.Tensor, weight, scale_inv, block_size, bias=None, mode: str = "auto", scale_fmt: str | None = None,
    cache: dict | None = None,
) -> torch.Tensor:
    """``F.linear(x, dequant(weight))``. With autograd: the re-dequantizing autograd function (every backend).
    For inference, the backend that ``mode`` (the config's ``fp8_compute``) resolves to on the weight's
    device (:func:`~.gpu.resolve_backend`, which raises for a backend the device cannot run): ``native``
    (CPU, float32/bfloat16 input: fp32 accumulation, exact to fp32 rounding against
    :func:`~.kernels.fp8_matmul_reference`), ``scaled_mm`` (activation quantized per 1x128 tile, FP8 tensor
    cores; ``cache`` keeps the weight's cuBLAS-layout scales), ``w8a16`` (the Triton weight-only kernel).
    Otherwise, and wherever the chosen kernel does not take the shape or dtype: dequantize to ``x``'s dtype,
    then ``F.linear`` (the reference)."""
    if torch.is_grad_enabled() and x.requires_grad:
        out = _FP8LinearFunction.apply(x, weight, scale_inv, tuple(block_size))
        return out + bias.to(x.dtype) if bias is not None else out
    backend = resolve_backend(mode, weight.device)
    if backend != "dequant" and x.numel():
        x2d = x.reshape(-1, x.shape[-1])
        out = None
        if backend == "native":
            out = fp8_matmul(x2d, weight, scale_inv, block_size)
        elif x2d.dtype in (torch.bfloat16, torch.float16, torch.float32) and x2d.device == weight.device:
            if backend == "scaled_mm" and gpu.scaled_mm_weight_applies(weight, block_size):
                out = gpu.scaled_mm_linear(x2d, weight, _scaled_mm_scales(scale_inv, cache), scale_fmt)
            elif backend == "w8a16" and gpu.w8a16_weight_applies(weight, block_size):
                out = gpu.w8a16_matmul(x2d, weight, scale_inv, block_size)
        if out is not None:
            out = out.view(*x.shape[:-1], weight.shape[0])
            return out + bias.to(x.dtype) if bias is not None else out
    w = block_dequantize(weight, scale_inv, block_size, x.dtype)
    return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)


def _scaled_mm_scales(scale_inv: torch.Tensor, cache: dict | None) -> torch.Tensor:
    """The weight's scales in cuBLAS layout, prepared once per weight: kept in ``cache`` (the module's
    ``__dict__``, so not a buffer and never saved) while the scale tensor is unchanged."""
    if cache is None:
        return gpu.weight_scale_layout(scale_inv)
    key = (scale_inv.data_ptr(), scale_inv._version, scale_inv.device)
    hit = cache.get("_scaled_mm_scales")
    if hit is None or hit[0] != key:
        hit = (key, gpu.weight_scale_layout(scale_inv))
        cache["_scaled_mm_scales"] = hit
    return hit[1]


def fp8_linear_backend(module: FP8Linear) -> str:
    """The backend this FP8 linear computes with for inference (float32/bfloat16 input) where its weight is
    now: ``"native"``, ``"scaled_mm"``, ``"w8a16"`` or ``"dequant"`` (also where the resolved kernel does not
    take this weight's shape). Raises :class:`~.gpu.FP8BackendError` like a forward would."""
    w, s, block = module.weight, module.weight_scale_inv, module.block_size
    backend = resolve_backend(module.compute, w.device)
    applies = {
        "native": lambda: _weight_applies(w, s, block),
        "scaled_mm": lambda: gpu.scaled_mm_weight_applies(w, block),
        "w8a16": lambda: gpu.w8a16_weight_applies(w, block),
    }
    return backend if backend in applies and applies[backend]() else "dequant"


class FP8Linear(nn.Module):
    """A linear layer whose weight stays float8_e4m3fn with its 128x128 block scales.

    Not an ``nn.Linear`` subclass on purpose: libraries that swap ``nn.Linear`` (transformers' FP8
    quantizer, bitsandbytes) leave it alone, and nobody multiplies the raw FP8 codes without the scales.
    Parameters carry the checkpoint names (``weight``, ``weight_scale_inv``) so keys load 1:1 and
    zero-copy from mmapped shards. Neither ever requires grad.

    Compute (``compute`` attribute, from the config's ``fp8_compute``): ``"dequant"`` block-dequantizes the
    weight to the input's dtype and multiplies with ``F.linear`` (the official demo's default
    ``gemm_impl="bf16"`` path, spec §4.4; in BF16 the weight is rounded to BF16 first, as
    ``fp8_cast_bf16`` does) -- the reference, and what every backend does under autograd. For inference,
    ``"native"`` is the CPU kernel of :mod:`.native` (reads the FP8 weight directly, fp32 accumulation),
    ``"scaled_mm"`` and ``"w8a16"`` the GPU paths of :mod:`.gpu`; ``"auto"`` picks one by the weight's
    device (:func:`~.gpu.resolve_backend`); :func:`fp8_linear_backend` says which one this module uses.

    Casting: ``model.to(torch.bfloat16)`` / ``.half()`` / ``.float()`` leave this module's weight in
    float8 and its scale in float32 (device moves apply as usual). Use ``dequantize_fp8=True`` or
    ``deepseek-v3 convert`` to get dense weights.
    """

    # transformers' tensor parallelism hands this module its local shards of ``weight`` and ``weight_scale_inv``
    # (sharded together, whole 128-blocks: checked after loading) and local activations; forward works on the
    # shapes it is given.
    _hf_quantized_needs_local_tp = True

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
        """The dense ``[out, in]`` weight in ``dtype`` (exactly :func:`~.format.block_dequantize`'s; natively
        on CPU)."""
        return fp8_dequantize(self.weight, self.weight_scale_inv, self.block_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(
            x, self.weight, self.weight_scale_inv, self.block_size, self.bias, self.compute, self.scale_fmt, self.__dict__
        )

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
