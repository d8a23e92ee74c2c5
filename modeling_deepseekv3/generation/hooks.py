"""Where ``generate()`` meets this model: the latent cache, the context limit, compiling on a CPU, and MTP decoding.

Every override of a private ``GenerationMixin`` method lives in this file, and nowhere else in the package.
transformers has no public seam for these four needs:

* ``_prepare_cache_for_generation``: ``generate()`` would build a K/V ``DynamicCache``; MLA caches the latent.
* ``_validate_generated_length``: refuse a request longer than ``max_position_embeddings`` up front (RoPE has no
  positions past it) instead of producing garbage after the limit.
* ``_valid_auto_compile_criteria``: ``generate(compile_config=...)`` with a static cache compiles the decode step on
  the CPU too (transformers compiles only on accelerators unless a test-only switch is set; on a CPU the step's
  Python is most of a small model's time, and a user who passes ``compile_config`` asked for it).
* ``_sample``: speculative decoding with the MTP layer. transformers' own route for drafts (assisted decoding
  with a candidate generator) runs one row at a time and crops the cache after each rejection; the MTP loop
  (:func:`~.mtp.mtp_decode`) keeps the whole batch and the latent cache, masking rejected slots instead.

``PRIVATE_API`` records the signatures these overrides were written against; ``tests/unit/test_layout.py``
compares them with the installed transformers and names its version when one changes.
"""

from __future__ import annotations

import copy

from ..core.cache import LatentCache, StaticLatentCache
from .mtp import mtp_cache_length, mtp_decode, mtp_generation_config, mtp_tokens

__all__ = ["PRIVATE_API", "DeepseekV3GenerationMixin"]

#: transformers' private methods overridden here -> the parameters they had when this file was written
PRIVATE_API = {
    "GenerationMixin._sample": (
        "self",
        "input_ids",
        "logits_processor",
        "stopping_criteria",
        "generation_config",
        "synced_gpus",
        "streamer",
        "model_kwargs",
    ),
    "GenerationMixin._prepare_cache_for_generation": (
        "self",
        "generation_config",
        "model_kwargs",
        "generation_mode",
        "batch_size",
        "max_cache_length",
    ),
    "GenerationMixin._valid_auto_compile_criteria": ("self", "model_kwargs", "generation_config"),
    "GenerationMixin._validate_generated_length": (
        "self",
        "generation_config",
        "input_ids_length",
        "has_default_max_length",
    ),
}


class DeepseekV3GenerationMixin:
    """Mixed in before the core causal LM (``modeling.py``); ``use_mtp=True`` (and ``num_speculative_tokens=k``,
    default 1) switches ``generate`` to MTP speculative decoding: lossless, batched, on the latent cache."""

    def generate(self, inputs=None, generation_config=None, **kwargs):
        """transformers' ``generate``; ``use_mtp=True`` (and ``num_speculative_tokens=k``, default 1) runs
        speculative decoding with the MTP layer (``generation/mtp.py``): lossless, batched, on the latent cache."""
        generation_config, kwargs = mtp_generation_config(self, generation_config, kwargs)
        return super().generate(inputs, generation_config, **kwargs)

    def _validate_generated_length(self, generation_config, input_ids_length, has_default_max_length):
        super()._validate_generated_length(generation_config, input_ids_length, has_default_max_length)
        limit = self.config.max_position_embeddings
        if generation_config.max_length is not None and generation_config.max_length > limit:
            raise ValueError(
                f"The prompt ({input_ids_length} tokens) plus the tokens to generate make "
                f"{generation_config.max_length} positions, more than this model's max_position_embeddings ({limit}). "
                "Shorten the prompt or lower max_new_tokens."
            )

    def _valid_auto_compile_criteria(self, model_kwargs, generation_config):
        """transformers' criteria, with a CPU counted as compiling hardware when the caller passed a
        ``compile_config`` (module docstring). Offloaded weights, a dynamic cache or ``disable_compile`` still say no."""
        compile_config = generation_config.compile_config
        if compile_config is not None and self.device.type == "cpu" and not compile_config._compile_all_devices:
            compile_config = copy.copy(compile_config)
            compile_config._compile_all_devices = True
            generation_config = copy.copy(generation_config)
            generation_config.compile_config = compile_config
        return super()._valid_auto_compile_criteria(model_kwargs, generation_config)

    def _sample(
        self,
        input_ids,
        logits_processor,
        stopping_criteria,
        generation_config,
        synced_gpus=False,
        streamer=None,
        **model_kwargs,
    ):
        k = mtp_tokens(generation_config)
        if k is None:
            return super()._sample(
                input_ids,
                logits_processor,
                stopping_criteria,
                generation_config,
                synced_gpus=synced_gpus,
                streamer=streamer,
                **model_kwargs,
            )
        return mtp_decode(
            self,
            input_ids,
            logits_processor,
            stopping_criteria,
            generation_config,
            k,
            streamer=streamer,
            **model_kwargs,
        )

    def _prepare_cache_for_generation(
        self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
    ):
        """Give ``generate()`` the latent cache (transformers would build a K/V ``DynamicCache``).

        ``cache_implementation="static"`` gets a pre-allocated :class:`StaticLatentCache` (for
        ``torch.compile``; with MTP decoding sized for the masked slots of rejected drafts); a user-passed
        cache, ``use_cache=False`` and anything else go to transformers."""
        k = mtp_tokens(generation_config)
        if k is not None:  # the prompt's length is the mask's (generate builds it first); 0 = unknown: an upper bound
            mask = model_kwargs.get("attention_mask")
            prompt = mask.shape[-1] if mask is not None else 0
            max_cache_length = mtp_cache_length(prompt, generation_config.max_length - prompt, k)
        impl = generation_config.cache_implementation
        if (
            model_kwargs.get("cache") is not None
            or generation_config.use_cache is False
            or impl not in (None, "dynamic", "static")
        ):
            return super()._prepare_cache_for_generation(
                generation_config, model_kwargs, generation_mode, batch_size, max_cache_length
            )
        if impl == "static":
            limit = self.config.max_position_embeddings
            if generation_config.max_cache_len is not None and generation_config.max_cache_len > limit:
                # checked before allocating: a cache past the RoPE range is never usable, and allocating (then
                # zero-filling) millions of positions took minutes before anything failed
                raise ValueError(
                    f"max_cache_len={generation_config.max_cache_len} is more than this model's "
                    f"max_position_embeddings ({limit}); positions past it are never used. Pass max_cache_len <= "
                    f"{limit} (or leave it unset: generate sizes the static cache to the prompt plus max_new_tokens)."
                )
            if generation_config.max_cache_len is not None:
                max_cache_length = max(max_cache_length, generation_config.max_cache_len)
            model_kwargs["cache"] = StaticLatentCache(self.config, max_cache_len=max_cache_length)
        else:
            model_kwargs["cache"] = LatentCache(config=self.config)
