"""The slow, obviously correct twin of the MoE layer: token by token, expert by expert."""

from __future__ import annotations

import torch

__all__ = ["moe_reference"]


def moe_reference(moe, hidden_states: torch.Tensor) -> torch.Tensor:
    """What :class:`~.layer.DeepseekV3MoE` computes, with no sorting, stacking or batching."""
    shape = hidden_states.shape
    x_TD = hidden_states.reshape(-1, shape[-1])
    idx_TK, weight_TK, _ = moe.gate(x_TD)
    rows = []
    for t in range(x_TD.shape[0]):
        acc = torch.zeros(x_TD.shape[-1], dtype=torch.promote_types(x_TD.dtype, torch.float32), device=x_TD.device)
        for j in range(idx_TK.shape[1]):
            acc += weight_TK[t, j] * moe.experts[int(idx_TK[t, j])](x_TD[t : t + 1])[0].to(acc.dtype)
        rows.append(acc.to(x_TD.dtype))
    out_TD = torch.stack(rows)
    if moe.shared_experts is not None:
        out_TD = out_TD + moe.shared_experts(x_TD)
    return out_TD.view(shape)
