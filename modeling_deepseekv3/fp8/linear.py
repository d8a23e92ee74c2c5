"""``FP8Linear``: a linear layer whose weight stays float8_e4m3fn with its 128x128 block scales.

The format is in :mod:`.format`; the backends in files named for them (:mod:`.cpu`, :mod:`.scaled_mm`,
:mod:`.w8a16`), their reference twins in :mod:`.reference`. Which backend a call uses is not decided here:
:func:`~.dispatch.choose_backend` answers, and this module runs what it names.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu, dispatch, scaled_mm, w8a16
from .format import DEFAULT_BLOCK_SIZE, FP8_DTYPE, apply_keeping_dtype, block_dequantize, block_quantize, scale_shape

__all__ = [
    "FP8Linear",
    "fp8_backends",
    "fp8_grouped_matmul",
    "fp8_head_matmul",
    "fp8_linear",
    "fp8_linear_backend",
    "fp8_native_experts",
    "fp8_native_linear",
    "fp8_native_takes",
    "set_fp8_compute",
]


class _FP8LinearFunction(torch.autograd.Function):
    """``x @ dequant(W).T`` whose backward re-dequantizes ``W`` instead of keeping the dense copy: autograd
    would otherwise save the dequantized weight of every FP8 layer for the backward pass (4 bytes per
    parameter in FP32 -- more memory than a dense model, whose weights are saved by reference). The dequantized
    weight is :func:`~.cpu.fp8_dequantize`'s: bit-identical to :func:`~.format.block_dequantize`, by the native
    kernel on the CPU (LoRA over a Moonlight-sized FP8 base dequantizes 15G weights twice a step: eager torch's
    conversion made that most of the step)."""

    @staticmethod
    def forward(ctx, x, weight, scale_inv, block_size):
        ctx.save_for_backward(weight, scale_inv)
        ctx.block_size = block_size
        return F.linear(x, cpu.fp8_dequantize(weight, scale_inv, block_size, x.dtype))

    @staticmethod
    def backward(ctx, grad_out):
        weight, scale_inv = ctx.saved_tensors
        w = cpu.fp8_dequantize(weight, scale_inv, ctx.block_size, grad_out.dtype)
        return grad_out @ w, None, None, None


def fp8_linear(
    x: torch.Tensor,
    weight,
    scale_inv,
    block_size,
    bias=None,
    mode: str = "auto",
    scale_fmt: str | None = None,
    cache: dict | None = None,
) -> torch.Tensor:
    """``F.linear(x, dequant(weight))`` by the backend :func:`~.dispatch.choose_backend` names for this call
    (``mode`` is the config's ``fp8_compute``; a backend the weight's device cannot run raises there):
    ``"autograd"`` (the re-dequantizing autograd function), ``"native"`` (CPU, fp32 accumulation, exact to
    fp32 rounding against :func:`~.reference.fp8_matmul_reference`), ``"scaled_mm"`` (activation quantized per
    1x128 tile, FP8 tensor cores; ``cache`` keeps the weight's cuBLAS-layout scales), ``"w8a16"`` (the Triton
    weight-only kernel), or ``"dequant"``: dequantize to ``x``'s dtype, then ``F.linear`` (the reference)."""
    backend = dispatch.choose_backend(mode, weight, scale_inv, block_size, x)
    if backend == "dequant":
        w = block_dequantize(weight, scale_inv, block_size, x.dtype)
        return F.linear(x, w, bias.to(x.dtype) if bias is not None else None)
    if backend == "autograd":
        out = _FP8LinearFunction.apply(x, weight, scale_inv, tuple(block_size))
    else:
        x2d = x.reshape(-1, x.shape[-1])
        if backend == "native":
            out = cpu.native_linear(x2d, weight, scale_inv, block_size)
        elif backend == "scaled_mm":
            out = scaled_mm.scaled_mm_linear(x2d, weight, _scaled_mm_scales(scale_inv, cache), scale_fmt)
        elif backend == "w8a16":
            out = w8a16.w8a16_matmul(x2d, weight, scale_inv, block_size)
        else:
            raise ValueError(f"no FP8 linear backend named {backend!r}.")
        out = out.view(*x.shape[:-1], weight.shape[0])
    return out + bias.to(x.dtype) if bias is not None else out


