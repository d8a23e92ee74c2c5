"""Expert parallelism for training: ``pretrain --ep N`` under ``torchrun``, applied from outside the model; the
gradient averaging of data ranks that hold whole weights (``--ep``, ``--pp``); and expert-parallel inference for
``from_pretrained(..., distributed_config=DistributedConfig(ep_size=N, ...))`` (end of the module).

Shape-suffix legend: T = tokens, D = hidden size, K = experts per token, A = assignments (rows), E = routed
experts, L = experts held per rank (E / N), R = expert-parallel ranks.

The N ranks of an expert-parallel group -- N consecutive data-parallel ranks; with ``--dp D`` there are D / N
groups, each holding a copy of the experts -- split every global batch between them (data parallel for the
dense weights, which each rank holds whole) and each holds 1/N of every MoE layer's routed experts: the rank at
position r of its group owns experts ``[r L, (r + 1) L)``. Each
MoE layer's dispatcher (:class:`ExpertParallelDispatcher`, put into the model's dispatch seam
``mlp.dispatcher``) sorts the local token-expert assignments by expert -- which also groups them by owning
rank --, sends every row to its expert's owner with one all-to-all, and brings the outputs back with another;
the weighted combine then runs where the tokens live, accumulating in float32 (rows travel in the compute
dtype: BF16 in BF16 training, as the report's combine). The model code never knows: ``experts(x_AD,
counts_E)`` receives rows sorted by expert and counts that are zero for the experts held elsewhere.

Gradients, as one process would compute them for the same global batch (tested against it):

* a held expert's gradient arrives summed over the rows of every rank of its group (the all-to-all's backward
  sends the row gradients home), is summed over the expert's replicas, and divided by the number of data ranks
  -- each rank's loss is the mean over its share of the batch;
* the dense weights' gradients are averaged over the data ranks (:func:`sync_gradients`, one flat all-reduce).

Expert modules a rank does not hold are replaced by :class:`RemoteExpert` (no parameters): parameter names stay
the single-process ones, so checkpoints (``torch.distributed.checkpoint``) resume on any layout and the
exported model is the one a single process trains. Under ``--pp`` the expert-parallel groups are made of the
data ranks of one pipeline position; all of them run the same schedule, so their all-to-alls pair in order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from ..core.moe.dispatch import DispatchPlan, LocalDispatcher

__all__ = [
    "ExpertParallelDispatcher",
    "ExpertParallelError",
    "RemoteExpert",
    "SharedBatchExpertDispatcher",
    "apply_expert_parallel",
    "expert_parallel_inference_ranks",
    "expert_parameters",
    "replicated_parameters",
    "shard_experts_for_inference",
    "sync_gradients",
]


class ExpertParallelError(ValueError):
    """An expert-parallel layout that cannot run; the message names the flag and what to change."""


class _AllToAll(torch.autograd.Function):
    """Rows ``[sum(in_splits), ...]`` exchanged over ``group`` into ``[sum(out_splits), ...]``; backward sends
    the row gradients back the same way, over ``backward_group`` (the same ranks, another communicator: a
    backward running beside a forward -- DualPipeV's overlapped pairs -- must not interleave its collectives
    with the forward's on one communicator, where the ranks could pair them in different orders)."""

    @staticmethod
    def forward(ctx, x, out_splits: list[int], in_splits: list[int], group, backward_group):
        ctx.splits, ctx.group = (out_splits, in_splits), backward_group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad):
        out_splits, in_splits = ctx.splits
        grad_in = grad.new_empty(sum(in_splits), *grad.shape[1:])
        dist.all_to_all_single(grad_in, grad.contiguous(), in_splits, out_splits, group=ctx.group)
        return grad_in, None, None, None, None


@dataclass
class _ExpertParallelPlan:
    local: DispatchPlan  # how the local assignments map to tokens
    inverse_A: torch.Tensor  # received-order position of each row the experts saw
    send_splits: list[int]  # rows sent to each rank
    recv_splits: list[int]  # rows received from each rank


