"""DeepSeekMoE: the aux-loss-free group-limited router, per-expert SwiGLU experts, the shared expert.

Shape-suffix legend: T = tokens, D = hidden size, E = routed experts, K = experts per token,
G = expert groups, A = token-expert assignments (T*K).

Routing per token (spec §6), all in float32:

1. ``s = sigmoid(W_gate u)``;  2. ``s_sel = s + e_score_correction_bias`` (selection only);
3. group score = sum of the top-2 ``s_sel`` in each of the G contiguous groups;
4. keep the ``topk_group`` best groups, set the other experts' ``s_sel`` to ``-inf`` (not 0.0: with
   random or non-V3 biases ``s_sel`` can be negative and 0.0 would let masked experts win);
5. top-K experts by ``s_sel``;  6. weights from the *un-biased* ``s`` of those experts;
7. renormalize (``norm_topk_prob``) and multiply by ``routed_scaling_factor`` (2.5 for V3).

Experts are one module each (``mlp.experts.E.{gate,up,down}_proj``) so checkpoint keys load 1:1 and
zero-copy, and Accelerate/PEFT/bitsandbytes see plain modules. Dispatch sorts the T*K assignments by
expert once and runs one batched matmul chain per *active* expert on a contiguous slice; the weighted
combine accumulates in float32. ``moe_reference`` is the slow per-token twin used by the tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .fp8 import apply_keeping_dtype
from .layers import SwiGLUMLP

__all__ = ["TopkRouter", "DeepseekV3MoE", "route_tokens", "moe_reference"]

# torch >= 2.8 ships a grouped matmul (a loop of GEMMs in C++ on CPU, one kernel on recent GPUs)
_GROUPED_MM = getattr(F, "grouped_mm", None)


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

    def forward(self, x_TD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Returns ``(topk_idx_TK, topk_weight_TK float32, router_logits_TE float32)``."""
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
        return idx_TK, weight_TK, logits_TE


