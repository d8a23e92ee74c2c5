"""The MLA latent cache in transformers' Cache API.

Per layer and token MLA needs only ``[c_kv ; k_pe]``: the normalized KV latent (``kv_lora_rank`` = 512)
and the roped shared key (``qk_rope_head_dim`` = 64) -- 576 values, 1152 bytes in BF16, against 80 KiB
per token per layer for expanded K/V (docs/deepseek_v3.md §5.3). The absorbed attention path reads it directly.

Storage formats (config knob ``latent_cache_format``):

``"dtype"`` the model's compute dtype (BF16: 1152 B/token/layer; FP32: 2304).
``"fp8"``   FlashMLA's layout: the 512 latent values in float8_e4m3fn with one float32 scale per 128
            values, the 64 rope values in BF16: 512 + 4*4 + 64*2 = **656 B/token/layer**.
``"fp8_plain"`` all 576 values cast to float8_e4m3fn with no scales: 576 B/token/layer. Cheapest,
            least accurate (values below ~2^-9 flush to zero, relative error up to 1/16).

Layers speak the standard ``update(keys, values)`` protocol with the latent as one-head keys
``[B, 1, S, 576]`` and zero-width values, so the attention code is the same for this cache and for a
plain ``DynamicCache`` a user may pass. ``generate()`` gets a ``LatentCache`` (or, with
``cache_implementation="static"``, a ``StaticLatentCache``) injected by the model.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from ..fp8 import FP8_DTYPE, FP8_MAX, block_dequantize, block_quantize
from .configuration import LATENT_CACHE_FORMATS

__all__ = [
    "LatentCache",
    "LatentLayer",
    "PackedSequencesCache",
    "StaticLatentCache",
    "StaticLatentLayer",
    "latent_bytes_per_token",
]

_GROUP = 128  # latent values per FP8 scale in the "fp8" format


def latent_bytes_per_token(kv_lora_rank: int, rope_dim: int, fmt: str, dtype: torch.dtype) -> int:
    """Bytes one token occupies in one layer's cache."""
    if fmt == "fp8":
        return kv_lora_rank + 4 * -(-kv_lora_rank // _GROUP) + 2 * rope_dim
    if fmt == "fp8_plain":
        return kv_lora_rank + rope_dim
    return (kv_lora_rank + rope_dim) * dtype.itemsize


class _LatentCodec:
    """Packs ``[B, T, r + rope]`` latents into the storage format and back."""

    def __init__(self, fmt: str, kv_lora_rank: int):
        fmt = "dtype" if fmt == "auto" else fmt  # its earlier name (configs set it after construction too)
        if fmt not in LATENT_CACHE_FORMATS:
            raise ValueError(f"latent_cache_format must be one of {LATENT_CACHE_FORMATS}, got {fmt!r}.")
        self.fmt = fmt
        self.rank = kv_lora_rank

    def encode(self, latent: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.fmt == "dtype":
            return {"latent": latent}
        if self.fmt == "fp8_plain":
            return {"latent": latent.clamp(-FP8_MAX, FP8_MAX).to(FP8_DTYPE)}
        b, t, _ = latent.shape
        c_kv, k_pe = latent[..., : self.rank], latent[..., self.rank :]
        # FlashMLA's groups are the FP8 weight format's blocks with one row: 1 x 128, amax / 448 each
        q, scale = block_quantize(c_kv.reshape(b * t, self.rank), (1, _GROUP))  # (B*T, r), (B*T, G)
        return {"latent": q.view(b, t, -1), "scale": scale.view(b, t, -1), "rope": k_pe.to(torch.bfloat16)}

    def decode(self, parts: dict[str, torch.Tensor], dtype: torch.dtype) -> torch.Tensor:
        if self.fmt == "dtype":
            return parts["latent"]
        if self.fmt == "fp8_plain":
            return parts["latent"].to(dtype)
        q, scale, rope = parts["latent"], parts["scale"], parts["rope"]
        b, t, _ = q.shape
        c_kv = block_dequantize(q.reshape(b * t, -1), scale.reshape(b * t, -1), (1, _GROUP), dtype)  # (B*T, r)
        return torch.cat((c_kv.view(b, t, -1), rope.to(dtype)), dim=-1)


class LatentLayer(CacheLayerMixin):
    """One layer of a growing latent cache. Stores ``[B, T, ...]`` tensors (see the module docstring)."""

    is_croppable = True
    is_sliding = False

    def __init__(self, kv_lora_rank: int | None = None, latent_cache_format: str = "dtype", **kwargs):
        self.parts: dict[str, torch.Tensor] = {}
        super().__init__()
        self.kv_lora_rank = kv_lora_rank
        self.fmt = latent_cache_format
        self.dtype: torch.dtype | None = None

    # The Cache API's per-layer ``keys`` / ``values``: the stored latent decoded to the compute dtype as one-head
    # keys ``[B, 1, T, kv_lora_rank + rope]`` (a view, no copy, for the "dtype" format) and zero-width values
    # ``[B, 1, T, 0]`` -- what ``update`` returns and what tools inspecting a cache read. Read-only: write with
    # ``update``.
    @property
    def keys(self) -> torch.Tensor | None:
        return self._as_keys_values(self.codec.decode(self.parts, self.dtype))[0] if self.parts else None

    @keys.setter
    def keys(self, value) -> None:
        if value is not None:
            raise AttributeError("LatentLayer.keys is the stored latent; write it with update().")

    @property
    def values(self) -> torch.Tensor | None:
        return self._as_keys_values(self.codec.decode(self.parts, self.dtype))[1] if self.parts else None

    @values.setter
    def values(self, value) -> None:
        if value is not None:
            raise AttributeError("LatentLayer.values is derived from the stored latent; write with update().")

    # -- protocol -----------------------------------------------------------------------------------
    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        if self.kv_lora_rank is None:
            raise ValueError("LatentLayer needs kv_lora_rank; build the cache with LatentCache(config=model.config).")
        self.codec = _LatentCodec(self.fmt, self.kv_lora_rank)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None, *args, **kwargs):
        """``key_states [B, 1, S, D]`` (the new latents) -> ``([B, 1, T, D] all latents, [B, 1, T, 0])``."""
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = self.codec.encode(key_states[:, 0])
        if not self.parts:
            self.parts = new
        else:
            self.parts = {k: torch.cat((self.parts[k], v), dim=1) for k, v in new.items()}
        return self._as_keys_values(self.codec.decode(self.parts, self.dtype))

    @staticmethod
    def _as_keys_values(latent: torch.Tensor):
        b, t, _ = latent.shape
        return latent[:, None], latent.new_empty(b, 1, t, 0)

    def get_seq_length(self) -> int:
        return self.parts["latent"].shape[1] if self.parts else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_max_length(self) -> int:
        return -1

    @property
    def latent(self) -> torch.Tensor | None:
        """The stored latents decoded to the compute dtype, ``[B, T, r + rope]`` (None when empty)."""
        return self.codec.decode(self.parts, self.dtype) if self.parts else None

    # -- bookkeeping generate() needs ---------------------------------------------------------------
    def _map(self, fn) -> None:
        if self.parts:
            self.parts = {k: fn(v) for k, v in self.parts.items()}

    def reset(self) -> None:
        self.parts = {}

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}.")
        if tokens_to_remove:
            self._map(lambda t: t[:, :tokens_to_remove])

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        self._map(lambda t: t[indices])

    def offload(self) -> None:
        self._map(lambda t: t.to("cpu", non_blocking=True))

    def prefetch(self) -> None:
        if self.is_initialized:
            self._map(lambda t: t.to(self.device, non_blocking=True))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


