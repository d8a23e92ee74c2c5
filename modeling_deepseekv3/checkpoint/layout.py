"""The official checkpoint layout as one declarative table.

``checkpoint_layout(config)`` lists every tensor of an official-layout checkpoint (name, shape, dtype),
derived from the config with the rules of ``docs/deepseek_v3.md`` §3.2. Everything that needs to know
"which tensors exist and which are FP8" reads this one table: the tiny-checkpoint writer, ``convert``,
the placement planner, and the contract test that our model's ``state_dict`` has the same names and shapes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..fp8 import FP8_DTYPE, scale_shape
from .headers import SCALE_SUFFIX

__all__ = ["TensorSpec", "checkpoint_layout", "mtp_layer_indices", "skipped_mtp_key_patterns"]


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


def checkpoint_layout(config, dense_dtype: torch.dtype = torch.bfloat16) -> dict[str, TensorSpec]:
    """Every tensor of the official checkpoint for ``config``, in file order.

    FP8 (when ``config.is_fp8``): every linear inside a decoder block (attention, dense MLP, routed and
    shared experts, also in the MTP block), each with a float32 ``weight_scale_inv [ceil(out/bm),
    ceil(in/bn)]``. Dense (``dense_dtype``): embeddings, norms, router weight, ``lm_head``, MTP's
    ``eh_proj`` and ``shared_head``. Always float32: ``mlp.gate.e_score_correction_bias``.
    MTP layers (``num_nextn_predict_layers``) follow the main layers whatever ``load_mtp`` says."""
    c = config
    block = c.fp8_block_size
    f32 = torch.float32
    table: dict[str, TensorSpec] = {}

    def dense(name: str, *shape: int, dtype: torch.dtype = dense_dtype) -> None:
        table[name] = TensorSpec(tuple(shape), dtype)

    def linear(prefix: str, out_features: int, in_features: int, bias: bool = False) -> None:
        if block is None:
            dense(f"{prefix}.weight", out_features, in_features)
        else:
            table[f"{prefix}.weight"] = TensorSpec((out_features, in_features), FP8_DTYPE)
            table[f"{prefix}.{SCALE_SUFFIX}"] = TensorSpec(scale_shape((out_features, in_features), block), f32)
        if bias:
            dense(f"{prefix}.bias", out_features)

    def mlp(prefix: str, intermediate: int) -> None:
        linear(f"{prefix}.gate_proj", intermediate, c.hidden_size)
        linear(f"{prefix}.up_proj", intermediate, c.hidden_size)
        linear(f"{prefix}.down_proj", c.hidden_size, intermediate)

    heads, qk = c.num_attention_heads, c.qk_nope_head_dim + c.qk_rope_head_dim
    dense("model.embed_tokens.weight", c.vocab_size, c.hidden_size)
    for i in range(c.num_hidden_layers + c.num_nextn_predict_layers):
        p = f"model.layers.{i}"
        dense(f"{p}.input_layernorm.weight", c.hidden_size)
        a = f"{p}.self_attn"
        if c.q_lora_rank is None:
            linear(f"{a}.q_proj", heads * qk, c.hidden_size)
        else:
            linear(f"{a}.q_a_proj", c.q_lora_rank, c.hidden_size, bias=c.attention_bias)
            dense(f"{a}.q_a_layernorm.weight", c.q_lora_rank)
            linear(f"{a}.q_b_proj", heads * qk, c.q_lora_rank)
        linear(f"{a}.kv_a_proj_with_mqa", c.kv_lora_rank + c.qk_rope_head_dim, c.hidden_size, bias=c.attention_bias)
        dense(f"{a}.kv_a_layernorm.weight", c.kv_lora_rank)
        linear(f"{a}.kv_b_proj", heads * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank)
        linear(f"{a}.o_proj", c.hidden_size, heads * c.v_head_dim, bias=c.attention_bias)
        dense(f"{p}.post_attention_layernorm.weight", c.hidden_size)
        if c.is_moe_layer(i):
            dense(f"{p}.mlp.gate.weight", c.n_routed_experts, c.hidden_size)
            dense(f"{p}.mlp.gate.e_score_correction_bias", c.n_routed_experts, dtype=f32)
            for e in range(c.n_routed_experts):
                mlp(f"{p}.mlp.experts.{e}", c.moe_intermediate_size)
            if c.n_shared_experts:
                mlp(f"{p}.mlp.shared_experts", c.moe_intermediate_size * c.n_shared_experts)
        else:
            mlp(f"{p}.mlp", c.intermediate_size)
        if i >= c.num_hidden_layers:  # MTP extras (docs/deepseek_v3.md §3.2)
            dense(f"{p}.embed_tokens.weight", c.vocab_size, c.hidden_size)
            dense(f"{p}.enorm.weight", c.hidden_size)
            dense(f"{p}.hnorm.weight", c.hidden_size)
            dense(f"{p}.eh_proj.weight", c.hidden_size, 2 * c.hidden_size)
            dense(f"{p}.shared_head.norm.weight", c.hidden_size)
            dense(f"{p}.shared_head.head.weight", c.vocab_size, c.hidden_size)
    dense("model.norm.weight", c.hidden_size)
    if not c.tie_word_embeddings:
        dense("lm_head.weight", c.vocab_size, c.hidden_size)
    return table


def mtp_layer_indices(config) -> range:
    return range(config.num_hidden_layers, config.num_hidden_layers + config.num_nextn_predict_layers)


def skipped_mtp_key_patterns(config) -> list[str]:
    """Regexes for checkpoint keys of MTP layers this model does not build (silently skipped on load)."""
    built = config.num_mtp_modules
    return [rf"layers\.{i}\." for i in mtp_layer_indices(config) if i >= config.num_hidden_layers + built]
