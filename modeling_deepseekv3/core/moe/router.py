"""The aux-loss-free group-limited router of DeepSeek-V3 (docs/deepseek_v3.md §6), in float32.

Shape-suffix legend: T = tokens, D = hidden size, E = routed experts, K = experts per token, G = groups.

1. ``s = sigmoid(W_gate u)``;  2. ``s_sel = s + e_score_correction_bias`` (selection only);
3. group score = sum of the top-2 ``s_sel`` in each of the G contiguous groups;
4. keep the ``topk_group`` best groups, set the other experts' ``s_sel`` to ``-inf`` (not 0.0: with
   random or non-V3 biases ``s_sel`` can be negative and 0.0 would let masked experts win);
5. top-K experts by ``s_sel``;  6. weights from the *un-biased* ``s`` of those experts;
7. renormalize (``norm_topk_prob``) and multiply by ``routed_scaling_factor`` (2.5 for V3).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ...fp8 import apply_keeping_dtype

__all__ = ["Routing", "TopkRouter", "route_tokens"]


class Routing(NamedTuple):
    """What the router decides for T tokens. ``indices [T, K]`` (int64), ``weights [T, K]`` (float32, the
    combine weights), ``logits [T, E]`` (float32, before the sigmoid; the balance loss reads them). Losses
    get these through transformers' output recording (``output_router_logits`` / ``output_router_indices``)."""

    indices: torch.Tensor
    weights: torch.Tensor
    logits: torch.Tensor


def route_tokens(
    logits_TE: torch.Tensor,
    bias_E: torch.Tensor | None,
    *,
    top_k: int,
    n_group: int,
    topk_group: int,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pure-function router on float32 logits. Returns ``(topk_idx_TK, topk_weight_TK)``."""
    scores_TE = logits_TE.sigmoid()
    choice_TE = scores_TE if bias_E is None else scores_TE + bias_E
    t, e = choice_TE.shape
    if n_group > 1 and topk_group < n_group:
        group_TG = choice_TE.view(t, n_group, e // n_group).topk(2, dim=-1, sorted=False).values.sum(dim=-1)
        keep_TG = torch.zeros_like(group_TG, dtype=torch.bool)
        keep_TG.scatter_(1, group_TG.topk(topk_group, dim=-1, sorted=False).indices, True)
        keep_TE = keep_TG[:, :, None].expand(t, n_group, e // n_group).reshape(t, e)
        choice_TE = choice_TE.masked_fill(~keep_TE, float("-inf"))
    topk_idx_TK = choice_TE.topk(top_k, dim=-1, sorted=False).indices
    weight_TK = scores_TE.gather(1, topk_idx_TK)
    if norm_topk_prob and top_k > 1:
        weight_TK = weight_TK / (weight_TK.sum(dim=-1, keepdim=True) + 1e-20)
    return topk_idx_TK, weight_TK * routed_scaling_factor


class TopkRouter(nn.Module):
    """``mlp.gate``: router weight ``[E, D]`` and the float32 ``e_score_correction_bias [E]``.

    Both are kept in float32 (the checkpoint stores the weight in BF16, the bias in FP32; BF16 spacing
    near the V3 bias values, ~2.0, is 0.0156 -- larger than typical score gaps, spec trap 6). The bias is
    a buffer: it is updated by the aux-loss-free balancing rule, never by gradients."""

    def __init__(self, config):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.n_routed_experts = config.n_routed_experts
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.norm_topk_prob = config.norm_topk_prob
        self.routed_scaling_factor = float(config.routed_scaling_factor)
        self.weight = nn.Parameter(torch.empty(config.n_routed_experts, config.hidden_size, dtype=torch.float32))
        self.register_buffer(
            "e_score_correction_bias", torch.zeros(config.n_routed_experts, dtype=torch.float32), persistent=True
        )

    def _apply(self, fn, recurse=True):
        apply_keeping_dtype(self, fn, ("weight", "e_score_correction_bias"))
        return self

    def forward(self, x_TD: torch.Tensor) -> Routing:
        logits_TE = F.linear(x_TD.float(), self.weight.float())
        idx_TK, weight_TK = route_tokens(
            logits_TE,
            self.e_score_correction_bias.float(),
            top_k=self.top_k,
            n_group=self.n_group,
            topk_group=self.topk_group,
            norm_topk_prob=self.norm_topk_prob,
            routed_scaling_factor=self.routed_scaling_factor,
        )
        return Routing(idx_TK, weight_TK, logits_TE)