class DeepseekV3MoE(nn.Module):
    """``mlp`` of a MoE layer: ``gate`` (router), ``experts.E`` (routed SwiGLU), ``shared_experts``."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.n_routed_experts = config.n_routed_experts
        self.gate = TopkRouter(config)
        self.experts = nn.ModuleList(
            SwiGLUMLP(config, config.moe_intermediate_size) for _ in range(config.n_routed_experts)
        )
        self.shared_experts = (
            SwiGLUMLP(config, config.moe_intermediate_size * config.n_shared_experts)
            if config.n_shared_experts
            else None
        )

    # training.py reads these: token counts per expert (when tracked) and the last routing (in training)
    track_load = False
    expert_load: torch.Tensor | None = None
    last_routing: tuple[torch.Tensor, torch.Tensor] | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        shape = hidden_states.shape
        x_TD = hidden_states.reshape(-1, shape[-1])
        idx_TK, weight_TK, logits_TE = self.gate(x_TD)
        if self.track_load:
            with torch.no_grad():
                counts = torch.bincount(idx_TK.flatten(), minlength=self.n_routed_experts)
                self.expert_load = counts if self.expert_load is None else self.expert_load + counts
        self.last_routing = (idx_TK, logits_TE) if self.training and torch.is_grad_enabled() else None
        out_TD = self.dispatch(x_TD, idx_TK, weight_TK)
        if self.shared_experts is not None:
            out_TD = out_TD + self.shared_experts(x_TD)
        return out_TD.view(shape)

    def dispatch(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor) -> torch.Tensor:
        """Sorted dispatch: the T*K token-expert assignments sorted by expert once, each active expert run
        on its contiguous slice (or all of them as two grouped matmuls when stacked), the weighted outputs
        summed back per token in float32."""
        t, k = idx_TK.shape
        flat_A = idx_TK.reshape(-1)
        order_A = flat_A.argsort(stable=True)
        token_A = order_A // k  # source token of each sorted assignment
        counts_E = torch.bincount(flat_A, minlength=self.n_routed_experts)
        x_AD = x_TD.index_select(0, token_A)
        w_A1 = weight_TK.reshape(-1).index_select(0, order_A)[:, None]
        active = counts_E.nonzero().flatten().tolist()  # the one host sync
        if self._stack_intact(x_TD, active):
            y_AD = self._run_stacked_experts(x_AD, counts_E)
        else:
            slices = list(zip(active, counts_E[active].tolist()))
            if all(_is_plain_expert(self.experts[e], x_TD) for e in active):
                if self._may_stack() and self.stack_experts():  # first inference call: stack once
                    y_AD = self._run_stacked_experts(x_AD, counts_E)
                else:
                    y_AD = self._run_plain_experts(x_AD, slices)
            else:
                y_AD = self._run_expert_modules(x_AD, slices)
        acc = torch.promote_types(x_TD.dtype, torch.float32)  # combine in (at least) float32
        out_TD = torch.zeros(t, x_TD.shape[-1], dtype=acc, device=x_TD.device)
        out_TD.index_add_(0, token_A, y_AD.to(acc) * w_A1.to(acc))
        return out_TD.to(x_TD.dtype)

    def _run_expert_modules(self, x_AD: torch.Tensor, slices) -> torch.Tensor:
        """Each expert through its own module call: honours FP8 weights, PEFT wrappers, Accelerate hooks and
        experts placed on other devices (their hooks move the activations; results come back here)."""
        outs, start = [], 0
        for expert_id, count in slices:
            outs.append(self.experts[expert_id](x_AD[start : start + count]).to(x_AD.device))
            start += count
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _run_plain_experts(self, x_AD: torch.Tensor, slices) -> torch.Tensor:
        """Fast path for dense, hook-free experts: per expert only the matmuls (written in place into
        shared buffers); the activation, the gating product and the combine run once over all rows."""
        a = x_AD.shape[0]
        inter = self.experts[slices[0][0]].intermediate_size
        gate_AI = x_AD.new_empty(a, inter)
        up_AI = x_AD.new_empty(a, inter)
        start = 0
        for expert_id, count in slices:
            expert, rows = self.experts[expert_id], slice(start, start + count)
            torch.mm(x_AD[rows], expert.gate_proj.weight.t(), out=gate_AI[rows])
            torch.mm(x_AD[rows], expert.up_proj.weight.t(), out=up_AI[rows])
            start += count
        h_AI = self.experts[slices[0][0]].act_fn(gate_AI).mul_(up_AI)
        y_AD = x_AD.new_empty(a, x_AD.shape[1])
        start = 0
        for expert_id, count in slices:
            rows = slice(start, start + count)
            torch.mm(h_AI[rows], self.experts[expert_id].down_proj.weight.t(), out=y_AD[rows])
            start += count
        return y_AD


    # -- grouped path --------------------------------------------------------------------------------
    @torch.no_grad()
    def stack_experts(self) -> bool:
        """Re-home the dense expert weights into two stacked buffers, ``gate_up [E, 2I, D]`` and
        ``down [E, D, I]``; each expert's parameters become views into them (names, state_dict and saving
        unchanged). Inference then runs two grouped matmuls per layer (gate and up fused) instead of three
        matmuls per active expert: measured 10-25% faster on CPU (benchmarks/moe.py). Returns False and
        changes nothing unless every expert is a dense, hook-free ``nn.Linear`` trio on one device."""
        experts = list(self.experts)
        probe = experts[0].gate_proj.weight
        self.__dict__["_stacked"] = None  # tried: not retried automatically (call again to re-stack)
        if _GROUPED_MM is None or probe.dtype not in (torch.float32, torch.bfloat16, torch.float16):
            return False
        if not all(_is_plain_expert(e, probe, for_stacking=True) for e in experts):
            return False
        n, inter, hidden = len(experts), experts[0].intermediate_size, experts[0].hidden_size
        gate_up = probe.new_empty(n, 2 * inter, hidden)
        down = probe.new_empty(n, hidden, inter)
        params = []
        for i, e in enumerate(experts):
            gate_up[i, :inter].copy_(e.gate_proj.weight)
            gate_up[i, inter:].copy_(e.up_proj.weight)
            down[i].copy_(e.down_proj.weight)
            e.gate_proj.weight = nn.Parameter(gate_up[i, :inter], requires_grad=e.gate_proj.weight.requires_grad)
            e.up_proj.weight = nn.Parameter(gate_up[i, inter:], requires_grad=e.up_proj.weight.requires_grad)
            e.down_proj.weight = nn.Parameter(down[i], requires_grad=e.down_proj.weight.requires_grad)
            params.append((e.gate_proj.weight, e.up_proj.weight, e.down_proj.weight))
        self.__dict__["_stacked"] = (gate_up, down, params)
        return True

    def _may_stack(self) -> bool:
        return (
            "_stacked" not in self.__dict__
            and getattr(self.config, "moe_grouped_experts", True)
            and not torch.is_grad_enabled()
            and _GROUPED_MM is not None
        )

    def _stack_intact(self, x: torch.Tensor, active: list[int]) -> bool:
        """Stacked, no autograd, and the active experts' parameters still the views made by
        :meth:`stack_experts` (replaced modules -- PEFT -- or moved parameters -- ``.to()``, Accelerate --
        end the stacking). Inactive experts are not read by the grouped matmul."""
        stacked = self.__dict__.get("_stacked")
        if stacked is None or torch.is_grad_enabled():
            return False
        gate_up, down, params = stacked
        if gate_up.device != x.device or gate_up.dtype != x.dtype:
            # the inputs moved or changed dtype: the weights did (plain experts match their inputs), or the
            # layer is being misused; either way the stack is stale
            self.__dict__.pop("_stacked")
            return False
        experts = self.experts._modules
        for e in active:
            m = experts[str(e)]._modules
            g, u, d = params[e]
            if (
                m["gate_proj"]._parameters["weight"] is not g
                or m["up_proj"]._parameters["weight"] is not u
                or m["down_proj"]._parameters["weight"] is not d
                or m["gate_proj"]._forward_pre_hooks
                or m["down_proj"]._forward_pre_hooks
            ):
                self.__dict__.pop("_stacked")
                return False
        return True

    def _run_stacked_experts(self, x_AD: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        gate_up, down, _ = self.__dict__["_stacked"]
        offsets = torch.cumsum(counts_E, 0, dtype=torch.int32)
        inter = down.shape[-1]
        h = _GROUPED_MM(x_AD, gate_up.transpose(1, 2), offs=offsets)  # (A, 2I)
        h = self.experts[0].act_fn(h[:, :inter]).mul_(h[:, inter:])  # (A, I)
        return _GROUPED_MM(h, down.transpose(1, 2), offs=offsets)  # (A, D)


def _is_plain_expert(expert: nn.Module, x: torch.Tensor, for_stacking: bool = False) -> bool:
    """Dense ``nn.Linear`` projections on ``x``'s device and dtype, no bias, no hooks of any kind."""
    if expert._forward_hooks or expert._forward_pre_hooks or hasattr(expert, "_hf_hook"):
        return False
    for proj in (expert.gate_proj, expert.up_proj, expert.down_proj):
        if type(proj) is not nn.Linear or proj.bias is not None or hasattr(proj, "_hf_hook"):
            return False
        if proj._forward_hooks or proj._forward_pre_hooks:
            return False
        w = proj.weight
        if w.device != x.device or w.dtype != x.dtype or w.is_meta:
            return False
        if not for_stacking and w.requires_grad and torch.is_grad_enabled():
            return False
    return True


def moe_reference(moe: DeepseekV3MoE, hidden_states: torch.Tensor) -> torch.Tensor:
    """Slow twin of :meth:`DeepseekV3MoE.forward`: token by token, expert by expert."""
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
