"""Multi-head latent attention (MLA), spec §5.

Per token (V3 sizes in brackets):

* query: ``q = q_b_proj(q_a_layernorm(q_a_proj(h)))`` [128 heads x 192], or ``q_proj(h)`` when
  ``q_lora_rank`` is null (Moonlight); each head is ``[q_nope (128) ; q_rope (64)]``.
* latent: ``kv_a_proj_with_mqa(h) = [c_kv_raw (512) ; k_rope_raw (64)]``; ``c_kv = kv_a_layernorm(c_kv_raw)``;
  ``k_pe = RoPE(k_rope_raw)`` is one rope key shared by all heads.
* the cache stores ``[c_kv ; k_pe]`` (576 values per token per layer) -- normalized latent, roped key.
* "expand" (this module's path, the reference): ``kv_b_proj(c_kv)`` gives per head ``[k_nope (128) ; v (128)]``;
  ``K = [k_nope ; k_pe]``, ``V = v``; softmax attention with scale ``softmax_scale(config)``; ``o_proj``.

All weight reads go through module forwards (``kv_b_proj(...)``), never ``module.weight`` outside its own
forward, so Accelerate's offload hooks (which materialize a module's weights only inside its forward)
keep working; the absorbed path must follow the same rule.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .layers import RMSNorm, make_linear
from .rope import apply_rope, softmax_scale

__all__ = ["MLAttention", "latent_cache_update"]


def latent_cache_update(cache, latent: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """Append ``latent [B, S, 576]`` to layer ``layer_idx`` of ``cache``; return the whole ``[B, T, 576]``.

    The latent is stored as the *keys* of a standard transformers cache layer, viewed as one head
    ``[B, 1, T, 576]``, with zero-width values, so ``DynamicCache`` (what ``generate()`` creates), beam
    reordering and cropping all work unchanged and the cache holds exactly the 576 latent values."""
    b, s, d = latent.shape
    keys = latent.view(b, 1, s, d)
    values = latent.new_empty(b, 1, s, 0)
    keys, _ = cache.update(keys, values, layer_idx)
    return keys.view(b, keys.shape[2], d)


class MLAttention(nn.Module):
    """Multi-head latent attention with checkpoint-named projections (``self_attn.*`` in the Hub keys)."""

    def __init__(self, config, layer_idx: int):
        super().__init__()
        self.config = config
        self.layer_idx = layer_idx
        self.num_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.qk_nope_head_dim = config.qk_nope_head_dim
        self.qk_rope_head_dim = config.qk_rope_head_dim
        self.qk_head_dim = config.qk_nope_head_dim + config.qk_rope_head_dim
        self.v_head_dim = config.v_head_dim
        self.attention_dropout = float(config.attention_dropout)
        self.rope_interleave = bool(config.rope_interleave)
        self.scaling = softmax_scale(config)
        bias = bool(config.attention_bias)
        hidden = config.hidden_size

        if self.q_lora_rank is None:
            self.q_proj = make_linear(config, hidden, self.num_heads * self.qk_head_dim)
        else:
            self.q_a_proj = make_linear(config, hidden, self.q_lora_rank, bias=bias)
            # Sub-norms use eps 1e-6 regardless of config.rms_norm_eps, as in the released code (spec §7).
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=1e-6)
            self.q_b_proj = make_linear(config, self.q_lora_rank, self.num_heads * self.qk_head_dim)
        self.kv_a_proj_with_mqa = make_linear(config, hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = make_linear(
            config, self.kv_lora_rank, self.num_heads * (self.qk_nope_head_dim + self.v_head_dim)
        )
        self.o_proj = make_linear(config, self.num_heads * self.v_head_dim, hidden, bias=bias)

    def project_query(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``[B, S, hidden] -> [B, H, S, qk_head_dim]`` (rope part not yet rotated)."""
        b, s, _ = hidden_states.shape
        if self.q_lora_rank is None:
            q = self.q_proj(hidden_states)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(hidden_states)))
        return q.view(b, s, self.num_heads, self.qk_head_dim).transpose(1, 2)  # (B, H, S, 192)

    def project_latent(self, hidden_states: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """``[B, S, hidden] -> [B, S, kv_lora_rank + rope]``: normalized latent and roped shared key."""
        c_kv, k_pe = self.kv_a_proj_with_mqa(hidden_states).split(
            [self.kv_lora_rank, self.qk_rope_head_dim], dim=-1
        )  # (B, S, 512), (B, S, 64)
        c_kv = self.kv_a_layernorm(c_kv)
        k_pe = apply_rope(k_pe, cos, sin, self.rope_interleave)
        return torch.cat((c_kv, k_pe), dim=-1)  # (B, S, 576)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache=None,
    ) -> torch.Tensor:
        """``attention_mask``: boolean ``[B, 1, S, T]`` (True = may attend) or None for plain causal."""
        b, s, _ = hidden_states.shape
        cos, sin = position_embeddings  # (B, S, 32) each
        q = self.project_query(hidden_states)  # (B, H, S, 192)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos[:, None], sin[:, None], self.rope_interleave)
        latent = self.project_latent(hidden_states, cos, sin)  # (B, S, 576)
        if cache is not None:
            latent = latent_cache_update(cache, latent, self.layer_idx)  # (B, T, 576)
        out = self._attend_expanded(torch.cat((q_nope, q_pe), dim=-1), latent, attention_mask)
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.v_head_dim)  # (B, S, H*128)
        return self.o_proj(out)

    def _attend_expanded(self, q: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Reference attention: expand the latent to per-head K/V and run SDPA. Returns ``[B, H, S, v]``."""
        b, t, _ = latent.shape
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(b, t, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        kv = kv.transpose(1, 2)  # (B, H, T, 256)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_pe = k_pe[:, None].expand(b, self.num_heads, t, self.qk_rope_head_dim)  # (B, H, T, 64)
        k = torch.cat((k_nope, k_pe), dim=-1)  # (B, H, T, 192)
        is_causal = mask is None and q.shape[2] == t and t > 1
        return F.scaled_dot_product_attention(
            q,
            k,
            v,
            attn_mask=mask,
            dropout_p=self.attention_dropout if self.training else 0.0,
            is_causal=is_causal,
            scale=self.scaling,
        )  # (B, H, S, 128)
