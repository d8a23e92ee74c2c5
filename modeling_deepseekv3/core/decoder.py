"""The DeepSeek-V3 decoder block: pre-norm MLA then a dense or MoE feed-forward, each with a residual."""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer

from .attention import MLAttention
from .layers import RMSNorm, SwiGLUMLP
from .moe import DeepseekV3MoE

__all__ = ["DecoderBlock", "DeepseekV3DecoderLayer"]


class DecoderBlock(GradientCheckpointingLayer):
    """Pre-norm block: ``x + MLA(norm(x))`` then ``x + FFN(norm(x))``; FFN is dense below
    ``first_k_dense_replace``, MoE above. Shared by the decoder layers and the MTP layers, whose
    ``forward`` each wrap :meth:`block` (transformers checkpoints a layer's outermost ``forward``, so the
    block itself must not be a ``forward`` a subclass calls through ``super()``)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        # registration order = state_dict order = the layout table's order (checkpoint/layout.py)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.self_attn = MLAttention(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        if config.is_moe_layer(layer_idx):
            self.mlp = DeepseekV3MoE(config)
        else:
            self.mlp = SwiGLUMLP(config, config.intermediate_size)

    def block(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states, _ = self.self_attn(  # the probabilities reach outputs.attentions by output recording
            self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache, output_attentions
        )
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class DeepseekV3DecoderLayer(DecoderBlock):
    """``model.layers.L`` for ``L < num_hidden_layers``."""

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        output_attentions: bool = False,
        **kwargs,
    ) -> torch.Tensor:
        return self.block(hidden_states, position_embeddings, attention_mask, cache, output_attentions)
