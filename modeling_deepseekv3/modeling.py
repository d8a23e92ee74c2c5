"""Assembly and transformers glue: decoder layer, MTP layer, ``DeepseekV3Model``, ``DeepseekV3ForCausalLM``.

Module and parameter names are the Hub checkpoint's (``model.layers.L.self_attn.kv_a_proj_with_mqa``,
``model.layers.L.mlp.experts.E.down_proj.weight_scale_inv``, ...), so the official shards load 1:1 with no
conversion table. The multi-token-prediction layer stored as ``model.layers.{num_hidden_layers}`` lives at
that index of ``model.layers`` but is a different class and is never run by the main forward.

Checkpoint I/O (validation before load, the official layout on save, FP8 bookkeeping) lives in
``loading.py``; this file only wires it into ``from_pretrained`` / ``save_pretrained``.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.modeling_outputs import BaseModelOutputWithPast, MoeCausalLMOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg

from . import loading
from .attention import MLAttention
from .cache import LatentCache, StaticLatentCache
from .configuration import RUNTIME_MODEL_TYPE, DeepseekV3PluginConfig, KimiK2Config
from .fp8 import FP8Linear
from .layers import RMSNorm, SwiGLUMLP
from .moe import DeepseekV3MoE, TopkRouter
from .rope import RotaryEmbedding

__all__ = [
    "DeepseekV3DecoderLayer",
    "DeepseekV3MTPLayer",
    "DeepseekV3PreTrainedModel",
    "DeepseekV3Model",
    "DeepseekV3ForCausalLM",
    "KimiK2Model",
    "KimiK2ForCausalLM",
]


class DeepseekV3DecoderLayer(GradientCheckpointingLayer):
    """Pre-norm block: ``x + MLA(norm(x))`` then ``x + FFN(norm(x))``; FFN is dense below
    ``first_k_dense_replace``, MoE above."""

    def __init__(self, config: DeepseekV3PluginConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.self_attn = MLAttention(config, layer_idx)
        if config.is_moe_layer(layer_idx):
            self.mlp = DeepseekV3MoE(config)
        else:
            self.mlp = SwiGLUMLP(config, config.intermediate_size)
        self.input_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
        **kwargs,
    ) -> torch.Tensor:
        residual = hidden_states
        hidden_states = self.self_attn(self.input_layernorm(hidden_states), position_embeddings, attention_mask, cache)
        hidden_states = residual + hidden_states
        residual = hidden_states
        hidden_states = self.mlp(self.post_attention_layernorm(hidden_states))
        return residual + hidden_states


class SharedHead(nn.Module):
    """``shared_head``: the MTP layer's final norm and output head (a copy of ``lm_head``)."""

    def __init__(self, config: DeepseekV3PluginConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(hidden_states))