class ExpertParallelDispatcher:
    """``dispatch``/``combine`` of :class:`~modeling_deepseekv3.core.moe.dispatch.LocalDispatcher`'s contract across
    the ranks of ``group`` (module docstring)."""

    def __init__(self, num_experts: int, ranks: int, rank: int, group, backward_group=None):
        self.num_experts, self.ranks, self.rank, self.group = num_experts, ranks, rank, group
        self.backward_group = backward_group if backward_group is not None else group
        self.per_rank = num_experts // ranks
        self.local = LocalDispatcher(num_experts)

    def dispatch(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor):
        x_AD, counts_E, plan = self.local.dispatch(x_TD, idx_TK, weight_TK)  # sorted by expert = by owner
        send_RL = counts_E.view(self.ranks, self.per_rank)  # rows for each (owner, its expert)
        recv_RL = torch.empty_like(send_RL)  # rows from each (source rank, my expert)
        dist.all_to_all_single(recv_RL, send_RL, group=self.group)
        send, recv = send_RL.sum(1).tolist(), recv_RL.sum(1).tolist()
        x_recv = _AllToAll.apply(
            x_AD, recv, send, self.group, self.backward_group
        )  # grouped by source rank, then by expert
        # regroup by expert (then source rank), as the experts read them
        device = recv_RL.device
        expert_of_row = (
            torch.arange(self.per_rank, device=device).repeat(self.ranks).repeat_interleave(recv_RL.flatten())
        )
        order = expert_of_row.argsort(stable=True)
        inverse = torch.empty_like(order)
        inverse[order] = torch.arange(order.numel(), device=device)
        counts_mine_E = torch.zeros_like(counts_E)
        counts_mine_E[self.rank * self.per_rank : (self.rank + 1) * self.per_rank] = recv_RL.sum(0)
        return x_recv.index_select(0, order), counts_mine_E, _ExpertParallelPlan(plan, inverse, send, recv)

    def combine(self, y_AD: torch.Tensor, plan: _ExpertParallelPlan, dtype: torch.dtype) -> torch.Tensor:
        y_recv = y_AD.index_select(0, plan.inverse_A)  # back to the received order
        y_home = _AllToAll.apply(
            y_recv, plan.send_splits, plan.recv_splits, self.group, self.backward_group
        )  # in the sorted local order
        return self.local.combine(y_home, plan.local, dtype)


class RemoteExpert(nn.Module):
    """Stands in for a routed expert held by another rank: no parameters, never called (its count here is
    always zero)."""

    def __init__(self, expert: int, owner: int):
        super().__init__()
        self.expert, self.owner = expert, owner

    def forward(self, x):
        raise RuntimeError(
            f"routed expert {self.expert} lives on expert-parallel rank {self.owner}; rows for it "
            "must be dispatched there (ExpertParallelDispatcher)."
        )

    def extra_repr(self) -> str:
        return f"expert={self.expert}, owner={self.owner}"


def _moe_layers(model):
    from ..core.moe.layer import DeepseekV3MoE

    return [m for m in model.modules() if isinstance(m, DeepseekV3MoE)]


def apply_expert_parallel(model, layout):
    """Shard every MoE layer's routed experts over ``layout``'s data ranks (``--ep``) and put the all-to-all
    dispatcher into each layer's dispatch seam. The model must hold its initial weights (the same on every rank:
    same seed). Returns the model."""
    ep = layout.ep
    if ep == 1:
        return model
    n_experts = model.config.n_routed_experts
    if n_experts % ep:
        raise ExpertParallelError(
            f"--ep {ep}: the model's {n_experts} routed experts do not divide over {ep} ranks; "
            f"choose --ep among the divisors of {n_experts}."
        )
    per_rank, mine = n_experts // ep, layout.ep_rank
    # (the backward's all-to-alls use a second communicator of the same ranks: see _AllToAll)
    group, backward_group = layout.groups["ep"], layout.groups["ep_backward"]
    for moe in _moe_layers(model):
        moe.experts.grouped = False  # the stacked inference buffers would need every expert
        for e in range(n_experts):
            if e // per_rank != mine:
                moe.experts[e] = RemoteExpert(e, e // per_rank)
        moe.dispatcher = ExpertParallelDispatcher(n_experts, ep, mine, group, backward_group)
    return model


def expert_parameters(model) -> set[int]:
    """``id``s of the routed-expert parameters this rank holds (each by one rank of every expert-parallel group)."""
    from ..core.moe.experts import RoutedExperts

    return {id(p) for m in model.modules() if isinstance(m, RoutedExperts) for p in m.parameters()}


def replicated_parameters(model, layout) -> set[int]:
    """``id``s of the parameters held here whose gradient norm another rank counts: every replica but one
    (dense weights: data rank 0 counts them; experts: the first copy of the group)."""
    experts = expert_parameters(model)
    params = [p for p in model.parameters() if p.requires_grad]
    out = {id(p) for p in params if id(p) not in experts} if layout.data_rank != 0 else set()
    if layout.replica != 0:
        out |= {id(p) for p in params if id(p) in experts}
    return out


def sync_gradients(model, layout) -> None:
    """Make this rank's gradients the single-process ones (module docstring) where data ranks hold whole weights:
    dense gradients averaged over the data ranks, held experts' gradients summed over their replicas and
    divided by the number of data ranks. Flat all-reduces; a parameter without a gradient on some rank counts as
    zero there and gets one only where any rank had one."""
    if layout.data == 1 or layout.sharded:
        return
    experts = expert_parameters(model) if layout.ep > 1 else set()  # (without --ep experts are dense weights)
    params = list({id(p): p for p in model.parameters() if p.requires_grad}.values())
    _average(([p for p in params if id(p) not in experts]), layout.data_group, layout.data)
    expert_params = [p for p in params if id(p) in experts]
    if layout.dp > layout.ep > 1:
        _average(expert_params, layout.groups["replica"], layout.data)
    else:
        for p in expert_params:
            if p.grad is not None:
                p.grad.div_(layout.data)


def _average(params: list, group, divisor: int) -> None:
    """``grad = sum over group of grad / divisor``, one flat all-reduce (missing gradients count as zero)."""
    if not params:
        return
    flat = torch.cat(
        [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1).float() for p in params]
        + [torch.tensor([float(p.grad is not None) for p in params])]
    )
    dist.all_reduce(flat, group=group)
    seen = flat[-len(params) :]
    start = 0
    for p, has in zip(params, seen.tolist()):
        n = p.numel()
        if has:
            g = flat[start : start + n].view_as(p).div_(divisor).to(p.dtype)
            if p.grad is None:
                p.grad = g.clone()
            else:
                p.grad.copy_(g)
        start += n


