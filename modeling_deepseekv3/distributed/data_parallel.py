"""Data parallelism for training: FSDP2 ``fully_shard`` at decoder-layer granularity, applied from outside; and
the ``pp x dp`` grid of ranks (:class:`Layout`) that pipeline and expert parallelism share. (With ``--pp`` or
``--ep``, data ranks hold whole weights and average their gradients instead: :mod:`.expert_parallel`.)

``deepseek-v3 pretrain --dp N`` under ``torchrun --nproc-per-node N`` (gloo on CPU, NCCL on GPUs) runs the same
loop as one process: each rank takes its slice of every global batch, FSDP2 averages the gradients, and the
aux-loss-free bias update sees the expert loads of all ranks (:func:`all_reduce_expert_load`), so for the same
seed and global batch the losses equal the single-process run's up to float rounding (tested).

Two MoE-specific hazards, both measured here before this module existed:

* **Experts idle on one rank only.** FSDP2 reduce-scatters, per layer, the gradients that exist; an expert that
  received no token on rank 0 but some on rank 1 has no gradient on rank 0, the two ranks' reduce-scatters
  then differ in size (gloo: "Received data size doesn't match expected size") -- or, where sizes happen to
  agree, pair different tensors silently. :func:`apply_data_parallel` hooks every ``mlp.experts``: in a
  training forward it sums the per-expert token counts over the ranks (one small all-reduce per MoE layer)
  and gives every expert that is idle here but busy elsewhere a zero-valued path to the output, so its
  gradient exists (zeros) on every rank. An expert idle on *all* ranks keeps no gradient anywhere, exactly
  as in the single-process run (AdamW then skips it there too).
* **Experts as their own FSDP units.** Ranks that skip different experts would then pair their all-gathers
  by call order and compute with the wrong weights; units here are whole decoder layers (all experts of a
  layer gathered together) plus the root (embeddings, head, final norm, the MTP layer, which shares the
  embedding and head with the main model and therefore stays in the root's unit).

The dense experts' grouped inference path re-homes expert weights into stacked buffers; FSDP owns those
storages, so it is switched off on sharded models (evaluation takes the per-expert path).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

__all__ = [
    "DataParallelError",
    "Layout",
    "all_reduce_expert_load",
    "apply_data_parallel",
    "check_same_on_every_rank",
    "full_state_dict",
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
        for key, members in (("ep", _ep_groups(pp, dp, ep)), ("ep_backward", _ep_groups(pp, dp, ep)),
                             ("replica", _replica_groups(pp, dp, ep))):
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


def _experts_modules(model):
    from ..core.moe.experts import RoutedExperts

    return [m for m in model.modules() if isinstance(m, RoutedExperts)]


def _touch_idle_experts(module, args, output):
    """Forward hook of ``mlp.experts`` (module docstring): zero-valued paths from the experts idle here but busy
    on another rank, so FSDP's per-layer reduce-scatter carries the same tensors on every rank."""
    if not (module.training and torch.is_grad_enabled()):
        return output
    counts_E = args[1]
    everywhere_E = counts_E.detach().clone()
    dist.all_reduce(everywhere_E)
    idle = ((counts_E == 0) & (everywhere_E > 0)).nonzero().flatten().tolist()
    if not idle:
        return output
    touch = sum(p.reshape(-1)[:1].sum() for e in idle for p in module[e].parameters() if p.requires_grad)
    return output + 0.0 * touch


def apply_data_parallel(model, layout: Layout):
    """Shard ``model`` over ``layout``'s ranks with FSDP2: one unit per main decoder layer, then the root. The
    model must already hold its initial weights (the same on every rank: same seed). Returns the model."""
    if not layout.sharded:
        return model
    from torch.distributed.fsdp import fully_shard

    for experts in _experts_modules(model):
        experts.grouped = False  # FSDP owns the weights' storage: no re-homing into stacked buffers
        experts.register_forward_hook(_touch_idle_experts)
    mesh = layout.mesh["data"]
    for layer in model.model.layers[: model.config.num_hidden_layers]:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def all_reduce_expert_load(model, layout: Layout) -> None:
    """Sum the counted expert loads over the ranks, in place, so every rank's bias update sees the global
    batch (and all ranks' router biases stay identical)."""
    if layout.data == 1:  # (a pipeline rank counts only its own layers: nothing to sum over pipeline ranks)
        return
    from ..training.balance import _tracker

    tracker = _tracker(model)
    if tracker is None:
        return
    for name in sorted(tracker.counts):  # same order on every rank
        dist.all_reduce(tracker.counts[name], group=layout.data_group)


def mean_over_ranks(values: dict[str, float], layout: Layout) -> dict[str, float]:
    """The mean of each value over the data ranks (the global-batch figure a single process would log)."""
    if layout.data == 1 or not values:
        return values
    keys = sorted(values)
    t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(t, group=layout.data_group)
    return {k: float(v) / layout.data for k, v in zip(keys, t.tolist())}


def full_state_dict(model, layout: Layout) -> dict | None:
    """The sharded model's whole state dict, unsharded on CPU, on rank 0 (None on the others; collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if layout.is_main else None


def leave_process_group() -> None:
    """Destroy the process group if one is up (the CLI's exit path under torchrun, also after an error)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
