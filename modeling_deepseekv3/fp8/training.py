"""DeepSeek-V3's FP8 mixed-precision training recipe (report §3.3), applied from outside with one call.

``convert_to_fp8_training(model)`` swaps every linear inside the decoder blocks (attention projections,
dense MLPs, shared and routed experts, the MTP block including ``eh_proj``) for an :class:`FP8TrainingLinear`
that keeps the module's own ``weight`` parameter -- the high-precision master, fp32 or bf16 as the model
holds it -- under its checkpoint name. What the paper keeps in high precision is never touched: the
embeddings, ``lm_head`` and ``shared_head.head``, the router ``gate`` and its bias, the norms, and the
attention core (scores and softmax). ``convert_from_fp8_training`` puts the original modules back.

The three GEMMs of a linear ``Y = X W^T`` (shapes: X ``[T, K]`` tokens x inputs, W ``[N, K]``):

* Fprop ``Y = Q_1x128(X) . Q_128x128(W)^T``: activations in 1x128 tiles (per token, 128 consecutive input
  channels), weights in 128x128 blocks.
* Dgrad ``dX = Q_1x128(dY) . Q_128x128(W)``: output gradients in 1x128 tiles along the output channels --
  never 128x128 blocks (the report's appendix: that made a 16B MoE diverge).
* Wgrad ``dW = Q_128x1(dY)^T . Q_128x1(X)``: both operands tiled along the tokens (the contraction), 128 per
  tile; ``X`` here is the FP8 input saved by the forward (1x128), dequantized and re-tiled, as DeepSeek does.

Each tile/block gets ``scale = amax / 448`` computed online (rounded up to a power of two for the activation
tiles by default, and for everything with ``scale_fmt="ue8m0"``), values rounded to nearest ``float8_e4m3fn``; partial tiles at the edges work as in the weight format.
Every GEMM accumulates in fp32 across the 128-wide K blocks (DeepSeek promotes tensor-core partial sums to
fp32 every 128 elements; on CPU the whole accumulation is fp32, so the H800's ~14-bit in-MMA accumulation is
*not* reproduced -- the emulation is the recipe's exact arithmetic with ideal accumulation). Outputs are in the
model's dtype; the weight gradient is computed in fp32 and handed to the master weight in its dtype. For the
backward only the FP8 input and its scales are kept, not the high-precision input (the memory the paper saves).

Backends: ``"emulated"`` (any device, the reference twin: real FP8 operands, dequantized per block and
multiplied in fp32) and ``"cuda"`` (SM90: ``torch.nn.functional.scaled_mm`` with BlockWise1x128 /
BlockWise128x128 scales, through the GEMM wrapper FP8 inference uses, :func:`.scaled_mm.blockwise_scaled_mm`; torch
implements these scale recipes on SM90 only); ``"auto"`` picks CUDA where it can run.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from . import scaled_mm
from .format import SCALE_FORMATS, block_dequantize, block_quantize
from .linear import FP8Linear

__all__ = [
    "FP8TrainingLinear",
    "FP8TrainingRecipe",
    "convert_from_fp8_training",
    "convert_to_fp8_training",
    "fp8_training_modules",
    "fp8_training_recipe",
]

TILE = 128
BACKENDS = ("auto", "emulated", "cuda")


@dataclass(frozen=True)
class FP8TrainingRecipe:
    """The knobs of the recipe; the defaults are DeepSeek-V3's.

    ``tile``: activation / gradient tile length (1 x tile for Fprop and Dgrad inputs, tile x 1 for Wgrad)
        and weight block side (tile x tile). 128 in the report.
    ``scale_fmt``: scales of the weight blocks and gradient tiles: ``None`` (float32, V3) or ``"ue8m0"``
        (powers of two, V3.1 / DeepGEMM on SM100).
    ``activation_scale_fmt``: scales of the activation tiles, ``"ue8m0"`` by default: DeepSeek caches these
        inputs for the backward with power-of-two scales, so re-tiling them from 1x128 to 128x1 for the Wgrad is
        an exponent shift, exact (measured on K=2048: dW SQNR 31.7 dB, against 28.8 dB with float32 scales,
        whose re-tiling rounds a second time).
    ``backend``: ``"auto"`` | ``"emulated"`` | ``"cuda"`` (module docstring).
    ``save_fp8_input``: keep only ``Q_1x128(X)`` for the backward (the report's choice). False keeps the
        high-precision input instead (more memory, Wgrad quantizes the original ``X``).
    """

    tile: int = TILE
    scale_fmt: str | None = None
    activation_scale_fmt: str | None = "ue8m0"
    backend: str = "auto"
    save_fp8_input: bool = True

    def __post_init__(self):
        for name in ("scale_fmt", "activation_scale_fmt"):
            if getattr(self, name) not in SCALE_FORMATS:
                raise ValueError(f"FP8TrainingRecipe.{name} must be None or 'ue8m0', got {getattr(self, name)!r}.")
        if self.backend not in BACKENDS:
            raise ValueError(f"FP8TrainingRecipe.backend must be one of {BACKENDS}, got {self.backend!r}.")
        if not isinstance(self.tile, int) or self.tile < 1:
            raise ValueError(f"FP8TrainingRecipe.tile must be a positive integer, got {self.tile!r}.")


# ---------------------------------------------------------------------------------------------------- GEMMs
def _quantize(x: torch.Tensor, block: tuple[int, int], scale_fmt) -> tuple[torch.Tensor, torch.Tensor]:
    """``x [R, C]`` -> (float8 codes, float32 scales ``[ceil(R/br), ceil(C/bc)]``): amax/448 per block."""
    return block_quantize(x, block, scale_fmt)


def _gemm_emulated(a_q, a_s, a_block, b_q, b_s, b_block, out_dtype):
    """``A @ B^T`` of two block-scaled FP8 operands (``A [M, K]``, ``B [N, K]``, each with its own block shape),
    exact in fp32: every product of FP8 values and block scales is exact in fp32 and the K-blocks are summed in
    fp32, which is DeepSeek's promotion every 128 elements with an ideal (fp32) accumulator."""
    a = block_dequantize(a_q, a_s, a_block, torch.float32)
    b = block_dequantize(b_q, b_s, b_block, torch.float32)
    return (a @ b.t()).to(out_dtype)


def _gemm_cuda(a_q, a_s, a_block, b_q, b_s, b_block, out_dtype):
    """The same GEMM on FP8 tensor cores: :func:`.scaled_mm.blockwise_scaled_mm`, the wrapper inference uses
    too, with the scales laid out for cuBLAS (:func:`.scaled_mm.prepare_scales`). ``a_block`` is always 1x128."""
    return scaled_mm.blockwise_scaled_mm(
        a_q, scaled_mm.prepare_scales(a_s, a_block), b_q, scaled_mm.prepare_scales(b_s, b_block), b_block, out_dtype
    )


def _pick_gemm(recipe: FP8TrainingRecipe, device: torch.device):
    backend = recipe.backend
    if backend == "auto":
        backend = "cuda" if scaled_mm.scaled_mm_supported(device) and recipe.tile == TILE else "emulated"
    return _gemm_cuda if backend == "cuda" else _gemm_emulated


def check_backend(recipe: FP8TrainingRecipe, device: torch.device) -> None:
    """Refuse the CUDA backend where it cannot run, before any training step."""
    if recipe.backend != "cuda":
        return
    if device.type != "cuda" or not torch.cuda.is_available():
        raise ValueError(
            f"FP8TrainingRecipe(backend='cuda') needs the model on a CUDA GPU with torch's block-scaled FP8 GEMM "
            f"(Hopper, SM90), but it is on {device}. Use backend='emulated' (exact, any device) or 'auto'."
        )
    if not scaled_mm.scaled_mm_supported(device) or recipe.tile != TILE:
        major, minor = torch.cuda.get_device_capability(device)
        raise ValueError(
            f"FP8TrainingRecipe(backend='cuda'): {torch.cuda.get_device_name(device)} (SM{major}{minor}, CUDA "
            f"{torch.version.cuda}) lacks torch's 1x128 / 128x128 block-scaled scaled_mm (SM90 with CUDA >= 12.9), "
            f"or the tile is not {TILE}. Use backend='emulated'."
        )


class _FP8TrainingMatmul(torch.autograd.Function):
    """``Y = X W^T`` with the three GEMMs of the recipe (module docstring). ``x [T, K]``, ``weight [N, K]``."""

    @staticmethod
    def forward(ctx, x, weight, recipe: FP8TrainingRecipe):
        t = recipe.tile
        gemm = _pick_gemm(recipe, x.device)
        x_q, x_s = _quantize(x, (1, t), recipe.activation_scale_fmt)  # 1 x 128 along K
        w_q, w_s = _quantize(weight, (t, t), recipe.scale_fmt)  # 128 x 128
        y = gemm(x_q, x_s, (1, t), w_q, w_s, (t, t), x.dtype)  # (T, N)
        if recipe.save_fp8_input:
            ctx.save_for_backward(x_q, x_s, weight)
        else:
            ctx.save_for_backward(x, weight)
        ctx.recipe, ctx.x_dtype = recipe, x.dtype
        return y

    @staticmethod
    def backward(ctx, grad_out):
        recipe = ctx.recipe
        t = recipe.tile
        gemm = _pick_gemm(recipe, grad_out.device)
        if recipe.save_fp8_input:
            x_q, x_s, weight = ctx.saved_tensors
            x = block_dequantize(x_q, x_s, (1, t), torch.float32)  # the FP8 input, re-tiled below
        else:
            x, weight = ctx.saved_tensors
        grad_x = grad_w = None
        g = grad_out.contiguous()
        if ctx.needs_input_grad[0]:
            g_q, g_s = _quantize(g, (1, t), recipe.scale_fmt)  # 1 x 128 along N (the contraction)
            w_q, w_s = _quantize(weight, (t, t), recipe.scale_fmt)  # same blocks as the forward
            # dX = dY W: B = W^T [K, N], whose 128x128 blocks are W's transposed
            grad_x = gemm(g_q, g_s, (1, t), w_q.t().contiguous(), w_s.t().contiguous(), (t, t), ctx.x_dtype)
        if ctx.needs_input_grad[1]:
            gt_q, gt_s = _quantize(g.t(), (1, t), recipe.scale_fmt)  # dY^T [N, T]: 128 tokens per tile
            xt_q, xt_s = _quantize(x.t(), (1, t), recipe.activation_scale_fmt)  # X^T [K, T]: 128 tokens per tile
            grad_w = gemm(gt_q, gt_s, (1, t), xt_q, xt_s, (1, t), torch.float32).to(weight.dtype)  # (N, K)
        return grad_x, grad_w, None


class FP8TrainingLinear(nn.Module):
    """A bias-free linear trained with the FP8 recipe. Holds the original module's ``weight`` parameter (same
    object, same name in ``state_dict``), so optimizers, checkpoints and ``save_pretrained`` see no change;
    ``original`` is the module it replaced (restored by :func:`convert_from_fp8_training`)."""

    def __init__(self, original: nn.Linear, recipe: FP8TrainingRecipe):
        super().__init__()
        self.in_features, self.out_features = original.in_features, original.out_features
        self.weight = original.weight
        self.recipe = recipe
        object.__setattr__(self, "original", original)  # not a submodule: its weight is ours

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        y = _FP8TrainingMatmul.apply(x.reshape(-1, shape[-1]), self.weight, self.recipe)  # (T, N)
        return y.view(*shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        r = self.recipe
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, tiles=1x{r.tile}/{r.tile}x{r.tile}, "
            f"scale_fmt={r.scale_fmt}, backend={r.backend}"
        )


# ------------------------------------------------------------------------------------------------ conversion
#: Linears the recipe keeps in high precision, by checkpoint name (the output heads).
HIGH_PRECISION = (re.compile(r"(^|\.)lm_head$"), re.compile(r"\.shared_head\.head$"))


def fp8_training_modules(model) -> dict[str, FP8TrainingLinear]:
    return {name: m for name, m in model.named_modules() if isinstance(m, FP8TrainingLinear)}


def convert_to_fp8_training(
    model: nn.Module,
    recipe: FP8TrainingRecipe | None = None,
    exclude: Iterable[str] = (),
) -> nn.Module:
    """Swap the linears inside the decoder blocks (``model.layers.*``) for :class:`FP8TrainingLinear`; return
    ``model``. ``exclude``: regular expressions of module names to leave in high precision (each must match
    something). Raises ``ValueError`` naming the module for: a model already converted, FP8-resident
    inference weights (``FP8Linear``), a linear with a bias, an exclude pattern that matches nothing, nothing
    to convert, or the CUDA backend where it cannot run."""
    recipe = recipe or FP8TrainingRecipe()
    done = fp8_training_modules(model)
    if done:
        raise ValueError(f"the model is already converted to FP8 training (e.g. {next(iter(done))}); convert once.")
    fp8_resident = [n for n, m in model.named_modules() if isinstance(m, FP8Linear)]
    if fp8_resident:
        raise ValueError(
            f"{fp8_resident[0]} holds FP8-resident inference weights (FP8Linear): the training recipe needs "
            "high-precision master weights. Load with dequantize_fp8=True (or convert the checkpoint to BF16) "
            "first; LoRA over a frozen FP8 base is the other route (plain PEFT)."
        )
    patterns = [re.compile(p) for p in exclude]
    matched = {p.pattern: False for p in patterns}
    targets = []
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear) or ".layers." not in f".{name}":
            continue
        if any(p.search(name) for p in HIGH_PRECISION):
            continue
        hit = [p for p in patterns if p.search(name)]
        for p in hit:
            matched[p.pattern] = True
        if hit:
            continue
        if module.bias is not None:
            raise ValueError(
                f"{name} has a bias; the FP8 training linear is bias-free (as every DeepSeek-V3 projection is). "
                f"Exclude it (exclude=[{name!r}]) to keep it in high precision."
            )
        targets.append((name, module))
    unused = [p for p, hit in matched.items() if not hit]
    if unused:
        raise ValueError(f"exclude pattern {unused[0]!r} matches no linear inside the decoder blocks.")
    if not targets:
        raise ValueError("convert_to_fp8_training found no linear inside the decoder blocks to convert.")
    check_backend(recipe, targets[0][1].weight.device)
    for name, module in targets:
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, FP8TrainingLinear(module, recipe))
    model.__dict__["_fp8_training"] = recipe
    return model


def fp8_training_recipe(model: nn.Module) -> FP8TrainingRecipe | None:
    """The recipe :func:`convert_to_fp8_training` applied to ``model`` (None if it was not converted)."""
    return model.__dict__.get("_fp8_training")


def convert_from_fp8_training(model: nn.Module) -> nn.Module:
    """Put back the modules :func:`convert_to_fp8_training` replaced (same weight parameters)."""
    for name, module in fp8_training_modules(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, module.original)
    model.__dict__.pop("_fp8_training", None)
    return model
