"""The training objective of DeepSeek-V3 beside the language-model loss (docs/deepseek_v3.md §8-§9).

* **Sequence-wise balance loss** (docs/deepseek_v3.md §9.2), per MoE layer and sequence of T tokens:
  ``L = alpha * sum_i f_i * P_i`` with ``f_i = N_r / (K_r * T) * #{t : expert i selected for t}`` and
  ``P_i = mean_t s'_{i,t}``, ``s'`` the sigmoid scores normalized over all experts. Selection uses the
  actual (bias-corrected) routing. Averaged over sequences, summed over layers; padding excluded.
  ``alpha`` is the config's ``balance_loss_alpha`` (default 1e-4, the paper's value; the official
  config's ``aux_loss_alpha`` of 0.001 is a stale default and is not used).
* **MTP loss** (docs/deepseek_v3.md §8): depth k predicts token i+k+1 from the main model's final hidden state at i (or
  the previous depth's output) and the embedding of token i+k; the cross-entropy is averaged over depths.
  The model adds ``mtp_loss_weight`` times it to the training loss (lambda: 0.3 early in DeepSeek's
  pre-training, 0.1 late).

Both are computed by :class:`~modeling_deepseekv3.modeling.DeepseekV3ForCausalLM` when labels are given;
the router decisions reach the balance loss through transformers' output recording, not module state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .attention import build_attention_mask

__all__ = ["balance_loss", "mtp_loss", "next_token_labels"]


def balance_loss(
    idx_TK: torch.Tensor, logits_TE: torch.Tensor, batch: int, alpha: float, mask_BS: torch.Tensor | None = None
) -> torch.Tensor:
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


def next_token_labels(labels: torch.Tensor | None, shift_labels: torch.Tensor | None) -> torch.Tensor:
    """``[B, S]``: the label of token ``i + 1`` at position ``i`` (-100 where there is none).

    ``shift_labels`` (already shifted, as context-parallel training passes them) is used as is; otherwise
    ``labels`` are shifted left by one, the way transformers' causal-LM loss does."""
    if shift_labels is not None:
        return shift_labels
    return F.pad(labels[:, 1:], (0, 1), value=-100)


def mtp_loss(
    model,
    input_ids: torch.Tensor,
    hidden: torch.Tensor,
    next_labels: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor | None = None,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of the MTP layer(s), averaged over depths. ``hidden``: the main model's final
    (post-norm) hidden states ``[B, S, D]``; ``next_labels`` from :func:`next_token_labels` (-100 ignored).
    Position i of depth k runs at the main model's position id of slot i (as vLLM does). In a packed batch
    (``segment_ids``) a position counts only when its inputs and its target lie in its own sequence. Each
    MTP layer is called as a module, so gradient checkpointing recomputes it in backward."""
    layers = model.model.mtp_layers
    b, s = input_ids.shape
    if position_ids is None:
        position_ids = torch.arange(s, device=input_ids.device)[None]
    position_ids = position_ids.expand(b, s)
    losses = []
    h = hidden
    for depth, layer in enumerate(layers, start=1):
        n = s - depth  # positions i with a known input token i+depth
        if n < 1:
            break
        pe = model.model.rotary_emb(position_ids[:, :n])
        target = next_labels[:, depth : depth + n]  # position i predicts token i+depth+1
        seg = None
        if segment_ids is not None:
            seg = segment_ids[:, :n]
            after = F.pad(segment_ids[:, depth + 1 :], (0, 1), value=-1)  # segment of token i+depth+1
            same = (seg == segment_ids[:, depth : depth + n]) & (seg == after[:, :n])
            target = target.masked_fill(~same, -100)
        m = None
        if attention_mask is not None:
            valid = attention_mask[:, :n].bool() & attention_mask[:, depth : depth + n].bool()
            m = build_attention_mask(valid.long(), b, n, 0, n, input_ids.device, seg)
        elif seg is not None:
            m = build_attention_mask(None, b, n, 0, n, input_ids.device, seg)
        h, logits = layer(input_ids[:, depth : depth + n], h[:, :n], pe, m)
        flat = logits.reshape(-1, logits.shape[-1]).float()
        if bool((target != -100).any()):
            losses.append(F.cross_entropy(flat, target.reshape(-1), ignore_index=-100))
        else:  # nothing to predict at this depth (all padding or boundaries): zero, graph kept
            losses.append(flat.sum() * 0.0)
    if not losses:
        return hidden.new_zeros(())
    return torch.stack(losses).mean()
