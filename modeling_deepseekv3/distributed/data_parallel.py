"""Data parallelism for training: FSDP2 ``fully_shard`` at decoder-layer granularity, applied from outside.

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
from dataclasses import dataclass

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
    """Where this process sits in a ``pp x data`` grid of ranks.

    ``data`` ranks each take a slice of every global batch: FSDP2-sharded (``dp``) or, with ``ep`` > 1, holding
    the dense weights whole and a share of the routed experts (expert parallelism). ``pp`` pipeline ranks hold
    consecutive stages. The grid is ``mesh`` (dims ``("pp", "data")``, row-major: ``rank = pp_rank x data +
    data_rank``); None alone."""

    dp: int = 1
    rank: int = 0
    mesh: object | None = None
    pp: int = 1
    ep: int = 1

    @property
    def data(self) -> int:
        """Ranks that share one pipeline position and split the batch between them."""
        return self.ep if self.ep > 1 else self.dp

    @property
    def data_rank(self) -> int:
        return self.rank % self.data

    @property
    def pp_rank(self) -> int:
        return self.rank // self.data

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

    ``dp=None`` takes what ``pp`` x ``ep`` leave of the world size. Raises :class:`DataParallelError` naming the
    fix -- on every rank, before any work -- for a layout outside torchrun and for a world size it does not
    account for."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    pp, ep = pp or 1, ep or 1
    for flag, value in (("--dp", dp), ("--pp", pp), ("--ep", ep)):
        if value is not None and value < 1:
            raise DataParallelError(f"{flag} must be >= 1, got {value}.")
    flags = " ".join(f"{f} {v}" for f, v in (("--pp", pp), ("--ep", ep), ("--dp", dp)) if v not in (None, 1))
    if world == 1:
        if flags:
            n = pp * ep * (dp or 1)
            raise DataParallelError(
                f"{flags} needs {n} processes: run under torchrun, e.g. `torchrun --nproc-per-node {n} -m "
                f"modeling_deepseekv3 pretrain ... {flags}`."
            )
        return Layout()
    if ep > 1 and dp not in (None, 1):
        raise DataParallelError(
            f"--ep {ep} with --dp {dp}: FSDP over expert-parallel ranks is not implemented yet. With --ep N the N "
            "ranks already split every batch (data parallel for the dense weights); leave --dp out."
        )
    if pp > 1 and dp not in (None, 1):
        raise DataParallelError(f"--pp {pp} with --dp {dp}: pipeline and data parallelism (FSDP) together are not "
                                "implemented yet; use --pp with --ep, or one of them.")
    data = ep if ep > 1 else (dp if dp is not None else world // pp)
    if pp * data != world:
        if pp == 1 and ep == 1:
            raise DataParallelError(
                f"--dp {dp} does not match the world size {world} torchrun started (--dp must equal "
                "--nproc-per-node x nodes, or be left out)."
            )
        raise DataParallelError(
            f"{flags} needs {pp * data} processes (--pp x --ep), but torchrun started {world}; make "
            "--nproc-per-node x nodes equal the product."
        )
    from torch.distributed.device_mesh import init_device_mesh

    device = "cuda" if torch.cuda.is_available() else "cpu"
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device == "cuda" else "gloo")
    if device == "cuda":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    mesh = init_device_mesh(device, (pp, data), mesh_dim_names=("pp", "data"))
    return Layout(dp=1 if ep > 1 else data, pp=pp, ep=ep, rank=dist.get_rank(), mesh=mesh)


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
    from ..moe.experts import RoutedExperts

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
    if layout.dp == 1:
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
