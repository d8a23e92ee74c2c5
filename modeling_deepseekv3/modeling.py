"""Assembly and transformers glue: ``DeepseekV3PreTrainedModel``, ``DeepseekV3Model``, ``DeepseekV3ForCausalLM``.

Module and parameter names are the Hub checkpoint's (``model.layers.L.self_attn.kv_a_proj_with_mqa``,
``model.layers.L.mlp.experts.E.down_proj.weight_scale_inv``, ...), so the official shards load 1:1 with no
conversion table. The multi-token-prediction layer stored as ``model.layers.{num_hidden_layers}`` lives at
that index of ``model.layers`` but is a different class (``mtp.py``) and is never run by the main forward.

The parts live elsewhere: blocks in ``decoder.py`` / ``mtp.py``, checkpoint I/O in ``checkpoint/``, the
training losses in ``training/losses.py``; this file only wires them into transformers.
"""

from __future__ import annotations

import contextvars
import os
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers import initialization as init
from transformers.cache_utils import Cache
from transformers.modeling_outputs import MoeCausalLMOutputWithPast, MoeModelOutputWithPast
from transformers.utils.deprecation import deprecate_kwarg
from transformers.utils.output_capturing import OutputRecorder, capture_outputs

from .core.attention import MLAttention, build_attention_mask, packed_segment_ids
from .core.cache import LatentCache, StaticLatentCache
from .checkpoint import load as checkpoint_load
from .checkpoint.layout import skipped_mtp_key_patterns
from .checkpoint.save import save_official
from .core.configuration import RUNTIME_MODEL_TYPE, DeepseekV3PluginConfig, KimiK2Config
from .core.decoder import DeepseekV3DecoderLayer
from .fp8 import FP8Linear
from .fp8.linear import fp8_linear_backend
from .integrations import peft_hook
from .core.layers import RMSNorm
from .core.moe import TopkRouter
from .core.mtp import DeepseekV3MTPLayer
from .core.rope import RotaryEmbedding
from .core import losses

# expert-parallel inference asked for by the from_pretrained call in progress (1: none); read when the skeleton exists
_PENDING_EXPERT_PARALLEL = contextvars.ContextVar("deepseekv3_pending_expert_parallel", default=1)