def _scaled_mm_scales(scale_inv: torch.Tensor, cache: dict | None) -> torch.Tensor:
    """The weight's scales in cuBLAS layout, prepared once per weight: kept in ``cache`` (the module's
    ``__dict__``, so not a buffer and never saved) while the scale tensor is unchanged."""
    if cache is None:
        return scaled_mm.weight_scale_layout(scale_inv)
    key = (scale_inv.data_ptr(), scale_inv._version, scale_inv.device)
    hit = cache.get("_scaled_mm_scales")
    if hit is None or hit[0] != key:
        hit = (key, scaled_mm.weight_scale_layout(scale_inv))
        cache["_scaled_mm_scales"] = hit
    return hit[1]


def fp8_head_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size,
    row_stride: int,
    row_offset: int,
    rows: int,
    transpose: bool,
) -> torch.Tensor:
    """Per-group products with row ranges of one FP8 weight (the absorbed MLA's ``W_UK`` / ``W_UV`` heads on
    ``kv_b_proj``; arguments as :func:`.native.head_matmul`), for a call :func:`~.dispatch.choose_backend`
    gave to ``"native"`` for the ``"heads"`` kind: the CPU kernels are the only head kernels there are.
    Here so that the model reaches the backends only through this module and :mod:`.dispatch`."""
    return cpu.native_head_matmul(x, weight, scale_inv, block_size, row_stride, row_offset, rows, transpose)


def fp8_native_linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_size) -> torch.Tensor:
    """``x @ dequant(weight).T`` on the CPU kernels without asking :func:`~.dispatch.choose_backend` per call: the
    routed experts' plain path, which asks once per layer and checks each weight with :func:`fp8_native_takes`.
    Here so that the model reaches the backends only through this module and :mod:`.dispatch`."""
    return cpu.native_linear(x, weight, scale_inv, block_size)


def fp8_native_experts(
    x_AD: torch.Tensor, counts: list[int], weights: list[torch.Tensor], scales: list[torch.Tensor], block_size
) -> torch.Tensor:
    """SwiGLU experts on rows sorted by expert, all products on the CPU kernels in one call
    (:func:`.cpu.native_experts`): the routed experts' plain path, for weights :func:`fp8_native_takes` accepted."""
    return cpu.native_experts(x_AD, counts, weights, scales, block_size)


def fp8_native_takes(weight: torch.Tensor, scale_inv: torch.Tensor, block_size) -> bool:
    """Whether the CPU kernels read this FP8 weight (:func:`.cpu.native_weight_applies`)."""
    return cpu.native_weight_applies(weight, scale_inv, block_size)


def fp8_grouped_matmul(
    x_AK: torch.Tensor, weight_ENK: torch.Tensor, scale_E: torch.Tensor, counts_E: torch.Tensor, block_size
) -> torch.Tensor:
    """Rows sorted by expert times each expert's stacked FP8 weight (:func:`.w8a16.w8a16_grouped_matmul`), for a
    layer :func:`~.dispatch.choose_backend` gave ``"w8a16_grouped"``; also runs on CPU tensors under Triton's
    interpreter, which is how it is tested without a GPU."""
    return w8a16.w8a16_grouped_matmul(x_AK, weight_ENK, scale_E, counts_E, block_size)


def fp8_linear_backend(module: FP8Linear) -> str:
    """The backend this FP8 linear computes with for inference where its weight is now (the report's answer of
    :func:`~.dispatch.choose_backend`): ``"native"``, ``"scaled_mm"``, ``"w8a16"`` or ``"dequant"``. Raises
    :class:`~.dispatch.FP8BackendError` like a forward would."""
    return dispatch.choose_backend(module.compute, module.weight, module.weight_scale_inv, module.block_size)


