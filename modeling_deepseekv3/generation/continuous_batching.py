"""transformers' continuous batching (``generate_batch``, ``init_continuous_batching``, ``transformers serve
--continuous-batching``, TRL's ``use_transformers_continuous_batching``) on the MLA latent cache.

transformers' engine schedules requests into one packed row per step (prefill chunks and decode tokens mixed), keeps
each layer's ``[c_kv ; k_pe]`` latents in its paged cache (``MLACacheAllocator``: one 576-value row per token and
layer, pages allocated and freed as requests come and go) and calls the model with ``cache=PagedAttentionCache`` plus
the batch layout (``cu_seq_lens_q``, per-layer-type ``cu_seq_lens_k``, ``read_index``, ``write_index``). Native
DeepSeek-V3 re-expands every cached latent to per-head keys and values at each step and attends through one
``[Q, K_total]`` mask over all requests. Here :class:`PagedLatentBatch` (the core's
:class:`~..core.cache.PackedSequencesCache`) splits the row back into its requests and runs each layer's own
:meth:`~..core.attention.MLAttention.attend` per request:

* requests with a few new tokens (decode, ``q_len <= DECODE_GROUP_MAX``) are grouped by query length and similar
  past (``DECODE_GROUP_FILL``) and read, whole pages at a time, into one ``[R, K_max, 576]`` batch per group; the
  groups share one absorbed ``W_UK`` / ``W_UV`` projection and attend over their latents group by group;
* longer chunks (prefills) run one by one, each over its own past (the expanded path where it is cheaper).

So every request sees exactly the tokens its own ``generate()`` would, and no work or memory scales with another
request's length.

:class:`ContinuousBatchingSupport` (mixed into the public classes in ``modeling.py``) wraps the paged cache on the
way into ``forward`` (a forward pre-hook, so ``forward`` keeps the signature Trainer reads) and sizes the cache on
CPU from the requests and what the user allows: transformers' default plans for 90% of the free RAM, zero-filled
before the first token, and a dense mask over all of it. The private pieces used here (the paged cache's
``update`` with its batch kwargs, the allocator layout) are listed in ``PRIVATE_API``; ``tests/unit/test_layout.py``
names the transformers version when they change.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from functools import partial

import torch

from ..core.cache import PackedSequencesCache

__all__ = [
    "CPU_BATCH_TOKENS",
    "CPU_CACHE_BYTES",
    "CPU_CACHE_REQUESTS",
    "DECODE_GROUP_FILL",
    "DECODE_GROUP_MAX",
    "PRIVATE_API",
    "ContinuousBatchingSupport",
    "PagedLatentBatch",
    "check_request",
    "cpu_cache_blocks",
]

logger = logging.getLogger(__name__)

#: transformers' private continuous-batching pieces this file relies on -> the parameters they had when written
PRIVATE_API = {
    "PagedAttentionCache.update": ("self", "key_states", "value_states", "layer_idx", "kwargs"),
    "MLACacheAllocator.update": ("self", "key_states", "value_states", "layer_idx", "read_index", "write_index"),
    "MLACacheAllocator.register_cache_tensor": ("self", "bytes_per_sector", "non_trash_bytes", "cache_tensor", "pool"),
}

#: requests with at most this many new tokens in a step are attended together, padded to the longest past
DECODE_GROUP_MAX = 16

#: a request joins a decode group while its past is at least this fraction of the group's longest
DECODE_GROUP_FILL = 0.75

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


@dataclass
class _Group:
    """Requests attended in one call: their query rows in the packed batch, where their latents are read from."""

    query_index: torch.Tensor  # (R * q,) rows of the packed queries, request-major
    key_index: torch.Tensor  # (R * K_max,) positions in the batch's read-back order (past, then new, per request)
    mask: torch.Tensor | None  # (R, 1, q, K_max) True = may attend; None: plain causal over one request
    requests: int
    q_len: int
    k_max: int  # latents each request is padded to
    k_start: torch.Tensor  # (R,) where each request's latents start in the read-back order
    k_lens: torch.Tensor  # (R,) each request's latents (its past and its new tokens)


class PagedLatentBatch(PackedSequencesCache):
    """One forward's view of transformers' :class:`PagedAttentionCache`: writes each layer's new latents into its
    pages, gathers each group of requests' latents straight from the pages, and attends per group (see the module
    docstring).

    Built from the engine's batch kwargs once per forward; the grouping and the page rows each group reads are
    computed once and shared by all layers."""

    def __init__(self, paged_cache, batch: dict):
        self.paged = paged_cache
        cu_k_by_type = batch["cu_seq_lens_k"]
        if len(cu_k_by_type) != 1:
            raise ValueError(f"MLA layers are all full attention; the engine sent layer types {list(cu_k_by_type)}.")
        (self.layer_type,) = cu_k_by_type
        self.cu_k = cu_k_by_type[self.layer_type]
        self.read_index, self.write_index = batch["read_index"], batch["write_index"]
        self.groups = _plan_groups(batch["cu_seq_lens_q"].tolist(), self.cu_k.tolist(), self.cu_k.device)
        self._plans: dict[int, list[_Read]] = {}  # allocator index -> how each group reads its latents

    def attend(self, module, q_nope: torch.Tensor, q_pe: torch.Tensor, latent: torch.Tensor) -> torch.Tensor:
        allocator = self.paged.layer_to_allocator[module.layer_idx]
        read_index = self.read_index[allocator.index]
        self._write(module.layer_idx, latent, module.kv_lora_rank)
        if read_index.numel():  # requests with a past: read every latent from the pages
            rows = _layer_rows(allocator, module.layer_idx)
            reads = self._reads(allocator, read_index)
        else:  # the engine skips reading when no request has a past: the new latents are all there is
            rows = latent[0]
            reads = [_Read(g.key_index, g.mask, None) for g in self.groups]
        h = q_nope.shape[1]
        out = q_nope.new_zeros(h, latent.shape[1], module.v_head_dim)  # (H, S, v)
        absorbed = []
        for g, read in zip(self.groups, reads):
            qp = q_pe[0][:, g.query_index].view(h, g.requests, g.q_len, -1).transpose(0, 1)  # (R, H, q, rope)
            gather = partial(read.latents, rows, g)
            if g.q_len <= DECODE_GROUP_MAX and module.choose_path(g.q_len, g.k_max) == "absorb":
                absorbed.append((g, qp, gather, read.mask))
                continue
            qn = q_nope[0][:, g.query_index].view(h, g.requests, g.q_len, -1).transpose(0, 1)  # (R, H, q, nope)
            o, _ = module.attend(qn, qp, gather(), read.mask)  # (R, H, q, v)
            out[:, g.query_index] = o.transpose(0, 1).reshape(h, g.requests * g.q_len, -1)
        if absorbed:  # one W_UK / W_UV projection for every decode group, the latent attention per group
            index = torch.cat([g.query_index for g, *_ in absorbed])
            o = module.kv_b_proj(q_nope[:, :, index], latent_attention=_per_group(module, absorbed))  # (1, H, Sa, v)
            out[:, index] = o[0]
        return out[None]  # (1, H, S, v)

    def _reads(self, allocator, read_index: torch.Tensor) -> list[_Read]:
        """How each group reads its latents from the pages, computed once per forward (all layers of an allocator
        share its pages' layout): whole pages where every request's tokens fill its pages in order (one large
        copy per page instead of one small one per token, ~4x faster on CPU), else token rows."""
        if allocator.index not in self._plans:
            self._plans[allocator.index] = [_plan_read(g, read_index, allocator) for g in self.groups]
        return self._plans[allocator.index]

    def _write(self, layer_idx: int, latent: torch.Tensor, rank: int) -> None:
        """Store the new latents ``[1, S, 576]`` in their pages (the paged cache's update with nothing to read back:
        the groups gather what they need themselves, once)."""
        s = latent.shape[1]
        c_kv, k_pe = latent[0].split([rank, latent.shape[-1] - rank], dim=-1)  # (S, r), (S, rope)
        empty = self.read_index[0][:0]
        kwargs = {
            "cu_seq_lens_k": {self.layer_type: self.cu_k},
            "max_length_k": {self.layer_type: 0},
            "read_index": [empty] * len(self.read_index),
            "write_index": self.write_index,
        }
        self.paged.update(c_kv.reshape(1, 1, s, rank), k_pe.reshape(1, 1, s, -1), layer_idx, kwargs)


@dataclass
class _Read:
    """Where one group's latents lie: token rows of the layer's pages, or (``pages`` set) whole pages."""

    index: torch.Tensor  # (R * K_max,) token rows, or (R * P_max,) page numbers
    mask: torch.Tensor | None  # (R, 1, q, width) over what is read, or None (one request: plain causal)
    pages: tuple[int, int] | None  # (tokens per page, rows from one page of a layer to the next)

    def latents(self, rows: torch.Tensor, g: _Group) -> torch.Tensor:
        """``[R, width, 576]`` latents of the group's requests (``rows``: the layer's ``[N, 576]`` token rows)."""
        if self.pages is None:
            return torch.index_select(rows, 0, self.index).view(g.requests, -1, rows.shape[-1])
        page, stride = self.pages
        n = (rows.shape[0] - page) // stride + 1
        pages = rows.as_strided((n, page, rows.shape[-1]), (stride * rows.stride(0), rows.stride(0), 1))
        lat = torch.index_select(pages, 0, self.index).view(g.requests, -1, rows.shape[-1])  # (R, P_max*page, 576)
        return lat[:, : g.k_max] if g.requests == 1 else lat  # one request: exactly its latents, no mask


def _plan_read(g: _Group, read_index: torch.Tensor, allocator) -> _Read:
    rows = read_index[g.key_index]  # (R * K_max,) the token rows, padded by repeating each request's last
    page = allocator.tokens_per_page
    stride = page * len(allocator.layer_indices)  # a block holds one page per layer
    p_max = -(-g.k_max // page)
    pages = torch.minimum(torch.arange(p_max, device=rows.device), (g.k_lens[:, None] - 1) // page)  # (R, P_max)
    first = read_index[g.k_start[:, None] + pages * page]  # (R, P_max) the first row of each page
    keys = torch.arange(g.k_max, device=rows.device)
    expected = first.gather(1, (keys // page).expand(g.requests, -1)) + keys % page  # (R, K_max)
    keys_pad = torch.minimum(keys, g.k_lens[:, None] - 1)  # the padded positions repeat the last, as rows do
    expected = expected.gather(1, keys_pad)
    if not (bool((first % stride == 0).all()) and torch.equal(expected.flatten(), rows)):
        return _Read(rows, g.mask, None)  # tokens not laid out page by page (a layout this code does not know)
    mask = None if g.requests == 1 else _visible(g.k_lens, g.q_len, p_max * page)
    return _Read((first // stride).flatten(), mask, (page, stride))


def _per_group(module, absorbed):
    """The ``latent_attention`` callable of the absorbed projection over several decode groups packed one after
    the other: ``q_latent [1, H, Sa, r] -> o_latent [1, H, Sa, r]``, each group attending over its own latents."""

    def attend(q_latent: torch.Tensor) -> torch.Tensor:
        h, r = q_latent.shape[1], q_latent.shape[-1]
        o_latent = torch.empty_like(q_latent)
        start = 0
        for g, qp, gather, mask in absorbed:
            n = g.requests * g.q_len
            ql = q_latent[0, :, start : start + n].view(h, g.requests, g.q_len, r).transpose(0, 1)  # (R, H, q, r)
            o = module._latent_attention(qp, gather(), mask)(ql)  # (R, H, q, r)
            o_latent[0, :, start : start + n] = o.transpose(0, 1).reshape(h, n, r)
            start += n
        return o_latent

    return attend


def _layer_rows(allocator, layer_idx: int) -> torch.Tensor:
    """``[N, 576]``: one layer's rows of the MLA allocator's pages, ``[c_kv ; k_pe]`` per token slot, indexed like
    ``read_index`` / ``write_index`` (the allocator's own ``update`` reads the two column slices of these rows)."""
    try:
        c_kv, _ = allocator._latent_token_views[layer_idx]  # (N, r) with row stride 576
        width = allocator.row_numel
    except AttributeError as e:
        import transformers

        raise RuntimeError(
            f"transformers {transformers.__version__} changed MLACacheAllocator's private page layout ({e}); "
            f"{__name__} was written for 5.25. Update _layer_rows there."
        ) from e
    return c_kv.as_strided((c_kv.shape[0], width), (c_kv.stride(0), 1))


def _plan_groups(cu_q: list[int], cu_k: list[int], device) -> list[_Group]:
    """Group the packed requests: decode-sized ones by query length and similar past (padded gathers), longer ones
    alone.

    Request ``i`` has queries ``cu_q[i]:cu_q[i+1]`` and latents ``cu_k[i]:cu_k[i+1]`` (its past, then its new
    tokens), so its query ``j`` may see latents up to ``k_len - q_len + j``. Requests of one query length are taken
    longest first; a group closes when the next one is shorter than ``DECODE_GROUP_FILL`` of the group's longest,
    so padding stays below a quarter of what is read."""
    by_len: dict[int, list[int]] = {}
    groups = []
    for i in range(len(cu_q) - 1):
        q_len, k_len = cu_q[i + 1] - cu_q[i], cu_k[i + 1] - cu_k[i]
        if q_len == 0:  # padding request
            continue
        if k_len < q_len:
            raise ValueError(f"Request {i} has {q_len} new tokens but only {k_len} cached ones; corrupt batch.")
        if q_len > DECODE_GROUP_MAX:
            rows = torch.arange(cu_q[i], cu_q[i + 1], device=device)
            keys = torch.arange(cu_k[i], cu_k[i + 1], device=device)
            start, length = torch.tensor([cu_k[i]], device=device), torch.tensor([k_len], device=device)
            groups.append(_Group(rows, keys, None, 1, q_len, k_len, start, length))
        else:
            by_len.setdefault(q_len, []).append(i)
    for q_len, members in by_len.items():
        members.sort(key=lambda i: cu_k[i] - cu_k[i + 1])  # longest past first
        while members:
            longest = cu_k[members[0] + 1] - cu_k[members[0]]
            n = 1
            while n < len(members) and cu_k[members[n] + 1] - cu_k[members[n]] >= DECODE_GROUP_FILL * longest:
                n += 1
            groups.append(_decode_group(members[:n], q_len, cu_q, cu_k, device))
            members = members[n:]
    return groups


def _visible(k_lens: torch.Tensor, q_len: int, width: int) -> torch.Tensor:
    """``[R, 1, q, width]``: query ``j`` of a request with ``k_len`` latents sees latents ``0 .. k_len - q + j``."""
    keys = torch.arange(width, device=k_lens.device)
    steps = torch.arange(q_len, device=k_lens.device)
    return (keys[None, None, :] <= (k_lens[:, None, None] - q_len + steps[None, :, None]))[:, None]


def _decode_group(members: list[int], q_len: int, cu_q: list[int], cu_k: list[int], device) -> _Group:
    q_start = torch.tensor([cu_q[i] for i in members], device=device)
    k_start = torch.tensor([cu_k[i] for i in members], device=device)
    k_len = torch.tensor([cu_k[i + 1] - cu_k[i] for i in members], device=device)
    k_max = int(k_len.max())
    steps = torch.arange(q_len, device=device)
    query_index = (q_start[:, None] + steps).flatten()  # (R*q,)
    keys = torch.arange(k_max, device=device)
    key_index = k_start[:, None] + torch.minimum(keys, k_len[:, None] - 1)  # (R, K_max); pads repeat the last
    mask = None if len(members) == 1 else _visible(k_len, q_len, k_max)  # one request: plain causal
    return _Group(query_index, key_index.flatten(), mask, len(members), q_len, k_max, k_start, k_len)


def cpu_cache_blocks(config, cb_config, dtype: torch.dtype, hints=None, budget: int = CPU_CACHE_BYTES) -> int:
    """Blocks of ``page_size`` tokens (all layers) for the latent cache on CPU: room for ``CPU_CACHE_REQUESTS``
    full-context requests, or for what the workload ``hints`` (``generate_batch`` gives them) need to run every
    request at once; never more than ``budget`` bytes."""
    per_token = (config.kv_lora_rank + config.qk_rope_head_dim) * dtype.itemsize * config.num_hidden_layers
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
        sized here (:func:`cpu_cache_blocks`, ``CPU_BATCH_TOKENS``) instead of from 90% of the free RAM. The manager's ``add_request`` refuses a request that could never finish (see
        :func:`check_request`)."""
        cb = self._latent_cache_config(generation_config, continuous_batching_config, workload_hints)
        if getattr(self, "_paged_latent_hook", None) is None:  # forward keeps its signature (Trainer reads it)
            self._paged_latent_hook = self.register_forward_pre_hook(_paged_latent_batch, with_kwargs=True)
        manager = super().init_continuous_batching(
            generation_config=generation_config, continuous_batching_config=cb, workload_hints=workload_hints, **kwargs
        )
        if not getattr(manager, "_checks_requests", False):  # a persistent manager comes back already wrapped
            manager.add_request = _checked(manager.add_request, manager, self.config)
            manager._checks_requests = True
        return manager

    def generate_batch(self, inputs, generation_config=None, continuous_batching_config=None, **kwargs):
        """transformers' ``generate_batch``, raising up front for a request that could never finish (transformers'
        would log the engine's failure and return without it)."""
        from transformers.generation.continuous_batching.utils import WorkloadHints

        gen = self.generation_config if generation_config is None else generation_config
        new = kwargs.get("max_new_tokens", gen.max_new_tokens)
        copies = gen.num_return_sequences or 1
        hints = WorkloadHints(
            max_prompt_length=max((len(x) for x in inputs), default=0),
            max_generated_length=new or 0,
            num_requests=len(inputs) * copies,
        )
        cb = self._latent_cache_config(generation_config, continuous_batching_config, hints)
        for x in inputs:
            check_request(self.config, cb, len(x), new)
        return super().generate_batch(inputs, generation_config, continuous_batching_config=cb, **kwargs)

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
                cb.num_blocks = cpu_cache_blocks(self.config, cb, self.dtype, workload_hints, budget)
                logger.info("latent cache on CPU: %d blocks of %d tokens", cb.num_blocks, cb.page_size)
            if cb.max_batch_tokens is None:
                cb.max_batch_tokens = CPU_BATCH_TOKENS
        return cb


def check_request(config, cb_config, prompt_tokens: int, max_new_tokens: int | None, **sampling) -> None:
    """Refuse, by name, a request that could never finish or would not mean what it says: past the model's context
    (as ``generate()`` refuses it), larger than the whole latent cache (transformers' engine would accept it and fail
    it later with "No requests can be scheduled"), no tokens to generate, or sampling settings out of range (the
    engine would run them as given)."""
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
    if cb_config.num_blocks is not None and needed > cb_config.num_blocks * cb_config.page_size:
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


def _checked(add_request, manager, config):
    """``manager.add_request`` running :func:`check_request` first."""

    def add_checked(input_ids, request_id=None, max_new_tokens=None, *args, **kwargs):
        new = manager.generation_config.max_new_tokens if max_new_tokens is None else max_new_tokens
        sampling = {k: kwargs[k] for k, _, _ in _SAMPLING_RULES if k in kwargs}
        check_request(config, manager.continuous_batching_config, len(input_ids), new, **sampling)
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