__all__ = [
    "DeepseekV3CausalLMOutput",
    "DeepseekV3DecoderLayer",
    "DeepseekV3ForCausalLM",
    "DeepseekV3MTPLayer",
    "DeepseekV3Model",
    "DeepseekV3ModelOutput",
    "DeepseekV3PreTrainedModel",
    "KimiK2ForCausalLM",
    "KimiK2Model",
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
    # padding-free batches (position_ids restarts, cu_seq_lens_*) are kept apart: transformers' tests read this
    # flag as "follows the new attention-mask API". _can_compile_fullgraph stays False: the routed experts'
    # dispatch has data-dependent shapes, so the forward does not compile to one graph.
    _supports_attention_backend = True
    _skip_keys_device_placement = ["cache"]
    _can_record_outputs = {
        "hidden_states": DeepseekV3DecoderLayer,
        "attentions": OutputRecorder(MLAttention, index=1),
        "router_logits": OutputRecorder(TopkRouter, index=2),
        "router_indices": OutputRecorder(TopkRouter, index=0),
    }

    def __init__(self, config: DeepseekV3PluginConfig, *args, **kwargs):
        # see RUNTIME_MODEL_TYPE: keeps PEFT from rewriting expert LoRA targets; saving writes the official type
        if "_checkpoint_model_type" not in config.__dict__:
            config._checkpoint_model_type = type(config).model_type
        config.model_type = RUNTIME_MODEL_TYPE
        if config.is_fp8:  # plain PEFT LoRA scripts wrap FP8Linear targets (integrations/peft_hook.py)
            peft_hook.install()
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

    # ---- loading / saving (implementation in checkpoint/) --------------------------------------------
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' ``from_pretrained`` with the checkpoint checked first and FP8 kept as FP8.

        Before anything is built, a local checkout's index, shard files and safetensors headers are
        checked (missing or truncated shards fail here, naming the file). After the model skeleton
        exists, every expected tensor is checked against the shard headers (missing keys, FP8 weights
        without ``weight_scale_inv``, wrong shapes or dtypes) -- so no half-built model is returned.
        ``load_mtp`` defaults to loading the MTP layer only when the checkpoint has it.

        ``distributed_config=DistributedConfig(tp_size=N, ep_size=N, tp_plan={})`` under torchrun: expert
        parallelism for inference -- each rank loads and runs only its 1/N of every MoE layer's routed experts
        (the others are never read from disk), the dense modules are replicated, and every rank must run the same
        batch (the partial expert outputs are summed over the ranks). ``tp_plan="auto"`` is transformers' tensor
        parallelism on the plan the config declares."""
        ep = 1
        if kwargs.get("distributed_config") is not None:
            from .distributed.expert_parallel import expert_parallel_inference_ranks

            ep = expert_parallel_inference_ranks(kwargs["distributed_config"])
            if ep > 1:  # ours, not transformers' EP plans (which shard fused expert tensors we do not have)
                kwargs.pop("distributed_config")
                if torch.cuda.is_available() and kwargs.get("device_map") is None:
                    kwargs["device_map"] = {"": int(os.environ.get("LOCAL_RANK", "0"))}
        kwargs = checkpoint_load.prepare_from_pretrained(cls, pretrained_model_name_or_path, kwargs)
        deferred_4bit = kwargs.pop("_deferred_4bit", None)
        token = _PENDING_EXPERT_PARALLEL.set(ep)
        try:
            loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        finally:
            _PENDING_EXPERT_PARALLEL.reset(token)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True: (model, info)
        checkpoint_load.finalize_loaded_model(model)
        if deferred_4bit is not None:  # FP8 checkpoint -> QLoRA base: dequantize and 4-bit each projection
            from .integrations.bitsandbytes import quantize_linears_4bit

            quantize_linears_4bit(model, deferred_4bit)
        return loaded

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        ep = _PENDING_EXPERT_PARALLEL.get()
        if ep > 1:  # before any weight is read: the other ranks' experts are never loaded here
            from .distributed.expert_parallel import shard_experts_for_inference

            shard_experts_for_inference(model, ep)
            model._keys_to_ignore_on_load_unexpected = {*(model._keys_to_ignore_on_load_unexpected or ()),
                                                        r"mlp\.experts\.\d+\."}
            if expected_keys is not None:
                expected_keys = list(model.state_dict().keys())
        if state_dict is None and checkpoint_files:
            checkpoint_load.check_checkpoint_against_model(model, checkpoint_files, load_config)
        return PreTrainedModel._load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys)

    def save_pretrained(self, save_directory, *args, storage_dtype: torch.dtype | None = None, **kwargs):
        """Write the official layout: FP8 weights and their FP32 scales as they are (untouched tensors
        are byte-identical), router bias FP32, everything else in ``storage_dtype`` (BF16 for FP8
        models, as published; otherwise the embedding's dtype), ``quantization_config`` and the legacy
        ``rope_scaling`` in config.json. Files are staged and moved into place only when complete."""
        return save_official(self, save_directory, storage_dtype, args, kwargs)

    def _save_pretrained_transformers(self, save_directory, *args, **kwargs):
        return super().save_pretrained(save_directory, *args, **kwargs)

    # ---- FP8 helpers --------------------------------------------------------------------------------
    def fp8_modules(self) -> dict[str, FP8Linear]:
        return {name: m for name, m in self.named_modules() if isinstance(m, FP8Linear)}

    def fp8_backend(self) -> dict[str, str]:
        """How each kind of FP8 linear computes for inference, where its weights are now: module names with
        layer and expert indices replaced by ``*`` (``"model.layers.*.mlp.experts.*.down_proj"``) mapped to
        ``"native"``, ``"scaled_mm"``, ``"w8a16"``, ``"w8a16_grouped"`` (routed experts as grouped kernels)
        or ``"dequant"``; ``"a|b"`` where modules of one kind differ (some layers on another device). Empty
        for a model without FP8 weights. Raises :class:`~.fp8.gpu.FP8BackendError` when ``fp8_compute``
        names a backend the weights' device cannot run (as the forward would). Set ``fp8_compute`` to
        change it (``from_pretrained(..., fp8_compute=...)`` or ``set_fp8_compute``)."""
        from .core.moe.experts import RoutedExperts

        grouped = {}
        for name, module in self.named_modules():
            if isinstance(module, RoutedExperts) and module.grouped:  # (experts may be remote under parallelism)
                device = module[0].gate_proj.weight.device if isinstance(module[0].gate_proj, FP8Linear) else None
                if device is not None and module.fp8_grouped_backend(device):
                    grouped[name + "."] = "w8a16_grouped"
        kinds: dict[str, set[str]] = {}
        for name, module in self.fp8_modules().items():
            backend = next((b for prefix, b in grouped.items() if name.startswith(prefix)), None)
            kind = re.sub(r"\.\d+(?=\.|$)", ".*", name)
            kinds.setdefault(kind, set()).add(backend or fp8_linear_backend(module))
        return {kind: "|".join(sorted(b)) for kind, b in kinds.items()}

    def set_fp8_compute(self, mode: str) -> DeepseekV3PreTrainedModel:
        """Switch every FP8 linear's backend (``fp8_compute``, see the config) after loading; validated now
        against the weights' devices. Returns the model."""
        from .fp8.gpu import resolve_backend

        modules = self.fp8_modules().values()
        for device in {m.weight.device for m in modules}:
            resolve_backend(mode, device)  # raises, naming the device, before anything changes
        for module in modules:
            module.compute = mode
        self.config.fp8_compute = mode
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
        self._keys_to_ignore_on_load_unexpected = skipped_mtp_key_patterns(config)
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
        **kwargs,
    ) -> DeepseekV3ModelOutput:
        """``position_ids`` that restart (or ``cu_seq_lens_q``) without an ``attention_mask`` mark a packed,
        padding-free batch: each sequence attends only to itself. ``output_attentions`` runs the expand
        path with an explicit softmax and returns the probabilities per layer."""
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("Pass exactly one of `input_ids` or `inputs_embeds`.")
        if output_attentions is None:
            output_attentions = self.config.output_attentions
        use_cache = use_cache if use_cache is not None else self.config.use_cache
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            use_cache = False
        if inputs_embeds is None:
            if input_ids.numel() == 0:
                raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}); pass at least one token.")
            try:
                inputs_embeds = self.embed_tokens(input_ids)
            except IndexError:  # the lookup failed: say which ids, not just "index out of range"
                bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)]
                raise ValueError(
                    f"input_ids hold ids outside the vocabulary [0, {self.config.vocab_size}) (e.g. {bad[:5].tolist()}); "
                    "the tokenizer does not belong to this model, or the ids are corrupt."
                ) from None
        if use_cache and cache is None:
            cache = LatentCache(config=self.config)
        if not use_cache:
            cache = None

        b, s = inputs_embeds.shape[:2]
        past = cache.get_seq_length() if cache is not None else 0
        kv_len = cache.get_mask_sizes(s, 0)[0] if cache is not None else s
        segments = packed_segment_ids(position_ids, attention_mask, past, cu_seq_lens_q)
        if position_ids is None:
            position_ids = torch.arange(past, past + s, device=inputs_embeds.device)[None].expand(b, s)
        mask = build_attention_mask(attention_mask, b, s, past, kv_len, inputs_embeds.device, segments)
        position_embeddings = self.rotary_emb(position_ids)

        hidden_states = inputs_embeds
        for layer in self.layers[: self.config.num_hidden_layers]:
            hidden_states = layer(
                hidden_states, position_embeddings, attention_mask=mask, cache=cache, output_attentions=output_attentions
            )
        hidden_states = self.norm(hidden_states)
        return DeepseekV3ModelOutput(last_hidden_state=hidden_states, cache=cache)


