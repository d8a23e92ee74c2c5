"""The multi-token-prediction (MTP) module stored as ``model.layers.{num_hidden_layers + k}`` (docs/deepseek_v3.md §8)."""

from __future__ import annotations

import torch
from torch import nn
from transformers.cache_utils import Cache

from .decoder import DecoderBlock
from .layers import RMSNorm

__all__ = ["DeepseekV3MTPLayer", "SharedHead"]


class SharedHead(nn.Module):
    """``shared_head``: the MTP layer's final norm and output head (a copy of ``lm_head``)."""

    def __init__(self, config):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden_states))


class DeepseekV3MTPLayer(DecoderBlock):
    """Multi-token prediction module ``model.layers.{num_hidden_layers + k}`` (docs/deepseek_v3.md §8.2).

    For position i with the next token ``t_{i+1}`` known: ``x = eh_proj([enorm(emb(t_{i+1})) ;
    hnorm(h_i)])`` (embedding half first -- the order the released weights need), then this layer's MLA +
    MoE block, then ``shared_head`` -> logits for ``t_{i+2}``. ``h_i`` is the main model's final hidden
    state after ``model.norm`` (what vLLM/SGLang feed). Its ``embed_tokens`` / ``shared_head.head`` are
    the checkpoint's own copies of the main embedding and head. Never run by the main forward; call the
    module itself (not a method of it), so gradient checkpointing and hooks apply to the whole prediction."""

    def __init__(self, config, layer_idx: int):
        super().__init__(config, layer_idx)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.enorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def forward(
        self,
        next_input_ids: torch.Tensor,
        previous_hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        logits_index: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``next_input_ids [B, S]`` (tokens i+1), ``previous_hidden [B, S, D]`` (post-norm h_i) ->
        ``(hidden [B, S, D] before shared_head.norm, logits [B, S, V])`` predicting tokens i+2. ``logits_index``
        (positions along S): the logits of those positions only, ``[B, len(index), V]`` (a packed batch drafts
        from each sequence's last position; the head over every prompt position would cost more than the layer)."""
        e = self.enorm(self.embed_tokens(next_input_ids))
        h = self.hnorm(previous_hidden)
        x = self.eh_proj(torch.cat((e, h), dim=-1))  # (B, S, D)
        x = self.block(x, position_embeddings, attention_mask, cache)
        return x, self.shared_head(x if logits_index is None else x[:, logits_index])