# ---------------------------------------------------------------------------------------- inference
class SharedBatchExpertDispatcher:
    """Expert-parallel *inference* where every rank of ``group`` runs the same batch (``generate()`` under
    torchrun, as transformers' ``"all_reduce"`` EP implementation assumes): each rank runs only the rows routed
    to the experts it holds and the weighted partial outputs are summed over the ranks (one float32 all-reduce
    per MoE layer). No all-to-all, no duplicated expert work; the dense layers compute on every rank."""

    def __init__(self, num_experts: int, ranks: int, rank: int, group):
        self.ranks, self.rank, self.group = ranks, rank, group
        self.per_rank = num_experts // ranks
        self.local = LocalDispatcher(num_experts)

    def dispatch(self, x_TD: torch.Tensor, idx_TK: torch.Tensor, weight_TK: torch.Tensor):
        if torch.is_grad_enabled() and x_TD.requires_grad:
            raise RuntimeError(
                "expert parallelism loaded with distributed_config=DistributedConfig(ep_size=...) is "
                "for inference; train with `deepseek-v3 pretrain --ep N`."
            )
        x_AD, counts_E, plan = self.local.dispatch(x_TD, idx_TK, weight_TK)  # sorted by expert = by owner
        lo, hi = self.rank * self.per_rank, (self.rank + 1) * self.per_rank
        start, end = int(counts_E[:lo].sum()), int(counts_E[:hi].sum())  # this rank's experts: one slice
        mine_E = torch.zeros_like(counts_E)
        mine_E[lo:hi] = counts_E[lo:hi]
        mine = DispatchPlan(plan.token_A[start:end], plan.weight_A1[start:end], plan.num_tokens)
        return x_AD[start:end], mine_E, mine

    def combine(self, y_AD: torch.Tensor, plan: DispatchPlan, dtype: torch.dtype) -> torch.Tensor:
        partial_TD = self.local.combine(y_AD, plan, torch.float32)  # (T, D) this rank's experts' share
        dist.all_reduce(partial_TD, group=self.group)
        return partial_TD.to(dtype)


def expert_parallel_inference_ranks(distributed_config) -> int:
    """The expert-parallel size ``from_pretrained(..., distributed_config=...)`` asks for (1: none), checked:
    experts over all ranks of the run, dense modules replicated. Raises ``ValueError`` naming the fix."""
    import os

    ep = int(getattr(distributed_config, "ep_size", 1) or 1)
    if ep == 1:
        return 1
    world = int(os.environ.get("WORLD_SIZE", "1"))
    tp_plan = getattr(distributed_config, "tp_plan", None)
    if ep != world or tp_plan not in ({}, None) or (getattr(distributed_config, "pp_size", 1) or 1) > 1:
        raise ValueError(
            f"distributed_config ep_size={ep}: this model shards its routed experts over all {world} ranks of the "
            "run with the dense modules replicated; use DistributedConfig(tp_size=WORLD, ep_size=WORLD, tp_plan={}) "
            "under torchrun (or tp_plan='auto' for tensor parallelism instead)."
        )
    return ep


def shard_experts_for_inference(model, ranks: int) -> None:
    """Keep only this rank's 1/``ranks`` of every MoE layer's routed experts (the others become
    :class:`RemoteExpert`, so their weights are never loaded) and put :class:`SharedBatchExpertDispatcher` into
    each layer's dispatch seam. Starts the process group torchrun set up if nobody has."""
    if not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    n_experts = model.config.n_routed_experts
    if n_experts % ranks:
        raise ExpertParallelError(
            f"ep_size={ranks}: the model's {n_experts} routed experts do not divide over "
            f"{ranks} ranks; choose a divisor of {n_experts}."
        )
    per_rank, rank = n_experts // ranks, dist.get_rank()
    for moe in _moe_layers(model):
        moe.experts.grouped = False
        for e in range(n_experts):
            if e // per_rank != rank:
                moe.experts[e] = RemoteExpert(e, e // per_rank)
        moe.dispatcher = SharedBatchExpertDispatcher(n_experts, ranks, rank, dist.group.WORLD)
