"""The model: ``DeepseekV3Model`` (embedding, decoder layers, final norm, the MTP block) and
``DeepseekV3ForCausalLM`` (+ the head and DeepSeek-V3's training objective).

Module and parameter names are the Hub checkpoint's (``model.layers.L.self_attn.kv_a_proj_with_mqa``,
``model.layers.L.mlp.experts.E.down_proj.weight_scale_inv``, ...), so the official shards load 1:1 with no
conversion table. The multi-token-prediction layer stored as ``model.layers.{num_hidden_layers}`` lives at that
index of ``model.layers`` but is a different class (``mtp.py``) and is never run by the main forward.

Two things here exist for parallelism without knowing about it:

* ``DeepseekV3Model.forward(..., layers=slice(a, b))`` runs only decoder layers ``a..b-1``, embedding only when
  given ``input_ids`` and normalizing only when the slice reaches the last layer: a pipeline stage is this
  forward over its slice (``distributed/pipeline.py``), not a second implementation of it.
* the objective is three named terms (:meth:`DeepseekV3ForCausalLM.balance_objective`,
  :meth:`~DeepseekV3ForCausalLM.mtp_objective`, transformers' ``loss_function``) added by :func:`total_loss`;
  a pipeline's last stage calls the same ones.

Loading, saving, MTP generation, expert-parallel inference and PEFT attach from outside (``modeling.py``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from ..fp8 import FP8Linear, fp8_backends, set_fp8_compute
from . import losses
from .attention import MLAttention, build_attention_mask, packed_segment_ids
from .cache import LatentCache, PackedSequencesCache
from .configuration import DeepseekV3PluginConfig
from .decoder import DeepseekV3DecoderLayer
from .layers import RMSNorm
from .moe import TopkRouter
from .mtp import DeepseekV3MTPLayer
from .rope import RotaryEmbedding

__all__ = [
    "DeepseekV3CausalLMOutput",
    "DeepseekV3ForCausalLM",
    "DeepseekV3Model",
    "DeepseekV3ModelOutput",
    "DeepseekV3PreTrainedModel",
    "total_loss",
]


@dataclass
class DeepseekV3ModelOutput(MoeModelOutputWithPast):
    """``MoeModelOutputWithPast`` plus ``router_indices``: per MoE layer the ``[T, K]`` experts each token
    was sent to (with ``output_router_indices=True``; the balance loss needs them with ``router_logits``)."""

    router_indices: tuple[torch.Tensor, ...] | None = None


@dataclass
class DeepseekV3CausalLMOutput(MoeCausalLMOutputWithPast):
    """``loss`` is what training optimizes: in training mode ``lm_loss + mtp_loss_weight * mtp_loss +
    aux_loss``; in eval mode the plain next-token cross-entropy ``lm_loss`` (so evaluation perplexity is
    the language model's). The parts are reported separately: ``lm_loss``, ``mtp_loss`` (the MTP layers'
    unweighted cross-entropy, also in eval when the MTP layer is loaded), ``aux_loss`` (the sequence-wise
    balance loss, already times ``balance_loss_alpha``; training only)."""

    lm_loss: torch.Tensor | None = None
    mtp_loss: torch.Tensor | None = None
    router_indices: tuple[torch.Tensor, ...] | None = None


def total_loss(lm_loss, mtp_loss, aux_loss, mtp_loss_weight: float, training: bool):
    """DeepSeek-V3's training objective from its terms (any may be None): ``lm + aux + lambda * mtp`` in training;
    the next-token loss alone in evaluation, so evaluation perplexity is the language model's."""
    loss = lm_loss
    if aux_loss is not None:
        loss = aux_loss if loss is None else loss + aux_loss
    if training and mtp_loss is not None and mtp_loss_weight:
        loss = mtp_loss_weight * mtp_loss if loss is None else loss + mtp_loss_weight * mtp_loss
    return loss


