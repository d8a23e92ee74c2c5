"""transformers' continuous batching (``generate_batch``, ``init_continuous_batching``, ``transformers serve
--continuous-batching``, TRL's ``use_transformers_continuous_batching``) on the MLA latent cache.

The engine calls the model with its ``PagedAttentionCache`` and the step's packed layout; a forward pre-hook turns
them into one :class:`~.paged_latents.PagedLatentBatch` (each request attends over its own latents, read from the
pages; see ``paged_latents.py``), so ``forward`` keeps the signature Trainer reads. :class:`ContinuousBatchingSupport`
(mixed into the public classes in ``modeling.py``) attaches that hook, sizes the cache on CPU from the requests and
what the user allows (transformers' default plans for 90% of the free RAM, zero-filled before the first token, and a
dense mask over all of it), refuses by name requests that could never finish, and with ``use_mtp=True`` hands the
engine to ``mtp_batching.py`` (MTP drafts inside the batch).
"""

from __future__ import annotations

import copy
import logging

import torch

from .paged_latents import PagedLatentBatch

__all__ = [
    "CPU_BATCH_TOKENS",
    "CPU_CACHE_BYTES",
    "CPU_CACHE_REQUESTS",
    "ContinuousBatchingSupport",
    "PagedLatentBatch",
    "check_request",
    "cpu_cache_blocks",
]

logger = logging.getLogger(__name__)

#: On CPU, when the user does not set ``num_blocks``, the latent cache holds this many full-context requests (or what
#: ``generate_batch``'s requests need), within ``CPU_CACHE_BYTES`` or ``max_memory_percent`` of the free RAM;
#: transformers' default fills 90% of the free RAM (TRL's rollouts: 50%) with zeros before the first token.
CPU_CACHE_REQUESTS = 32
CPU_CACHE_BYTES = 2 * 1024**3

#: On CPU, when the user does not set ``max_batch_tokens``: the engine's batch (prefill chunks and decode tokens)
#: per step. transformers sizes it from free memory (8192 here) and allocates, for "sdpa", a dense
#: ``[max_batch_tokens, cache tokens + max_batch_tokens]`` mask the latent attention never reads (with the default
#: cache of the shipped model, 68 MB at 1024; 1.1 GB at 8192 for V3's context). 256 ran the benchmark 1.2x slower.
CPU_BATCH_TOKENS = 1024

# What the engine passes to forward besides the tokens; consumed here, never seen by the core.
_BATCH_KWARGS = ("cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k", "read_index", "write_index")
_DROPPED_KWARGS = ("block_table", "is_causal", "logits_processor_args", "attention_mask")