class DeepseekV3MTPLayer(DeepseekV3DecoderLayer):
    """Multi-token prediction module ``model.layers.{num_hidden_layers + k}`` (spec §8.2).

    For position i with the next token ``t_{i+1}`` known: ``x = eh_proj([enorm(emb(t_{i+1})) ;
    hnorm(h_i)])`` (embedding half first -- the order the released weights need), then this layer's MLA +
    MoE block, then ``shared_head`` -> logits for ``t_{i+2}``. ``h_i`` is the main model's final hidden
    state after ``model.norm`` (what vLLM/SGLang feed). Its ``embed_tokens`` / ``shared_head.head`` are
    the checkpoint's own copies of the main embedding and head."""

    def __init__(self, config: DeepseekV3PluginConfig, layer_idx: int):
        super().__init__(config, layer_idx)
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.enorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.shared_head = SharedHead(config)

    def predict(
        self,
        next_input_ids: torch.Tensor,
        previous_hidden: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None = None,
        cache: Cache | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``next_input_ids [B, S]`` (tokens i+1), ``previous_hidden [B, S, D]`` (post-norm h_i) ->
        ``(hidden [B, S, D], logits [B, S, V])`` predicting tokens i+2."""
        e = self.enorm(self.embed_tokens(next_input_ids))
        h = self.hnorm(previous_hidden)
        x = self.eh_proj(torch.cat((e, h), dim=-1))  # (B, S, D)
        x = super().forward(x, position_embeddings, attention_mask, cache)
        return x, self.shared_head(x)


class DeepseekV3PreTrainedModel(PreTrainedModel):
    """Shared glue: init, FP8 bookkeeping, checkpoint validation on load, the official layout on save."""

    config_class = DeepseekV3PluginConfig
    config: DeepseekV3PluginConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = True
    # The units Accelerate must keep on one device: the attention block, each MLP (dense, shared, and every
    # routed expert), the router. Decoder layers themselves may be split, so device_map="auto" can spread
    # one MoE layer's experts over devices and offload them one by one.
    _no_split_modules = ["MLAttention", "SwiGLUMLP", "TopkRouter"]
    _keep_in_fp32_modules_strict = ["e_score_correction_bias", "gate.weight"]
    _supports_sdpa = True
    _skip_keys_device_placement = ["cache"]

    def __init__(self, config: DeepseekV3PluginConfig, *args, **kwargs):
        # see RUNTIME_MODEL_TYPE: keeps PEFT from rewriting expert LoRA targets; saving writes the official type
        if "_checkpoint_model_type" not in config.__dict__:
            config._checkpoint_model_type = type(config).model_type
        config.model_type = RUNTIME_MODEL_TYPE
        super().__init__(config, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        std = self.config.initializer_range
        if isinstance(module, FP8Linear):
            if not getattr(module.weight, "_is_hf_initialized", False):
                dense = torch.randn(module.out_features, module.in_features, device=module.weight.device) * std
                module.set_dense_weight(dense, self.config.fp8_scale_fmt)
                module.weight._is_hf_initialized = True
                module.weight_scale_inv._is_hf_initialized = True
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, TopkRouter):
            init.normal_(module.weight, mean=0.0, std=std)
            init.zeros_(module.e_score_correction_bias)
        else:
            super()._init_weights(module)

    # ---- loading / saving (implementation in loading.py) ----------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' ``from_pretrained`` with the checkpoint checked first and FP8 kept as FP8.

        Before anything is built, a local checkout's index, shard files and safetensors headers are
        checked (missing or truncated shards fail here, naming the file). After the model skeleton
        exists, every expected tensor is checked against the shard headers (missing keys, FP8 weights
        without ``weight_scale_inv``, wrong shapes or dtypes) -- so no half-built model is returned.
        ``load_mtp`` defaults to loading the MTP layer only when the checkpoint has it."""
        kwargs = loading.prepare_from_pretrained(cls, pretrained_model_name_or_path, kwargs)
        deferred_4bit = kwargs.pop("_deferred_4bit", None)
        model = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        loading.finalize_loaded_model(model)
        if deferred_4bit is not None:  # FP8 checkpoint -> QLoRA base: dequantize and 4-bit each projection
            from .qlora import quantize_linears_4bit

            quantize_linears_4bit(model, deferred_4bit)
        return model

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        if state_dict is None and checkpoint_files:
            loading.check_checkpoint_against_model(model, checkpoint_files, load_config)
        return PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys)

    def save_pretrained(self, save_directory, *args, storage_dtype: torch.dtype | None = None, **kwargs):
        """Write the official layout: FP8 weights and their FP32 scales as they are (untouched tensors
        are byte-identical), router bias FP32, everything else in ``storage_dtype`` (BF16 for FP8
        models, as published; otherwise the embedding's dtype), ``quantization_config`` and the legacy
        ``rope_scaling`` in config.json. Files are staged and moved into place only when complete."""
        return loading.save_official(self, save_directory, storage_dtype, args, kwargs)

    def _save_pretrained_transformers(self, save_directory, *args, **kwargs):
        return super().save_pretrained(save_directory, *args, **kwargs)

    # ---- FP8 helpers --------------------------------------------------------------------------------
    def fp8_modules(self) -> dict[str, FP8Linear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, FP8Linear)}

    @torch.no_grad()
    def dequantize_fp8(self, dtype: torch.dtype | None = None) -> "DeepseekV3PreTrainedModel":
        """Replace every ``FP8Linear`` by a dense ``nn.Linear`` in ``dtype`` (default: the embedding's
        dtype), one module at a time; the config stops describing an FP8 checkpoint accordingly."""
        dtype = dtype or self.get_input_embeddings().weight.dtype
        for name, module in list(self.fp8_modules().items()):
            parent_name, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent_name), child, module.to_dense(dtype))
        self.config.fp8_quantization_config = None
        return self


