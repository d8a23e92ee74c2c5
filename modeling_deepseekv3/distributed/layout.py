"""Where this process sits among the training ranks (:class:`Layout`), and what a training step needs from all
of them: averaged figures, a gradient norm over all ranks, the trained model gathered on rank 0.

The helpers live on the layout because they are questions about it (which ranks hold what); the parallelisms
in :mod:`.parallelize` and the pretraining loop ask them, never each other.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = [
    "DataParallelError",
    "Layout",
    "check_same_on_every_rank",
    "init_layout",
    "leave_process_group",
    "mean_over_ranks",
]


class DataParallelError(ValueError):
    """A distributed layout that cannot run (wrong world size, not under torchrun, ...); says what to change."""


@dataclass
class Layout:
    """Where this process sits in a ``pp x dp`` grid of ranks.

    The ``dp`` data-parallel ranks of one pipeline position each take a slice of every global batch. Alone
    (``--dp`` without ``--pp``/``--ep``) they are FSDP2-sharded (``sharded``). Otherwise they hold the weights
    whole and average their gradients (as DDP does; sharding them there is not implemented), and with ``ep`` > 1
    they form groups of ``ep`` consecutive data ranks that split the routed experts between them (expert
    parallelism inside data parallelism, DeepSeek's arrangement), each expert replicated ``dp / ep`` times.
    ``pp`` pipeline ranks hold consecutive stages. The grid is ``mesh`` (dims ``("pp", "data")``, row-major:
    ``rank = pp_rank x dp + data_rank``, ``data_rank = replica x ep + ep_rank``); None alone."""

    dp: int = 1
    rank: int = 0
    mesh: object | None = None
    pp: int = 1
    ep: int = 1
    groups: dict = field(default_factory=dict)  # "ep", "replica", "ep_backward": this rank's extra process groups

    @property
    def data(self) -> int:
        """Ranks that share one pipeline position and split the batch between them."""
        return self.dp

    @property
    def data_rank(self) -> int:
        return self.rank % self.dp

    @property
    def pp_rank(self) -> int:
        return self.rank // self.dp

    @property
    def ep_rank(self) -> int:
        """Position in this rank's expert-parallel group (which share of the experts it holds)."""
        return self.data_rank % self.ep

    @property
    def replica(self) -> int:
        """Which copy of its experts this rank's expert-parallel group is (0 .. dp/ep - 1)."""
        return self.data_rank // self.ep

    @property
    def sharded(self) -> bool:
        """FSDP2 over the data ranks (``--dp`` alone); otherwise data ranks replicate the weights."""
        return self.dp > 1 and self.pp == 1 and self.ep == 1

    @property
    def data_group(self):
        return self.mesh.get_group("data") if self.mesh is not None else None

    @property
    def pp_group(self):
        return self.mesh.get_group("pp") if self.mesh is not None else None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.mesh is not None

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def sum_(self, tensors: list[torch.Tensor]) -> None:
        """Sum ``tensors`` in place over the data ranks (same order on every rank), e.g. the expert loads counted
        for the bias update, so every rank's routers see the global batch and stay identical."""
        if self.data == 1:
            return
        for t in tensors:
            dist.all_reduce(t, group=self.data_group)

    def clip_grad_norm_(self, params, max_norm: float, uncounted: set[int] = frozenset()) -> float:
        """``clip_grad_norm_`` as one process holding every parameter would compute it: the squared norms of this
        rank's gradients, minus those of ``uncounted`` (replicas another rank counts), summed over all ranks;
        then every gradient here scaled by the same factor."""
        grads = [p.grad for p in params if p.grad is not None]
        counted = [p.grad for p in params if p.grad is not None and id(p) not in uncounted]
        local = torch.stack([g.detach().float().norm() ** 2 for g in counted]).sum() if counted else torch.zeros(())
        total = local.double().reshape(1)
        dist.all_reduce(total)
        norm = math.sqrt(float(total))
        coef = min(1.0, max_norm / (norm + 1e-6))
        if coef < 1.0:
            for g in grads:
                g.mul_(coef)
        return norm

    def gather_state_dict(self, model) -> dict | None:
        """Every rank's parameters and buffers (each held by one rank, or replicas of equal value; the rest
        replaced by ``nn.Identity``) merged on rank 0 (None on the others; collective)."""
        mine = {k: v.detach().cpu() for k, v in model.state_dict().items()}
        parts = [None] * dist.get_world_size() if self.rank == 0 else None
        dist.gather_object(mine, parts, dst=0)
        if self.rank != 0:
            return None
        merged = {}
        for part in parts:
            merged.update(part)
        return merged

    def merge(self, values: dict) -> dict:
        """Per-layer figures (e.g. expert-load imbalance), each layer held by one pipeline rank, merged on every
        rank."""
        if self.pp == 1:
            return values
        parts = [None] * dist.get_world_size()
        dist.all_gather_object(parts, values)
        merged = {}
        for part in parts:
            merged.update(part)
        return merged

    def broadcast(self, obj):
        """``obj`` as rank 0 has it, on every rank."""
        if not self.distributed:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]