class DeepseekV3ForCausalLM(DeepseekV3PreTrainedModel, GenerationMixin):
    """``DeepseekV3Model`` + ``lm_head``; labels give the shifted next-token cross-entropy, and in training
    the MTP and balance terms (see :class:`DeepseekV3CausalLMOutput`)."""

    _tied_weights_keys = {"lm_head.weight": "model.embed_tokens.weight"}
    # transformers shards the embedding over the vocabulary whenever a TP plan exists: the head goes with it
    # (a tied head IS the embedding's weight), its logits gathered
    _tp_plan = {"lm_head": "colwise_gather_output"}

    def __init__(self, config: DeepseekV3PluginConfig):
        super().__init__(config)
        self.model = DeepseekV3Model(config)
        self.vocab_size = config.vocab_size
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._keys_to_ignore_on_load_unexpected = skipped_mtp_key_patterns(config)
        self.post_init()

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Embedding) -> None:
        self.model.embed_tokens = value

    def get_output_embeddings(self) -> nn.Linear:
        return self.lm_head

    def set_output_embeddings(self, value: nn.Linear) -> None:
        self.lm_head = value

    def _validate_generated_length(self, generation_config, input_ids_length, has_default_max_length):
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
        limit = self.config.max_position_embeddings
        if generation_config.max_length is not None and generation_config.max_length > limit:
            raise ValueError(
                f"The prompt ({input_ids_length} tokens) plus the tokens to generate make {generation_config.max_length} "
                f"positions, more than this model's max_position_embeddings ({limit}). Shorten the prompt or lower "
                "max_new_tokens."
            )

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """transformers' ``generate``; ``use_mtp=True`` (and ``num_speculative_tokens=k``, default 1) runs
        speculative decoding with the MTP layer (``generation/mtp.py``): lossless, batched, on the latent cache."""
        from .generation.mtp import mtp_generation_config

        generation_config, kwargs = mtp_generation_config(self, generation_config, kwargs)
        return super().generate(inputs, generation_config, **kwargs)

    def _sample(self, input_ids, logits_processor, stopping_criteria, generation_config, synced_gpus=False,
                streamer=None, **model_kwargs):
        from .generation.mtp import mtp_decode, mtp_tokens

        k = mtp_tokens(generation_config)
        if k is None:
            return super()._sample(input_ids, logits_processor, stopping_criteria, generation_config,
                                   synced_gpus=synced_gpus, streamer=streamer, **model_kwargs)
        return mtp_decode(self, input_ids, logits_processor, stopping_criteria, generation_config, k,
                          streamer=streamer, **model_kwargs)

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length):
        """Give ``generate()`` the latent cache (transformers would build a K/V ``DynamicCache``).

        ``cache_implementation="static"`` gets a pre-allocated :class:`StaticLatentCache` (for
        ``torch.compile``; with MTP decoding sized for the masked slots of rejected drafts); a user-passed
        cache, ``use_cache=False`` and anything else go to transformers."""
        from .generation.mtp import mtp_tokens

        k = mtp_tokens(generation_config)
        if k is not None:  # every step appends k + 1 slots and emits at least one token
            max_cache_length = (k + 1) * (max_cache_length + 2)
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
            loss = lm_loss
            mask = attention_mask if attention_mask is not None and attention_mask.dim() == 2 else None
            if balance:
                _check_router_gradients(self, outputs.router_logits)
                per_layer = [
                    losses.balance_loss(idx, logits_TE, batch=outputs.last_hidden_state.shape[0],
                                        alpha=self.config.balance_loss_alpha, mask_BS=mask)
                    for idx, logits_TE in zip(outputs.router_indices, outputs.router_logits)
                ]
                if per_layer:
                    aux_loss = torch.stack(per_layer).sum()
                    loss = loss + aux_loss
            if self.model.mtp_layers and self.config.mtp_loss_weight and input_ids is not None:
                next_labels = losses.next_token_labels(labels, shift_labels)
                segments = packed_segment_ids(position_ids, attention_mask, 0, cu_seq_lens_q)
                mtp_loss = losses.mtp_loss(
                    self, input_ids, outputs.last_hidden_state, next_labels, mask, position_ids, segments
                )
                if self.training:
                    loss = loss + self.config.mtp_loss_weight * mtp_loss
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


def _check_router_gradients(model, router_logits) -> None:
    """The balance loss trains the routers through the recorded router logits. Reentrant activation
    checkpointing runs the layers' first pass without autograd, so those logits carry no gradient and the
    balance term would silently train nothing: refuse that when a router is trainable."""
    if not router_logits or router_logits[0].requires_grad or not torch.is_grad_enabled():
        return
    if any(m.weight.requires_grad for m in model.modules() if isinstance(m, TopkRouter)):
        raise ValueError(
            "balance_loss_alpha > 0 trains the routers, but the router logits have no gradient here: reentrant "
            "activation checkpointing (use_reentrant=True) runs the first pass without autograd. Use "
            "activation_checkpointing_enable({'use_reentrant': False}) (transformers' default), freeze the "
            "routers, or set balance_loss_alpha=0."
        )


class KimiK2Model(DeepseekV3Model):
    """``DeepseekV3Model`` bound to ``KimiK2Config`` (transformers' Auto mappings key on the config class)."""

    config_class = KimiK2Config


class KimiK2ForCausalLM(DeepseekV3ForCausalLM):
    config_class = KimiK2Config
