"""Data parallelism for training: FSDP2 ``fully_shard`` at decoder-layer granularity, applied from outside (the
last step of :func:`~.parallelize.parallelize`; the ranks are :class:`~.layout.Layout`'s). With ``--pp`` or
``--ep``, data ranks hold whole weights and average their gradients instead: :mod:`.expert_parallel`.

``deepseek-v3 pretrain --dp N`` under ``torchrun --nproc-per-node N`` (gloo on CPU, NCCL on GPUs) runs the same
loop as one process: each rank takes its slice of every global batch, FSDP2 averages the gradients, and the
aux-loss-free bias update sees the expert loads of all ranks (``Layout.sum_``), so for the same
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

import torch
import torch.distributed as dist

from ..core.moe.experts import RoutedExperts
from .layout import Layout

__all__ = ["apply_data_parallel", "full_state_dict"]


def _experts_modules(model):
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


def full_state_dict(model, layout: Layout) -> dict | None:
    """The sharded model's whole state dict, unsharded on CPU, on rank 0 (None on the others; collective)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return full if layout.is_main else None
