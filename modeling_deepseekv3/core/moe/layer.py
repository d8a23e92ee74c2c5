"""DeepSeekMoE (docs/deepseek_v3.md §6): the router, the routed experts, the shared expert, and the dispatch between them.

Shape-suffix legend: T = tokens, D = hidden size, K = experts per token, A = assignments (T*K).
"""

from __future__ import annotations

import torch
from torch import nn

from ..layers import SwiGLUMLP
from .dispatch import LocalDispatcher
from .experts import RoutedExperts
from .router import TopkRouter

__all__ = ["DeepseekV3MoE"]


class DeepseekV3MoE(nn.Module):
    """``mlp`` of a MoE layer: ``gate`` (router), ``experts.E`` (routed SwiGLU), ``shared_experts``.

    ``dispatcher`` (not a module, no weights) moves rows between tokens and experts; expert parallelism
    swaps it from outside."""

    def __init__(self, config):
        super().__init__()
        self.n_routed_experts = config.n_routed_experts
        self.gate = TopkRouter(config)
        self.experts = RoutedExperts(config)
        self.shared_experts = (
            SwiGLUMLP(config, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )
        self.dispatcher = LocalDispatcher(config.n_routed_experts)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, shape[-1])
        idx_TK, weight_TK, _ = self.gate(x_TD)
        x_AD, counts_E, plan = self.dispatcher.dispatch(x_TD, idx_TK, weight_TK)
        y_AD = self.experts(x_AD, counts_E)
        out_TD = self.dispatcher.combine(y_AD, plan, x_TD.dtype)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        return out_TD.view(shape)