class StaticLatentLayer(LatentLayer):
    """Pre-allocated latent layer for ``torch.compile``: fixed ``[B, max_cache_len, ...]`` buffers written in
    place at ``cumulative_length`` (a tensor, so positions never become Python ints that force
    recompiles). ``update`` returns the whole buffer; unwritten slots are masked out by position."""

    is_compileable = True

    def __init__(
        self, max_cache_len: int, kv_lora_rank: int | None = None, latent_cache_format: str = "dtype", **kwargs
    ):
        super().__init__(kv_lora_rank, latent_cache_format)
        self.max_cache_len = max_cache_len
        self.cumulative_length = torch.tensor(0, dtype=torch.long)

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None) -> None:
        super().lazy_initialization(key_states, value_states)
        b = key_states.shape[0]
        template = self.codec.encode(key_states.new_zeros(b, 1, key_states.shape[-1]))
        self.parts = {
            k: torch.zeros((b, self.max_cache_len, *v.shape[2:]), dtype=v.dtype, device=self.device)
            for k, v in template.items()
        }
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not torch.compiler.is_compiling():
            for t in (*self.parts.values(), self.cumulative_length):
                torch._dynamo.mark_static_address(t)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor | None = None, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        s = key_states.shape[2]
        positions = torch.arange(s, device=self.device) + self.cumulative_length
        self.cumulative_length.add_(s)
        for k, v in self.codec.encode(key_states[:, 0]).items():
            self.parts[k].index_copy_(1, positions, v)
        return self._as_keys_values(self.codec.decode(self.parts, self.dtype))

    def get_seq_length(self):
        return self.cumulative_length if self.is_initialized else 0

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.max_cache_len, 0

    def get_max_length(self) -> int:
        return self.max_cache_len

    def reset(self) -> None:
        if self.is_initialized:
            for t in self.parts.values():
                t.zero_()
            self.cumulative_length.zero_()

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of tokens to remove, got {tokens_to_remove}.")
        self.cumulative_length.sub_(abs(tokens_to_remove))

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for t in self.parts.values():
            t.copy_(t.index_select(0, beam_idx.to(t.device)))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.parts.values())


