"""One forward's view of transformers' paged latent cache for the MLA layers (:class:`PagedLatentBatch`, the core's
:class:`~..core.cache.PackedSequencesCache`), shared by continuous batching (``continuous_batching.py``) and its MTP
drafts (``mtp_batching.py``).

transformers' engine packs the step's requests into one row (prefill chunks and decode tokens mixed), keeps each
layer's ``[c_kv ; k_pe]`` latents in its paged cache (``MLACacheAllocator``: one 576-value row per token and layer,
one page per layer in every block) and describes the batch with ``cu_seq_lens_q``, per-layer-type ``cu_seq_lens_k``,
``read_index`` and ``write_index``. Native DeepSeek-V3 re-expands every cached latent to per-head keys and values at
each step and attends through one ``[Q, K_total]`` mask over all requests. Here the row is split back into its
requests and each layer's own :meth:`~..core.attention.MLAttention.attend` runs per request:

* requests with a few new tokens (decode, ``q_len <= DECODE_GROUP_MAX``) are grouped by query length and similar
  past (``DECODE_GROUP_FILL``) and read, whole pages at a time, into one ``[R, K_max, 576]`` batch per group; the
  groups share one absorbed ``W_UK`` / ``W_UV`` projection and attend over their latents group by group;
* longer chunks (prefills) run one by one, each over its own past (the expanded path where it is cheaper).

So every request sees exactly the tokens its own ``generate()`` would, and no work or memory scales with another
request's length. The private pieces used here (the paged cache's ``update`` with its batch kwargs, the allocator
layout) are listed in ``PRIVATE_API``; ``tests/unit/test_layout.py`` names the transformers version when they change.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch

from ..core.cache import PackedSequencesCache

__all__ = ["DECODE_GROUP_FILL", "DECODE_GROUP_MAX", "PRIVATE_API", "PagedLatentBatch"]

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
