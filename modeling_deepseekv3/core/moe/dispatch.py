"""Token dispatch for the MoE layer: the seam where expert parallelism plugs in.

Shape-suffix legend: T = tokens, D = hidden size, K = experts per token, A = assignments (T*K),
E = routed experts.

:class:`LocalDispatcher` (single device) sorts the T*K token-expert assignments by expert once, so each
expert sees one contiguous slice of rows, and combines the expert outputs back per token, weighted, in
(at least) float32. An expert-parallel dispatcher replaces it from outside (``moe.dispatcher = ...``):
its ``dispatch`` sends rows to the ranks owning their experts (all-to-all) and its ``combine`` brings
the outputs back; the model code never knows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["DispatchPlan", "LocalDispatcher"]


@dataclass
class DispatchPlan:
    """What ``combine`` needs to undo ``dispatch``: the source token of each sorted row and its weight."""

    token_A: torch.Tensor
    weight_A1: torch.Tensor
    num_tokens: int


class LocalDispatcher:
    """Sort by expert / weighted combine, all on the local device."""

    def __init__(self, num_experts: int):
        self.num_experts = num_experts

    def dispatch(
        self, x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, DispatchPlan]:
        """Returns ``(x_AD rows sorted by expert, counts_E rows per expert, plan)``."""
        k = idx_TK.shape[1]
        flat_A = idx_TK.reshape(-1)
        order_A = flat_A.argsort(stable=True)
        token_A = order_A // k  # source token of each sorted assignment
        counts_E = torch.bincount(flat_A, minlength=self.num_experts)
        x_AD = x_TD.index_select(0, token_A)
        w_A1 = weight_TK.reshape(-1).index_select(0, order_A)[:, None]
        return x_AD, counts_E, DispatchPlan(token_A, w_A1, x_TD.shape[0])

    def combine(self, y_AD: torch.Tensor, plan: DispatchPlan, dtype: torch.dtype) -> torch.Tensor:
        """``out_TD[t] = sum over t's assignments of weight * y``, accumulated in the wider of float32 and
        ``dtype``, returned in ``dtype``."""
        acc = torch.promote_types(dtype, torch.float32)
        out_TD = torch.zeros(plan.num_tokens, y_AD.shape[-1], dtype=acc, device=y_AD.device)
        out_TD.index_add_(0, plan.token_A, y_AD.to(acc) * plan.weight_A1.to(acc))
        return out_TD.to(dtype)