class DeepseekV3Model(DeepseekV3PreTrainedModel):
    """Embedding, ``num_hidden_layers`` decoder layers, final norm; plus the MTP layer(s) when loaded."""

    def __init__(self, config: DeepseekV3PluginConfig):
        super().__init__(config)
        self.vocab_size = config.vocab_size
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        n = config.num_hidden_layers
        layers = [DeepseekV3DecoderLayer(config, i) for i in range(n)]
        layers += [DeepseekV3MTPLayer(config, n + k) for k in range(config.num_mtp_modules)]
        self.layers = nn.ModuleList(layers)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.rotary_emb = RotaryEmbedding(config)
        self.gradient_checkpointing = False
        self._keys_to_ignore_on_load_unexpected = loading.skipped_mtp_key_patterns(config)
        self.post_init()

    @property
    def mtp_layers(self) -> list[DeepseekV3MTPLayer]:
        return list(self.layers[self.config.num_hidden_layers :])

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @deprecate_kwarg("past_key_values", version="6.0.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPast:
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if output_attentions:
            raise ValueError(
                "output_attentions=True is not supported: MLA runs through scaled_dot_product_attention and "
                "never materializes the attention matrix."
            )
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self.embed_tokens(input_ids)
        if use_cache and cache is None:
            cache = LatentCache(config=self.config)
        if not use_cache:
            cache = None

        b, s = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        kv_len = cache.get_mask_sizes(s, 0)[0] if cache is not None else s
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=inputs_embeds.device)[None].expand(b, s)
        mask = build_attention_mask(attention_mask, b, s, past, kv_len, inputs_embeds.device)
        position_embeddings = self.rotary_emb(position_ids)

        hidden_states = inputs_embeds
        all_hidden = [] if output_hidden_states else None
        for layer in self.layers[: self.config.num_hidden_layers]:
            if all_hidden is not None:
                all_hidden.append(hidden_states)
            hidden_states = layer(hidden_states, position_embeddings, attention_mask=mask, cache=cache)
        hidden_states = self.norm(hidden_states)
        if all_hidden is not None:
            all_hidden.append(hidden_states)
        return BaseModelOutputWithPast(
            last_hidden_state=hidden_states,
            cache=cache,
            hidden_states=tuple(all_hidden) if all_hidden is not None else None,
        )


def build_attention_mask(
    attention_mask: torch.Tensor | None, batch: int, q_len: int, past, kv_len: int, device
) -> torch.Tensor | None:
    """Boolean ``[B, 1, S, kv_len]`` mask (True = may attend), or None when plain causal attention suffices.

    ``attention_mask`` is the usual ``[B, past + S]`` 0/1 padding mask, or an already-built 4-D mask
    (boolean, or additive float with 0 = attend, as ``generate()`` builds for static caches). Query ``i``
    sits at cache index ``past + i`` and sees keys ``j <= past + i`` that are not padding; ``kv_len``
    exceeds ``past + S`` for a pre-allocated cache, whose unwritten slots are masked by position. A query
    on a padding token still sees itself, so its row never becomes all ``-inf`` (its output is ignored
    but stays finite)."""
    q_pos = torch.arange(q_len, device=device)[:, None] + past  # (S, 1)
    k_pos = torch.arange(kv_len, device=device)[None, :]  # (1, T)
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        return mask.to(device) | (k_pos == q_pos)[None, None]
    padded = attention_mask is not None and not bool(attention_mask.all())
    dense = isinstance(past, int) and kv_len == past + q_len
    if dense and not padded and (q_len == 1 or past == 0):
        return None
    mask = (k_pos <= q_pos)[None, None].expand(batch, 1, q_len, kv_len)  # (B, 1, S, T)
    if padded:
        keep = attention_mask.to(device=device, dtype=torch.bool)
        if keep.shape[-1] < kv_len:  # pre-allocated cache: slots beyond the mask are masked by position
            keep = torch.nn.functional.pad(keep, (0, kv_len - keep.shape[-1]), value=True)
        elif keep.shape[-1] != kv_len:
            raise ValueError(
                f"attention_mask covers {attention_mask.shape[-1]} positions but the cache plus the new tokens "
                f"are {kv_len}; pass the mask for the whole sequence so far."
            )
        mask = (mask & keep[:, None, None, :]) | (k_pos == q_pos)[None, None]
    return mask