class FP8Linear(nn.Module):
    """A linear layer whose weight stays float8_e4m3fn with its 128x128 block scales.

    Not an ``nn.Linear`` subclass on purpose: libraries that swap ``nn.Linear`` (transformers' FP8
    quantizer, bitsandbytes) leave it alone, and nobody multiplies the raw FP8 codes without the scales.
    Parameters carry the checkpoint names (``weight``, ``weight_scale_inv``) so keys load 1:1 and
    zero-copy from mmapped shards. Neither ever requires grad.

    Compute (``compute`` attribute, from the config's ``fp8_compute``): ``"dequant"`` block-dequantizes the
    weight to the input's dtype and multiplies with ``F.linear`` (the official demo's default
    ``gemm_impl="bf16"`` path, docs/deepseek_v3.md §4.4; in BF16 the weight is rounded to BF16 first, as
    ``fp8_cast_bf16`` does) -- the reference, and what every backend does under autograd. For inference,
    ``"native"`` is the CPU kernel of :mod:`.native` (reads the FP8 weight directly, fp32 accumulation),
    ``"scaled_mm"`` and ``"w8a16"`` the GPU paths of :mod:`.scaled_mm` and :mod:`.w8a16`; ``"auto"`` picks one
    by the weight's device. :func:`~.dispatch.choose_backend` decides per call (and falls back to the
    reference where a kernel does not take the input or weight); :func:`fp8_linear_backend` says which one
    this module uses.

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
        return cpu.fp8_dequantize(self.weight, self.weight_scale_inv, self.block_size, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fp8_linear(
            x,
            self.weight,
            self.weight_scale_inv,
            self.block_size,
            self.bias,
            self.compute,
            self.scale_fmt,
            self.__dict__,
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


# ------------------------------------------------------------------------------------------ whole models
def _fp8_linears(model) -> list[tuple[str, FP8Linear]]:
    return [(name, m) for name, m in model.named_modules() if isinstance(m, FP8Linear)]


def fp8_backends(model) -> dict[str, str]:
    """How each kind of FP8 linear in ``model`` computes for inference, where its weights are now.

    Keys are module names with layer and expert indices replaced by ``*``
    (``"model.layers.*.mlp.experts.*.down_proj"``); values are :func:`~.dispatch.choose_backend`'s ``"linear"``
    answer (``"native"``, ``"scaled_mm"``, ``"w8a16"``, ``"dequant"``), or ``"w8a16_grouped"`` for the
    projections under a module whose ``fp8_grouped_backend()`` method says it runs its experts as grouped
    kernels (the routed experts; found by that method, so this package needs no import of the model).
    ``"a|b"`` where modules of one kind differ (some layers on another device). Empty without FP8 weights.
    Raises :class:`~.dispatch.FP8BackendError` where ``fp8_compute`` names a backend a weight's device cannot
    run, as the forward would."""
    grouped = {}
    for name, module in model.named_modules():
        ask = getattr(module, "fp8_grouped_backend", None)
        if callable(ask) and (backend := ask()) is not None:
            grouped[f"{name}." if name else ""] = backend
    kinds: dict[str, set[str]] = {}
    for name, m in _fp8_linears(model):
        backend = next((b for prefix, b in grouped.items() if name.startswith(prefix)), None)
        kinds.setdefault(re.sub(r"\.\d+(?=\.|$)", ".*", name), set()).add(backend or fp8_linear_backend(m))
    return {kind: "|".join(sorted(b)) for kind, b in kinds.items()}


def set_fp8_compute(model, mode: str):
    """Switch every FP8 linear of ``model`` (and ``model.config.fp8_compute`` where there is a config) to
    ``mode``. Every weight device is checked first, so a mode one of them cannot run raises
    :class:`~.dispatch.FP8BackendError` and changes nothing. Returns ``model``."""
    if mode not in dispatch.FP8_COMPUTE_MODES:
        raise ValueError(f"fp8_compute must be one of {dispatch.FP8_COMPUTE_MODES}, got {mode!r}.")
    modules = [m for _, m in _fp8_linears(model)]
    for device in {m.weight.device for m in modules}:
        dispatch.device_backend(mode, device)
    for m in modules:
        m.compute = mode
    config = getattr(model, "config", None)
    if config is not None:
        config.fp8_compute = mode
    return model