class DeepseekV3PreTrainedModel(PreTrainedModel):
    """What transformers needs to know about these models: config class, initialization, placement units,
    the outputs it may record; plus the FP8 views of the model (which linears are FP8, how they compute)."""

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
    # padding-free batches (position_ids restarts, cu_seq_lens_*) are kept apart: transformers' tests read this
    # flag as "follows the new attention-mask API".
    _supports_attention_backend = True
    # a decode step compiles to one graph: the routed experts (whose per-expert loop has data-dependent shapes) are
    # one opaque op inside it (core/moe/experts.py), the static cache writes in place at tensor positions
    _can_compile_fullgraph = True
    _skip_keys_device_placement = ["cache"]
    _can_record_outputs = {
        "hidden_states": DeepseekV3DecoderLayer,
        "attentions": OutputRecorder(MLAttention, index=1),
        "router_logits": OutputRecorder(TopkRouter, index=2),
        "router_indices": OutputRecorder(TopkRouter, index=0),
    }

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

    # ---- FP8 views ----------------------------------------------------------------------------------
    def fp8_modules(self) -> dict[str, FP8Linear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, FP8Linear)}

    def freeze_fp8_storage(self) -> None:
        """FP8 weights and scales never take gradients (LoRA adapts them from outside); transformers and
        Accelerate re-wrap loaded or moved parameters with ``requires_grad=True``, so loading and placement call
        this afterwards."""
        for module in self.fp8_modules().values():
            module.weight.requires_grad_(False)
            module.weight_scale_inv.requires_grad_(False)

    def fp8_backend(self) -> dict[str, str]:
        """How each kind of FP8 linear computes for inference, where its weights are now: module names with
        layer and expert indices replaced by ``*`` (``"model.layers.*.mlp.experts.*.down_proj"``) mapped to
        ``"native"``, ``"scaled_mm"``, ``"w8a16"``, ``"w8a16_grouped"`` (routed experts as grouped kernels)
        or ``"dequant"``; ``"a|b"`` where modules of one kind differ (some layers on another device). Empty
        for a model without FP8 weights. Raises ``FP8BackendError`` when ``fp8_compute`` names a backend the
        weights' device cannot run (as the forward would). Set ``fp8_compute`` to change it
        (``from_pretrained(..., fp8_compute=...)`` or ``set_fp8_compute``)."""
        return fp8_backends(self)

    def set_fp8_compute(self, mode: str) -> DeepseekV3PreTrainedModel:
        """Switch every FP8 linear's backend (``fp8_compute``, see the config) after loading; validated now
        against the weights' devices. Returns the model."""
        set_fp8_compute(self, mode)
        return self

    @torch.no_grad()
    def dequantize_fp8(self, dtype: torch.dtype | None = None) -> DeepseekV3PreTrainedModel:
        """Replace every ``FP8Linear`` by a dense ``nn.Linear`` in ``dtype`` (default: the embedding's
        dtype), one module at a time; the config stops describing an FP8 checkpoint accordingly."""
        dtype = dtype or self.get_input_embeddings().weight.dtype
        for name, module in list(self.fp8_modules().items()):
            parent_name, _, child = name.rpartition(".")
            setattr(self.get_submodule(parent_name), child, module.to_dense(dtype))
        self.config.fp8_quantization_config = None
        return self


