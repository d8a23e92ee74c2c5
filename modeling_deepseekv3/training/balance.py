"""Aux-loss-free load balancing (docs/deepseek_v3.md §9.1) and expert-load statistics.

After each optimizer step, for every MoE layer, ``b_i += gamma * sign(mean_load - load_i)`` over the tokens
routed during the step; the bias shifts selection only, never the weights, and gets no gradient.
:func:`update_routing_bias` does one update; :class:`RoutingBiasCallback` does it in ``transformers.Trainer``
(``callbacks.py``) and logs load statistics. ``gamma`` is the config's ``routing_bias_update_rate``, 0.0 by default (off for
fine-tuning; DeepSeek used 0.001 in pre-training).

Counting is done by forward hooks on the routers (:class:`ExpertLoadTracker`), so the MoE layer keeps no
training state. A router re-run by gradient checkpointing's backward recomputation is not counted twice.
"""

from __future__ import annotations

import torch

__all__ = [
    "ExpertLoadTracker",
    "expert_load",
    "expert_load_counts",
    "reset_expert_load",
    "track_expert_load",
    "update_routing_bias",
]


def _moe_layers(model):
    from ..core.moe import DeepseekV3MoE

    return [(name, m) for name, m in model.named_modules() if isinstance(m, DeepseekV3MoE)]


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class ExpertLoadTracker:
    """Counts, per MoE layer (by module name), the tokens routed to each expert, from router hooks.

    ``counts``: ``{layer name: int64 [E]}`` since the last :meth:`reset`. Counting happens in forward
    passes only (a checkpointed layer's recomputation during backward is skipped), so the counts of a step
    are the tokens of its micro-batches, each once. With ``training_only`` a forward in eval mode is not
    counted: an evaluation between two optimizer steps must not steer the next bias update (held-out data
    would leak into training, and a run resumed after that step would diverge from the uninterrupted one)."""

    def __init__(self, model, training_only: bool = False):
        self.counts: dict[str, torch.Tensor] = {}
        self.training_only = training_only
        self._handles = []
        for name, moe in _moe_layers(model):
            self._handles.append(moe.gate.register_forward_hook(self._hook(name, moe.n_routed_experts)))

    def _hook(self, name: str, num_experts: int):
        def count(module, args, output):
            if _in_backward() or (self.training_only and not module.training):
                return
            with torch.no_grad():
                c = torch.bincount(output.indices.flatten(), minlength=num_experts)
            self.counts[name] = c if name not in self.counts else self.counts[name] + c

        return count

    def reset(self) -> None:
        self.counts = {}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []


def track_expert_load(model, enabled: bool = True, training_only: bool = False) -> ExpertLoadTracker | None:
    """Count, per MoE layer, the tokens routed to each expert (what the bias update and the load
    statistics read). Off by default: inference pays nothing. ``training_only``: forwards in eval mode are
    not counted (what a training loop that evaluates between steps wants). Returns the tracker (None when
    disabled)."""
    tracker = model.__dict__.get("_expert_load_tracker")
    if enabled and tracker is None:
        tracker = model.__dict__["_expert_load_tracker"] = ExpertLoadTracker(model, training_only)
    elif enabled:
        tracker.training_only = training_only
    elif not enabled and tracker is not None:
        tracker.remove()
        tracker = model.__dict__.pop("_expert_load_tracker")
        return None
    return tracker


def _tracker(model) -> ExpertLoadTracker | None:
    return model.__dict__.get("_expert_load_tracker")


def expert_load(model) -> dict[str, torch.Tensor]:
    """``{layer name: tokens per expert}`` counted since the last reset (int64 tensors)."""
    tracker = _tracker(model)
    return {} if tracker is None else {name: c.clone() for name, c in tracker.counts.items()}


def expert_load_counts(model) -> dict[str, torch.Tensor]:
    """The live counters behind :func:`expert_load`, sorted by layer name (the same order on every rank): a
    data-parallel run sums them in place over its ranks before :func:`update_routing_bias`, so every rank's
    routers see the global batch and stay identical."""
    tracker = _tracker(model)
    return {} if tracker is None else {name: tracker.counts[name] for name in sorted(tracker.counts)}


def reset_expert_load(model) -> None:
    tracker = _tracker(model)
    if tracker is not None:
        tracker.reset()


@torch.no_grad()
def update_routing_bias(model, gamma: float | None = None) -> dict[str, float]:
    """One aux-loss-free update of every MoE layer's ``e_score_correction_bias`` from the counted load;
    resets the counts. Returns each layer's load imbalance (max / mean) before the update."""
    gamma = model.config.routing_bias_update_rate if gamma is None else gamma
    tracker = _tracker(model)
    if tracker is None:
        return {}
    imbalance = {}
    modules = dict(model.named_modules())
    for name, load in tracker.counts.items():
        if load.sum() == 0:
            continue
        load = load.float()
        mean = load.mean()
        imbalance[name] = (load.max() / mean).item()
        if gamma:
            bias = modules[name].gate.e_score_correction_bias
            bias.add_(gamma * torch.sign(mean - load).to(bias.device, bias.dtype))
    tracker.reset()
    return imbalance