class DeepseekV3ForCausalLM(DeepseekV3PreTrainedModel, GenerationMixin):
    """``DeepseekV3Model`` + ``lm_head``; labels give the shifted next-token cross-entropy."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}

    def __init__(self, config: DeepseekV3PluginConfig):
        super().__init__(config)
        self.model = DeepseekV3Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._keys_to_ignore_on_load_unexpected = loading.skipped_mtp_key_patterns(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def _validate_generated_length(self, generation_config, input_ids_length, has_default_max_length):
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
        limit = self.config.max_position_embeddings
        if generation_config.max_length is not None and generation_config.max_length > limit:
            raise ValueError(
                f"The prompt ({input_ids_length} tokens) plus the tokens to generate make {generation_config.max_length} "
                f"positions, more than this model's max_position_embeddings ({limit}). Shorten the prompt or lower "
                "max_new_tokens."
            )

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        """Give ``generate()`` the latent cache (transformers would build a K/V ``DynamicCache``).

        ``cache_implementation="static"`` gets a pre-allocated :class:`StaticLatentCache` (for
        ``torch.compile``); a user-passed cache, ``use_cache=False`` and anything else go to transformers."""
        impl = generation_config.cache_implementation
        if model_kwargs.get("cache") is not None or generation_config.use_cache is False or impl not in (None, "dynamic", "static"):
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        if impl == "static":
            if generation_config.max_cache_len is not None:
                max_cache_length = max(max_cache_length, generation_config.max_cache_len)
            model_kwargs["cache"] = StaticLatentCache(self.config, max_cache_len=max_cache_length)
        else:
            model_kwargs["cache"] = LatentCache(config=self.config)

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    @deprecate_kwarg("past_key_values", version="6.0.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        output_hidden_states: bool | None = None,
        output_attentions: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> MoeCausalLMOutputWithPast:
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            output_attentions=output_attentions,
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)
        loss = aux_loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
            aux_loss = self._training_losses(input_ids, outputs.last_hidden_state, labels, attention_mask)
            if aux_loss is not None:
                loss = loss + aux_loss
        out = MoeCausalLMOutputWithPast(
            loss=loss, aux_loss=aux_loss, logits=logits, cache=outputs.cache, hidden_states=outputs.hidden_states
        )
        return out if return_dict is not False else out.to_tuple()

    def _training_losses(self, input_ids, hidden, labels, attention_mask) -> torch.Tensor | None:
        """Balance loss (training only) and MTP loss (with the MTP layer loaded); see training.py."""
        from . import training

        terms = []
        alpha = getattr(self.config, "balance_loss_alpha", 0.0)
        if self.training and alpha:
            mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            for layer in self.model.layers[: self.config.num_hidden_layers]:
                routing = getattr(layer.mlp, "last_routing", None)
                if routing is not None:
                    terms.append(training.balance_loss(*routing, batch=hidden.shape[0], alpha=alpha, mask_BS=mask))
        weight = getattr(self.config, "mtp_loss_weight", 0.0)
        if weight and self.model.mtp_layers and input_ids is not None:
            mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            terms.append(weight * training.mtp_loss(self, input_ids, hidden, labels, mask))
        return torch.stack(terms).sum() if terms else None


class KimiK2Model(DeepseekV3Model):
    """``DeepseekV3Model`` bound to ``KimiK2Config`` (transformers' Auto mappings key on the config class)."""

    config_class = KimiK2Config


class KimiK2ForCausalLM(DeepseekV3ForCausalLM):
    config_class = KimiK2Config