class DeepseekV3Model(DeepseekV3PreTrainedModel):
    """Embedding, ``num_hidden_layers`` decoder layers, final norm; plus the MTP layer(s) when loaded.

    ``output_hidden_states``, ``output_router_logits``, ``output_router_indices`` and ``return_dict``
    follow transformers' conventions (output recording, ``capture_outputs``)."""

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
        self.post_init()

    @property
    def mtp_layers(self) -> list[DeepseekV3MTPLayer]:
        return list(self.layers[self.config.num_hidden_layers :])

    def get_input_embeddings(self) -> nn.Embedding:
        return self.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.embed_tokens = value

    @capture_outputs
    @deprecate_kwarg("past_key_values", version="6.0.0", new_name="cache")
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        inputs_embeds: torch.Tensor | None = None,
        use_cache: bool | None = None,
        output_attentions: bool | None = None,
        cu_seq_lens_q: torch.Tensor | None = None,
        layers: slice | None = None,
        **kwargs,
    ) -> DeepseekV3ModelOutput:
        """``position_ids`` that restart (or ``cu_seq_lens_q``) without an ``attention_mask`` mark a packed,
        padding-free batch: each sequence attends only to itself. ``output_attentions`` runs the expand
        path with an explicit softmax and returns the probabilities per layer. ``layers``: run only that slice
        of the decoder layers (a pipeline stage; ``inputs_embeds`` then carries the previous stage's hidden
        states), with the final norm only when the slice ends at the last layer."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False
        if inputs_embeds is None:
            inputs_embeds = self._embed(input_ids)
        b, s = inputs_embeds.shape[:2]
        if isinstance(cache, PackedSequencesCache):  # the cache lays the sequences out: no mask to build here
            if position_ids is None:
                raise ValueError("A PackedSequencesCache needs the position_ids of its packed tokens.")
            mask = None
        else:
            if use_cache and cache is None:
                cache = LatentCache(config=self.config)
            if not use_cache:
                cache = None
            past = cache.get_seq_length() if cache is not None else 0
            kv_len = cache.get_mask_sizes(s, 0)[0] if cache is not None else s
            segments = packed_segment_ids(position_ids, attention_mask, past, cu_seq_lens_q)
            if position_ids is None:  # (past: a tensor for a static cache, whose arange would have a data size)
                position_ids = (torch.arange(s, device=inputs_embeds.device) + past)[None].expand(b, s)
            mask = build_attention_mask(attention_mask, b, s, past, kv_len, inputs_embeds.device, segments)
        position_embeddings = self.rotary_emb(position_ids)

        n = self.config.num_hidden_layers
        layers = layers if layers is not None else slice(0, n)
        hidden_states = inputs_embeds
        for layer in self.layers[:n][layers]:
            hidden_states = layer(
                hidden_states,
                position_embeddings,
                attention_mask=mask,
                cache=cache,
                output_attentions=output_attentions,
            )
        if range(n)[layers][-1:] == range(n - 1, n):  # the slice ends at the last decoder layer
            hidden_states = self.norm(hidden_states)
        return DeepseekV3ModelOutput(last_hidden_state=hidden_states, cache=cache)

    def _embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        if input_ids.numel() == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); pass at least one token.")
        try:
            return self.embed_tokens(input_ids)
        except IndexError:  # the lookup failed: say which ids, not just "index out of range"
            bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)]
            raise ValueError(
                f"input_ids hold ids outside the vocabulary [0, {self.config.vocab_size}) (e.g. {bad[:5].tolist()}); "
                "the tokenizer does not belong to this model, or the ids are corrupt."
            ) from None


class DeepseekV3ForCausalLM(DeepseekV3PreTrainedModel, GenerationMixin):
    """``DeepseekV3Model`` + ``lm_head``; labels give the shifted next-token cross-entropy, and in training
    the MTP and balance terms (see :class:`DeepseekV3CausalLMOutput`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # transformers shards the embedding over the vocabulary whenever a TP plan exists: the head goes with it
    # (a tied head IS the embedding's weight), its logits gathered
    _tp_plan = {"lm_head": "colwise_gather_output"}
    base_model_class = DeepseekV3Model  # what ``self.model`` is built from (the assembly names its own)

    def __init__(self, config: DeepseekV3PluginConfig):
        super().__init__(config)
        self.model = self.base_model_class(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

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
        output_router_logits: bool | None = None,
        return_dict: bool | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> DeepseekV3CausalLMOutput:
        shift_labels = kwargs.pop("shift_labels", None)
        if shift_labels is not None:
            shift_labels = shift_labels.contiguous()  # transformers' loss views it flat
        cu_seq_lens_q = kwargs.pop("cu_seq_lens_q", None)
        for key in ("cu_seq_lens_k", "max_length_q", "max_length_k", "seq_idx"):  # varlen kernels' extras
            kwargs.pop(key, None)
        has_labels = labels is not None or shift_labels is not None
        balance = has_labels and self.training and self.config.balance_loss_alpha > 0
        flags = {  # None = the config's default, which capture_outputs reads only when the flag is absent
            "output_hidden_states": output_hidden_states,
            "output_attentions": output_attentions,
            "output_router_logits": True if balance else output_router_logits,
            "output_router_indices": True if balance else None,
        }
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            cu_seq_lens_q=cu_seq_lens_q,
            return_dict=True,
            **{k: v for k, v in flags.items() if v is not None},
        )
        hidden_states = outputs.last_hidden_state
        if isinstance(logits_to_keep, int):
            hidden_states = hidden_states[:, -logits_to_keep:] if logits_to_keep else hidden_states
        else:
            hidden_states = hidden_states[:, logits_to_keep]
        logits = self.lm_head(hidden_states)

        loss = lm_loss = mtp_loss = aux_loss = None
        if has_labels:
            lm_loss = self.loss_function(
                logits=logits, labels=labels, vocab_size=self.config.vocab_size, shift_labels=shift_labels, **kwargs
            )
            mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            if balance:
                batch = outputs.last_hidden_state.shape[0]
                aux_loss = self.balance_objective(outputs.router_indices, outputs.router_logits, batch, mask)
            if self.model.mtp_layers and self.config.mtp_loss_weight and input_ids is not None:
                segments = packed_segment_ids(position_ids, attention_mask, 0, cu_seq_lens_q)
                mtp_loss = self.mtp_objective(
                    input_ids,
                    outputs.last_hidden_state,
                    losses.next_token_labels(labels, shift_labels),
                    mask,
                    position_ids,
                    segments,
                )
            loss = total_loss(lm_loss, mtp_loss, aux_loss, self.config.mtp_loss_weight, self.training)
        out = DeepseekV3CausalLMOutput(
            loss=loss,
            lm_loss=lm_loss,
            mtp_loss=mtp_loss,
            aux_loss=aux_loss,
            logits=logits,
            cache=outputs.cache,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits if (output_router_logits or self.config.output_router_logits) else None,
        )
        return out if return_dict is not False else out.to_tuple()

    def balance_objective(self, router_indices, router_logits, batch: int, mask_BS: torch.Tensor | None = None):
        """The sequence-wise balance loss summed over the MoE layers whose routing was recorded (None if none
        ran), for ``batch`` sequences (``mask_BS`` marks their real tokens).

        The term trains the routers through the recorded logits. Reentrant activation checkpointing runs the
        layers' first pass without autograd, so those logits would carry no gradient and the term would silently
        train nothing: refused when a router is trainable."""
        if not router_logits:
            return None
        if not router_logits[0].requires_grad and torch.is_grad_enabled():
            if any(m.weight.requires_grad for m in self.modules() if isinstance(m, TopkRouter)):
                raise ValueError(
                    "balance_loss_alpha > 0 trains the routers, but the router logits have no gradient here: "
                    "reentrant activation checkpointing (use_reentrant=True) runs the first pass without autograd. "
                    "Use activation_checkpointing_enable({'use_reentrant': False}) (transformers' default), freeze "
                    "the routers, or set balance_loss_alpha=0."
                )
        per_layer = [
            losses.balance_loss(idx_TK, logits_TE, batch=batch, alpha=self.config.balance_loss_alpha, mask_BS=mask_BS)
            for idx_TK, logits_TE in zip(router_indices, router_logits)
        ]
        return torch.stack(per_layer).sum()

    def mtp_objective(self, input_ids, hidden, next_labels, mask_BS=None, position_ids=None, segment_ids=None):
        """The MTP layers' cross-entropy (``losses.mtp_loss``) from the main model's final hidden states."""
        return losses.mtp_loss(self, input_ids, hidden, next_labels, mask_BS, position_ids, segment_ids)
