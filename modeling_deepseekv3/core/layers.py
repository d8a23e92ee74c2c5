"""Small building blocks shared by attention, MoE and MTP: RMSNorm, the linear factory, SwiGLU MLP."""

from __future__ import annotations

import torch
from torch import nn
from transformers.activations import ACT2FN

from ..fp8 import FP8Linear

__all__ = ["RMSNorm", "SwiGLUMLP", "make_linear"]


class RMSNorm(nn.Module):
    """``w * x / sqrt(mean(x^2) + eps)``; normalized in float32, cast back, then scaled (docs/deepseek_v3.md §7)."""

    def __init__(self, hidden_size: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.variance_epsilon)
        return self.weight * x.to(dtype)

    def extra_repr(self) -> str:
        return f"{tuple(self.weight.shape)}, eps={self.variance_epsilon}"


def make_linear(config, in_features: int, out_features: int, bias: bool = False) -> nn.Module:
    """The projection type of the checkpoint: ``FP8Linear`` for FP8 checkpoints, else ``nn.Linear``.

    Used for every linear inside a decoder block (attention, dense MLP, routed and shared experts) --
    exactly the tensors the official FP8 checkpoints store as float8 (docs/deepseek_v3.md §3.2). Router, embeddings,
    heads and MTP's ``eh_proj`` are never FP8 and are built directly."""
    if config.is_fp8:
        return FP8Linear(
            in_features,
            out_features,
            bias=bias,
            block_size=config.fp8_block_size,
            compute=config.fp8_compute,
            scale_fmt=config.fp8_scale_fmt,
        )
    return nn.Linear(in_features, out_features, bias=bias)


#: torch's own modules for the activations transformers marks for Hub kernels (``kernel_layer_name``). From 5.25
#: ``from_pretrained`` kernelizes every model on CUDA by default and would download ``kernels-community/activation``
#: for these at each load (failing offline: seen on an H200) to replace an elementwise op that is not where the
#: time goes. Plain torch modules leave the plugin's model nothing to kernelize.
_PLAIN_ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh")}


def activation(name: str) -> nn.Module:
    """The module for ``config.hidden_act``: torch's own where transformers' would pull a Hub kernel."""
    plain = _PLAIN_ACTIVATIONS.get(name)
    return plain() if plain is not None else ACT2FN[name]


class SwiGLUMLP(nn.Module):
    """``down_proj(act(gate_proj(x)) * up_proj(x))``: dense layers, each routed expert, the shared expert."""

    def __init__(self, config, intermediate_size: int):
        super().__init__()
        self.hidden_size = config.hidden_size
        self.intermediate_size = intermediate_size
        self.gate_proj = make_linear(config, config.hidden_size, intermediate_size)
        self.up_proj = make_linear(config, config.hidden_size, intermediate_size)
        self.down_proj = make_linear(config, intermediate_size, config.hidden_size)
        self.act_fn = activation(config.hidden_act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))