def init_layout(dp: int | None, pp: int | None = None, ep: int | None = None) -> Layout:
    """Start (or join) the process group torchrun set up and check the requested layout against it.

    ``dp=None`` takes what ``pp`` leaves of the world size; ``ep`` must divide ``dp``. Raises
    :class:`DataParallelError` naming the fix -- on every rank, before any work -- for a layout outside torchrun
    and for a world size it does not account for."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pp, ep = pp or 1, ep or 1
    for flag, value in (("--dp", dp), ("--pp", pp), ("--ep", ep)):
        if value is not None and value < 1:
            raise DataParallelError(f"{flag} must be >= 1, got {value}.")
    flags = " ".join(f"{f} {v}" for f, v in (("--pp", pp), ("--ep", ep), ("--dp", dp)) if v not in (None, 1))
    if world == 1:
        if flags:
            n = pp * max(dp or 1, ep)
            raise DataParallelError(
                f"{flags} needs {n} processes: run under torchrun, e.g. `torchrun --nproc-per-node {n} -m "
                f"modeling_deepseekv3 pretrain ... {flags}`."
            )
        return Layout()
    if dp is None:
        if world % pp:
            raise DataParallelError(f"--pp {pp} does not divide the world size {world} torchrun started.")
        dp = world // pp
    if pp * dp != world:
        what = "--dp" if pp == 1 else "--pp x --dp"
        raise DataParallelError(
            f"{flags} needs {pp * dp} processes ({what}), but torchrun started {world}; make --nproc-per-node x "
            "nodes equal the product, or leave --dp out (it takes the rest of the world size)."
        )
    if dp % ep:
        raise DataParallelError(
            f"--ep {ep} must divide the {dp} data-parallel ranks (world size {world} / --pp {pp}): expert-parallel "
            "groups are made of data-parallel ranks. Start more processes or lower --ep."
        )
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    mesh = init_device_mesh(device, (pp, dp), mesh_dim_names=("pp", "data"))
    layout = Layout(dp=dp, pp=pp, ep=ep, rank=dist.get_rank(), mesh=mesh)
    if ep > 1:  # every rank creates every group, in the same order
        for key, members in (
            ("ep", _ep_groups(pp, dp, ep)),
            ("ep_backward", _ep_groups(pp, dp, ep)),
            ("replica", _replica_groups(pp, dp, ep)),
        ):
            for ranks in members:
                group = dist.new_group(ranks)
                if layout.rank in ranks:
                    layout.groups[key] = group
    return layout


def _ep_groups(pp: int, dp: int, ep: int) -> list[list[int]]:
    """Ranks that split one copy of the experts: ``ep`` consecutive data ranks of one pipeline position."""
    return [[row * dp + start + e for e in range(ep)] for row in range(pp) for start in range(0, dp, ep)]


def _replica_groups(pp: int, dp: int, ep: int) -> list[list[int]]:
    """Ranks holding the same experts: one per expert-parallel group of a pipeline position."""
    return [[row * dp + r * ep + e for r in range(dp // ep)] for row in range(pp) for e in range(ep)]


def check_same_on_every_rank(layout: Layout, facts: dict) -> None:
    """Raise :class:`DataParallelError` on every rank if any rank's ``facts`` (JSON-like: the run's settings, the
    model config's fingerprint, the data's) differ from rank 0's: ranks launched with different command lines or
    reading different files would otherwise train different models, or hang in mismatched collectives."""
    if not layout.distributed:
        return
    everyone = [None] * dist.get_world_size()
    dist.all_gather_object(everyone, facts)
    for rank, theirs in enumerate(everyone):
        for key in everyone[0]:
            if theirs.get(key) != everyone[0][key]:
                raise DataParallelError(
                    f"rank {rank} runs with a different {key} than rank 0 ({theirs.get(key)} vs {everyone[0][key]}): "
                    "every rank must run the same command on the same files (same --model-config, data, tokenizer "
                    "and flags on every node)."
                )


def mean_over_ranks(values: dict[str, float], layout: Layout) -> dict[str, float]:
    """The mean of each value over the data ranks (the global-batch figure a single process would log)."""
    if layout.data == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=layout.data_group)
    return {k: float(v) / layout.data for k, v in zip(keys, t.tolist())}


def leave_process_group() -> None:
    """Destroy the process group if one is up (the CLI's exit path under torchrun, also after an error)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