def cpu_cache_blocks(
    config, cb_config, dtype: torch.dtype, hints=None, budget: int = CPU_CACHE_BYTES, mtp: bool = False
) -> int:
    """Blocks of ``page_size`` tokens (all layers, and the MTP layer's when ``mtp``) for the latent cache on CPU: room
    for ``CPU_CACHE_REQUESTS`` full-context requests, or for what the workload ``hints`` (``generate_batch`` gives
    them) need to run every request at once; never more than ``budget`` bytes."""
    layers = config.num_hidden_layers + int(mtp)
    per_token = (config.kv_lora_rank + config.qk_rope_head_dim) * dtype.itemsize * layers
    page = cb_config.page_size
    context = config.max_position_embeddings
    tokens = CPU_CACHE_REQUESTS * context
    if hints is not None and hints.num_requests and hints.max_prompt_length:
        per_request = min(hints.max_prompt_length + (hints.max_generated_length or 0), context)
        tokens = hints.num_requests * -(-per_request // page) * page
    return max(1, min(budget // per_token, tokens) // page)


class ContinuousBatchingSupport:
    """Mixed in before the core causal LM (``modeling.py``): continuous batching runs on the latent cache."""

    def init_continuous_batching(
        self, generation_config=None, continuous_batching_config=None, workload_hints=None, **kwargs
    ):
        """transformers' ``init_continuous_batching``; on CPU, what ``continuous_batching_config`` leaves unset is
        sized here (:func:`cpu_cache_blocks`, ``CPU_BATCH_TOKENS``) instead of from 90% of the free RAM. The
        manager's ``add_request`` refuses a request that could never finish (see :func:`check_request`). A generation
        config with ``use_mtp=True`` gives a manager that drafts with the MTP layer (``mtp_batching.py``)."""
        cb = self._latent_cache_config(generation_config, continuous_batching_config, workload_hints)
        k = self._mtp_drafts(generation_config)
        if getattr(self, "_paged_latent_hook", None) is None:  # forward keeps its signature (Trainer reads it)
            self._paged_latent_hook = self.register_forward_pre_hook(_paged_latent_batch, with_kwargs=True)
        manager = super().init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb, workload_hints=workload_hints, **kwargs
        )
        if not getattr(manager, "_checks_requests", False):  # a persistent manager comes back already wrapped
            if k:
                from .mtp_batching import attach_mtp

                attach_mtp(manager, self, k)
            manager.add_request = _checked(manager.add_request, manager, self.config, k)
            manager._checks_requests = True
        return manager

    def generate_batch(self, inputs, generation_config=None, continuous_batching_config=None, **kwargs):
        """transformers' ``generate_batch``, raising up front for a request that could never finish (transformers'
        would log the engine's failure and return without it). ``use_mtp=True`` / ``num_speculative_tokens`` (here
        or on the generation config) draft with the MTP layer inside the batch (``mtp_batching.py``); each output
        then carries ``mtp_stats``."""
        from transformers.generation.continuous_batching.utils import WorkloadHints

        gen = self.generation_config if generation_config is None else generation_config
        mtp = {key: kwargs.pop(key) for key in ("use_mtp", "num_speculative_tokens") if key in kwargs}
        if mtp:
            gen = copy.deepcopy(gen)
            for key, value in mtp.items():
                setattr(gen, key, value)
            generation_config = gen
        k = self._mtp_drafts(gen)
        new = kwargs.get("max_new_tokens", gen.max_new_tokens)
        copies = gen.num_return_sequences or 1
        hints = WorkloadHints(
            max_prompt_length=max((len(x) for x in inputs), default=0),
            max_generated_length=(new or 0) + k,  # MTP: the last step's drafts take slots too
            num_requests=len(inputs) * copies,
        )
        cb = self._latent_cache_config(generation_config, continuous_batching_config, hints)
        for x in inputs:
            check_request(self.config, cb, len(x), new, drafts=k)
        return super().generate_batch(inputs, generation_config, continuous_batching_config=cb, **kwargs)

    def _mtp_drafts(self, generation_config) -> int:
        """Drafts per step when the generation config asks for ``use_mtp`` (0 otherwise), validated."""
        gen = self.generation_config if generation_config is None else generation_config
        if not getattr(gen, "use_mtp", False):
            return 0
        from .mtp import speculative_tokens

        return speculative_tokens(self, gen)

    def _latent_cache_config(self, generation_config, continuous_batching_config, workload_hints):
        from transformers.generation.configuration_utils import ContinuousBatchingConfig

        cb = continuous_batching_config
        if cb is None and generation_config is not None:
            cb = getattr(generation_config, "continuous_batching_config", None)
        cb = ContinuousBatchingConfig() if cb is None else cb
        if self.device.type == "cpu":
            if cb.num_blocks is None:  # max_memory_percent (TRL sets 0.5) only bounds it: a CPU cache is zero-filled
                budget = CPU_CACHE_BYTES
                if cb.max_memory_percent is not None:
                    import psutil

                    budget = int(cb.max_memory_percent * psutil.virtual_memory().available)
                mtp = bool(self._mtp_drafts(generation_config))
                cb.num_blocks = cpu_cache_blocks(self.config, cb, self.dtype, workload_hints, budget, mtp)
                logger.info("latent cache on CPU: %d blocks of %d tokens", cb.num_blocks, cb.page_size)
            if cb.max_batch_tokens is None:
                cb.max_batch_tokens = CPU_BATCH_TOKENS
        return cb


def check_request(
    config, cb_config, prompt_tokens: int, max_new_tokens: int | None, drafts: int = 0, **sampling
) -> None:
    """Refuse, by name, a request that could never finish or would not mean what it says: past the model's context
    (as ``generate()`` refuses it), larger than the whole latent cache (transformers' engine would accept it and fail
    it later with "No requests can be scheduled"; MTP ``drafts`` need their slots too), no tokens to generate, or
    sampling settings out of range (the engine would run them as given)."""
    if max_new_tokens is not None and max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be at least 1, got {max_new_tokens}.")
    for name, valid, rule in _SAMPLING_RULES:
        value = sampling.get(name)
        if value is not None and not valid(value):
            raise ValueError(f"{name} must be {rule}, got {value}.")
    needed = prompt_tokens + (max_new_tokens or 0)
    limit = config.max_position_embeddings
    if needed > limit:
        raise ValueError(
            f"The prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) make {needed} positions, "
            f"more than this model's max_position_embeddings ({limit}). Shorten the prompt or lower max_new_tokens."
        )
    if cb_config.num_blocks is not None and needed + drafts > cb_config.num_blocks * cb_config.page_size:
        raise ValueError(
            f"The prompt ({prompt_tokens} tokens) plus max_new_tokens ({max_new_tokens}) need {needed} cache slots; "
            f"the latent cache holds {cb_config.num_blocks * cb_config.page_size} ({cb_config.num_blocks} blocks of "
            f"{cb_config.page_size}). Raise ContinuousBatchingConfig(num_blocks=...) or max_memory_percent, or shorten "
            "the request."
        )


#: per-request sampling settings the engine takes -> the range it silently assumes
_SAMPLING_RULES = (
    ("temperature", lambda t: t > 0, "positive"),
    ("top_p", lambda p: 0 < p <= 1, "in (0, 1]"),
    ("top_k", lambda k: k >= 1, "at least 1"),
)


def _checked(add_request, manager, config, drafts: int = 0):
    """``manager.add_request`` running :func:`check_request` first."""

    def add_checked(input_ids, request_id=None, max_new_tokens=None, *args, **kwargs):
        new = manager.generation_config.max_new_tokens if max_new_tokens is None else max_new_tokens
        sampling = {k: kwargs[k] for k, _, _ in _SAMPLING_RULES if k in kwargs}
        check_request(config, manager.continuous_batching_config, len(input_ids), new, drafts, **sampling)
        return add_request(input_ids, request_id, max_new_tokens, *args, **kwargs)

    return add_checked


def _paged_latent_batch(module, args, kwargs):
    """Forward pre-hook: the engine's paged cache and batch layout become one :class:`PagedLatentBatch`, and the
    batch kwargs the core does not take are consumed here."""
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is None or not _is_paged(cache):
        return None
    batch = PagedLatentBatch(cache, kwargs)
    kwargs = {k: v for k, v in kwargs.items() if k not in (*_BATCH_KWARGS, *_DROPPED_KWARGS, "past_key_values")}
    return args, kwargs | {"cache": batch, "use_cache": True}


def _is_paged(cache) -> bool:
    from transformers.generation.continuous_batching.cache import PagedAttentionCache

    return isinstance(cache, PagedAttentionCache)