def _cache_settings(config) -> dict:
    return {
        "kv_lora_rank": config.kv_lora_rank,
        "latent_cache_format": config.latent_cache_format,
    }


class LatentCache(Cache):
    """Growing latent cache, one :class:`LatentLayer` per decoder layer (created on first use)."""

    def __init__(
        self,
        config=None,
        *,
        kv_lora_rank: int | None = None,
        latent_cache_format: str = "dtype",
        rope_dim: int | None = None,
    ):
        settings = (
            _cache_settings(config)
            if config is not None
            else {"kv_lora_rank": kv_lora_rank, "latent_cache_format": latent_cache_format}
        )
        self.settings = settings
        self.rope_dim = config.qk_rope_head_dim if config is not None else rope_dim
        super().__init__(layer_class_to_replicate=lambda: LatentLayer(**settings))

    def bytes_per_token_per_layer(self, dtype: torch.dtype | None = None) -> int:
        """Storage cost of one token in one layer, e.g. 1152 for the BF16 latent of V3, 656 for "fp8"."""
        if dtype is None:
            layer = next((x for x in self.layers if x.is_initialized), None)
            dtype = layer.dtype if layer is not None else torch.bfloat16
        return latent_bytes_per_token(
            self.settings["kv_lora_rank"], self.rope_dim, self.settings["latent_cache_format"], dtype
        )

    def nbytes(self) -> int:
        """Bytes held right now, all layers."""
        return sum(layer.nbytes() for layer in self.layers)


class StaticLatentCache(LatentCache):
    """Pre-allocated latent cache (``cache_implementation="static"``) for ``torch.compile``d decoding."""

    def __init__(self, config, max_cache_len: int, num_layers: int | None = None):
        settings = _cache_settings(config)
        self.settings = settings
        self.rope_dim = config.qk_rope_head_dim
        self.max_cache_len = max_cache_len
        n = num_layers if num_layers is not None else config.num_hidden_layers
        Cache.__init__(self, layers=[StaticLatentLayer(max_cache_len, **settings) for _ in range(n)])


class PackedSequencesCache:
    """A cache over several sequences packed into one batch row, each with its own cached past: what continuous
    batching runs (``generation/continuous_batching.py`` implements it over transformers' paged cache).

    Only the cache knows where each sequence's tokens and cached latents lie, so the model builds no mask for it
    (``position_ids`` are required) and each attention layer hands over its roped queries and new latents:
    :meth:`attend` stores the latents and returns every query's attention output over its own sequence, computed by
    the layer's :meth:`~.attention.MLAttention.attend` (the same absorbed and expanded paths as a plain cache)."""

    def attend(self, module, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        """``q_nope [1, H, S, nope]``, ``q_pe [1, H, S, rope]``, ``latent [1, S, 576]`` -> ``[1, H, S, v]``."""
        raise NotImplementedError
