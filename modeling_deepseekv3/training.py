"""MoE training controls: the sequence-wise balance loss, aux-loss-free bias updates, expert-load statistics,
and the multi-token-prediction loss (spec §8-§9).

* **Sequence-wise balance loss** (spec §9.2), per MoE layer and sequence of T tokens:
  ``L = alpha * sum_i f_i * P_i`` with ``f_i = N_r / (K_r * T) * #{t : expert i selected for t}`` and
  ``P_i = mean_t s'_{i,t}``, ``s'`` the sigmoid scores normalized over all experts. Selection uses the
  actual (bias-corrected) routing. Averaged over sequences, summed over layers; padding excluded.
  ``alpha`` is the config's ``balance_loss_alpha`` (default 1e-4, the paper's value; the official
  config's ``aux_loss_alpha`` of 0.001 is a stale default and is not used).
* **Aux-loss-free balancing** (spec §9.1): after each optimizer step, for every MoE layer,
  ``b_i += gamma * sign(mean_load - load_i)`` over the tokens routed during the step; the bias shifts
  selection only, never the weights, and gets no gradient. :func:`update_routing_bias` does one update;
  :class:`RoutingBiasCallback` does it in ``transformers.Trainer`` and logs load statistics. ``gamma`` is
  the config's ``routing_bias_update_rate``, 0.0 by default (off for fine-tuning; DeepSeek used 0.001 in
  pre-training).
* **MTP loss** (spec §8): with the MTP layer loaded and labels given, depth k predicts token i+k+1 from the
  main model's final hidden state at i and the embedding of token i+k; ``mtp_loss_weight`` (default 0.1,
  the paper's late-training lambda) times its cross-entropy is added to the loss.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = [
    "balance_loss",
    "expert_load",
    "reset_expert_load",
    "track_expert_load",
    "update_routing_bias",
    "RoutingBiasCallback",
    "mtp_loss",
]


def _moe_layers(model):
    from .moe import DeepseekV3MoE

    return [(name, m) for name, m in model.named_modules() if isinstance(m, DeepseekV3MoE)]


def balance_loss(idx_TK: torch.Tensor, logits_TE: torch.Tensor, batch: int, alpha: float,
                 mask_BS: torch.Tensor | None = None) -> torch.Tensor:
    """Sequence-wise balance loss of one MoE layer (module docstring). ``idx_TK``/``logits_TE`` for the
    ``batch * S`` tokens in order; ``mask_BS`` marks real tokens (1) and padding (0)."""
    t, k = idx_TK.shape
    e = logits_TE.shape[-1]
    s = t // batch
    scores = logits_TE.float().sigmoid()
    scores = (scores / scores.sum(-1, keepdim=True)).view(batch, s, e)  # s' (B, S, E)
    selected = torch.zeros(t, e, device=scores.device).scatter_(1, idx_TK, 1.0).view(batch, s, e)
    m = torch.ones(batch, s, device=scores.device) if mask_BS is None else mask_BS.to(scores.device).float()
    tokens = m.sum(1).clamp(min=1)  # (B,)
    f = (e / (k * tokens))[:, None] * (selected * m[..., None]).sum(1)  # (B, E)
    p = (scores * m[..., None]).sum(1) / tokens[:, None]  # (B, E)
    return alpha * (f * p).sum(-1).mean()


def mtp_loss(model, input_ids: torch.Tensor, hidden: torch.Tensor, labels: torch.Tensor,
             attention_mask: torch.Tensor | None) -> torch.Tensor:
    """Cross-entropy of the MTP layer(s), averaged over depths. ``hidden``: the main model's final
    (post-norm) hidden states ``[B, S, D]``; ``labels`` as for the main loss (-100 ignored)."""
    from .modeling import build_attention_mask

    layers = model.model.mtp_layers
    b, s = input_ids.shape
    losses = []
    h = hidden
    for depth, layer in enumerate(layers, start=1):
        n = s - depth  # positions i with a known token i+depth
        if n < 2:
            break
        position_ids = torch.arange(n, device=input_ids.device)[None].expand(b, n)
        pe = model.model.rotary_emb(position_ids)
        m = None
        if attention_mask is not None:
            valid = attention_mask[:, :n].bool() & attention_mask[:, depth : depth + n].bool()
            m = build_attention_mask(valid.long(), b, n, 0, n, input_ids.device)
        h, logits = layer.predict(input_ids[:, depth : depth + n], h[:, :n], pe, m)
        target = labels[:, depth + 1 : depth + n]  # position i predicts token i+depth+1
        losses.append(F.cross_entropy(logits[:, : n - 1].reshape(-1, logits.shape[-1]).float(),
                                      target.reshape(-1), ignore_index=-100))
    if not losses:
        return hidden.new_zeros(())
    return torch.stack(losses).mean()


def track_expert_load(model, enabled: bool = True) -> None:
    """Count, per MoE layer, the tokens routed to each expert (what the bias update and the load
    statistics read). Off by default: inference pays nothing."""
    for _, moe in _moe_layers(model):
        moe.track_load = enabled


def expert_load(model) -> dict[str, torch.Tensor]:
    """``{layer name: tokens per expert}`` counted since the last reset (int64 tensors)."""
    return {name: moe.expert_load.clone() for name, moe in _moe_layers(model) if moe.expert_load is not None}


def reset_expert_load(model) -> None:
    for _, moe in _moe_layers(model):
        moe.expert_load = None


@torch.no_grad()
def update_routing_bias(model, gamma: float | None = None) -> dict[str, float]:
    """One aux-loss-free update of every MoE layer's ``e_score_correction_bias`` from the counted load;
    resets the counts. Returns each layer's load imbalance (max / mean) before the update."""
    gamma = model.config.routing_bias_update_rate if gamma is None else gamma
    imbalance = {}
    for name, moe in _moe_layers(model):
        load = moe.expert_load
        if load is None or load.sum() == 0:
            continue
        load = load.float()
        mean = load.mean()
        imbalance[name] = (load.max() / mean).item()
        if gamma:
            bias = moe.gate.e_score_correction_bias
            bias.add_(gamma * torch.sign(mean - load).to(bias.device, bias.dtype))
        moe.expert_load = None
    return imbalance


try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover
    TrainerCallback = object


class RoutingBiasCallback(TrainerCallback):
    """``Trainer`` callback: counts expert load, updates the routing biases after every optimizer step
    (rate ``gamma`` or the config's ``routing_bias_update_rate``; 0 only logs), and adds
    ``moe_load_imbalance`` (max/mean tokens per expert, averaged over layers) to the logs."""

    def __init__(self, gamma: float | None = None):
        self.gamma = gamma
        self._last = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        track_expert_load(model, True)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        self._last = update_routing_bias(model, self.gamma)

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs is not None and self._last:
            value = sum(self._last.values()) / len(self._last)
            logs["moe_load_imbalance"] = value  # what printers / reporters see
            if state.log_history:  # Trainer appended its copy before calling us
                state.log_history[-1]["moe_load_imbalance"] = value
