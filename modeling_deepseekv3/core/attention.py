"""Multi-head latent attention (MLA), docs/deepseek_v3.md §5, with two paths over one set of weights.

Per token (V3 sizes in brackets):

* query: ``q = q_b_proj(q_a_layernorm(q_a_proj(h)))`` [128 heads x 192], or ``q_proj(h)`` when
  ``q_lora_rank`` is null (Moonlight); each head is ``[q_nope (128) ; q_rope (64)]``.
* latent: ``kv_a_proj_with_mqa(h) = [c_kv_raw (512) ; k_rope_raw (64)]``; ``c_kv = kv_a_layernorm(c_kv_raw)``;
  ``k_pe = RoPE(k_rope_raw)`` is one rope key shared by all heads.
* the cache stores ``[c_kv ; k_pe]`` (576 values per token per layer) -- normalized latent, roped key.

"expand" (the reference; fast for long prefills): ``kv_b_proj(c_kv)`` gives per head ``[k_nope ; v]``
for every cached token, ``K = [k_nope ; k_pe]``, ``V = v``, then softmax attention.

"absorb" (decode at latent speed): with ``W_kvb`` viewed as ``[H, 128 + 128, 512]`` = ``[W_UK ; W_UV]``,
``q_nope . k_nope = (q_nope W_UK) . c_kv``, so each head's query is folded into the latent space
(``q~ = q_nope W_UK``, 512-d) and scores are ``scale * (q~ . c_kv + q_pe . k_pe)`` over the *cached
latent itself*; the attended latent ``o~ = P c_kv`` is lifted back per head with ``W_UV``. Per decoded
token the cost no longer contains ``T x 512 x H x 256`` (re-expanding the whole cache, which native
transformers does at every step), only ``H x T x (576 + 512)``.

"auto" picks per call from the multiply-add counts of the two paths (see :func:`absorb_is_cheaper`).

Weight reads happen only inside module forwards: the absorbed path runs *inside* ``kv_b_proj``'s own
forward (:class:`LatentAbsorbingProjection`), so Accelerate's offload hooks (which materialize a module's
weights only for its forward) keep working, and a kv_b_proj replaced by something else (a PEFT LoRA
wrapper, a bitsandbytes layer) makes the layer fall back to the expand path instead of ignoring it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..fp8 import FP8Linear
from ..fp8 import dispatch as fp8_dispatch
from ..fp8.linear import fp8_head_matmul
from .cache import PackedSequencesCache
from .layers import RMSNorm, make_linear
from .rope import apply_rope, softmax_scale

__all__ = [
    "LatentAbsorbingProjection",
    "MLAttention",
    "absorb_is_cheaper",
    "build_attention_mask",
    "latent_cache_update",
    "packed_segment_ids",
]


def latent_cache_update(cache, latent: torch.Tensor, layer_idx: int) -> torch.Tensor:
    """Append ``latent [B, S, D]`` to layer ``layer_idx`` of ``cache``; return all cached ``[B, T, D]``.

    The latent travels as the *keys* of a one-head cache layer (``[B, 1, S, D]``, zero-width values):
    that is what :class:`~modeling_deepseekv3.core.cache.LatentLayer` expects, and it also makes a plain
    transformers ``DynamicCache`` hold exactly the latent."""
    b, s, d = latent.shape
    keys, _ = cache.update(latent.view(b, 1, s, d), latent.new_empty(b, 1, s, 0), layer_idx)
    return keys[:, 0]


def absorb_is_cheaper(q_len: int, kv_len: int, heads: int, nope: int, rope: int, v_dim: int, rank: int) -> bool:
    """Multiply-add model of both paths for ``q_len`` queries over ``kv_len`` cached tokens.

    expand: ``kv_len*rank*H*(nope+v)`` (re-expanding every cached token) + ``q_len*kv_len*H*(nope+rope+v)``.
    absorb: ``q_len*H*rank*(nope+v)`` (folding W_UK / W_UV) + ``q_len*kv_len*H*(2*rank+rope)``.
    For V3 dims absorb wins while ``q_len`` is below ~150 x ``kv_len / (kv_len + 2)``: always for decode,
    never for a long prompt without cache (benchmarks/decode.py measures the crossover)."""
    expand = kv_len * rank * heads * (nope + v_dim) + q_len * kv_len * heads * (nope + rope + v_dim)
    absorb = q_len * heads * rank * (nope + v_dim) + q_len * kv_len * heads * (2 * rank + rope)
    return absorb < expand


class LatentAbsorbingProjection:
    """Mixin for ``kv_b_proj``: a normal linear, plus absorbed attention run inside its own forward.

    ``forward(q_nope [B, H, S, nope], latent_attention=fn)`` folds ``W_UK`` into the query, calls
    ``fn(q_latent [B, H, S, rank]) -> o_latent [B, H, S, rank]`` and returns ``o_latent W_UV^T``
    ``[B, H, S, v]``. The dense weight is materialized (dequantized, for FP8) once per call."""

    num_heads: int
    qk_nope_head_dim: int
    v_head_dim: int

    def configure_heads(self, num_heads: int, qk_nope_head_dim: int, v_head_dim: int) -> None:
        self.num_heads, self.qk_nope_head_dim, self.v_head_dim = num_heads, qk_nope_head_dim, v_head_dim

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor, latent_attention: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if latent_attention is None:
            return super().forward(x)
        w = self.dense_weight(x.dtype).view(self.num_heads, self.qk_nope_head_dim + self.v_head_dim, -1)
        w_uk, w_uv = w.split([self.qk_nope_head_dim, self.v_head_dim], dim=1)  # (H, nope, r), (H, v, r)
        q_latent = torch.matmul(x, w_uk)  # (B, H, S, nope) @ (H, nope, r) -> (B, H, S, r)
        o_latent = latent_attention(q_latent)  # (B, H, S, r)
        return torch.matmul(o_latent, w_uv.transpose(1, 2))  # (B, H, S, r) @ (H, r, v) -> (B, H, S, v)


class KVBLinear(LatentAbsorbingProjection, nn.Linear):
    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        return self.weight.to(dtype)


class KVBFP8Linear(LatentAbsorbingProjection, FP8Linear):
    """FP8 ``kv_b_proj``. Where :func:`~.fp8.dispatch.choose_backend` answers ``"native"`` for the ``"heads"``
    kind (inference on CPU, weights resident, the C++ kernels available), the absorbed path runs both per-head
    products -- ``q_nope W_UK`` (a contraction over the weight's rows) and ``o_latent W_UV^T`` -- straight from
    the FP8 weight (:func:`~.fp8.linear.fp8_head_matmul`). No dense copy is kept for that: the head kernels
    read 1 byte per weight where a dense FP32 copy reads 4, and measured (benchmarks/fp8_cpu.py part 2, V3
    dims) they are 1.3-1.8x faster than the copy at decode (1-16 rows per head) and within 5% of it at 32;
    the copy would cost 64 MiB per layer in FP32 (3.8 GiB over V3's 61 layers).

    Otherwise the absorbed path multiplies by the dense weight, and the same function says whether to keep
    that dequantized copy and reuse it while the FP8 tensors are unchanged (inference: on CPU a per-call
    dequantization costs ~30 ms per layer per token) or to dequantize per call (training, offloaded weights,
    ``fp8_compute="dequant"``)."""

    def _backend(self, kind: str, x: torch.Tensor | None = None) -> str:
        return fp8_dispatch.choose_backend(
            self.compute, self.weight, self.weight_scale_inv, self.block_size, x, kind=kind, module=self
        )

    def forward(self, x: torch.Tensor, latent_attention: Callable[[torch.Tensor], torch.Tensor] | None = None):
        if latent_attention is None or self._backend("heads", x) != "native":
            return super().forward(x, latent_attention)
        b, h, s, nope = x.shape
        stride, w, sc, block = nope + self.v_head_dim, self.weight, self.weight_scale_inv, self.block_size
        x_g = x.transpose(0, 1).reshape(h, b * s, nope)  # (H, B*S, nope)
        q_latent = fp8_head_matmul(x_g, w, sc, block, stride, 0, nope, transpose=True)  # (H, B*S, r)
        q_latent = q_latent.view(h, b, s, -1).transpose(0, 1)  # (B, H, S, r)
        o_latent = latent_attention(q_latent)  # (B, H, S, r)
        if self._backend("heads", o_latent) != "native":  # o_latent came back in a dtype the kernel does not take
            w_uv = self.dense_weight(o_latent.dtype).view(h, stride, -1)[:, nope:]  # (H, v, r)
            return torch.matmul(o_latent, w_uv.transpose(1, 2))  # (B, H, S, r) @ (H, r, v) -> (B, H, S, v)
        o_g = o_latent.transpose(0, 1).reshape(h, b * s, -1)  # (H, B*S, r)
        out = fp8_head_matmul(o_g, w, sc, block, stride, nope, self.v_head_dim, transpose=False)  # (H, B*S, v)
        return out.view(h, b, s, self.v_head_dim).transpose(0, 1)  # (B, H, S, v)

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        if self._backend("dense") != "dense":
            return self.dequantized_weight(dtype)
        key = (self.weight.data_ptr(), self.weight._version, self.weight_scale_inv._version, dtype, self.weight.device)
        cached = self.__dict__.get("_dense_cache")
        if cached is None or cached[0] != key:
            cached = (key, self.dequantized_weight(dtype))
            self.__dict__["_dense_cache"] = cached
        return cached[1]

    def to_dense(self, dtype: torch.dtype) -> KVBLinear:
        dense = KVBLinear(self.in_features, self.out_features, bias=False, device="meta")
        dense.weight = nn.Parameter(self.dequantized_weight(dtype), requires_grad=False)
        dense.configure_heads(self.num_heads, self.qk_nope_head_dim, self.v_head_dim)
        return dense


def _make_kv_b_proj(config, in_features: int, out_features: int) -> nn.Module:
    if config.is_fp8:
        layer = KVBFP8Linear(
            in_features,
            out_features,
            block_size=config.fp8_block_size,
            compute=config.fp8_compute,
            scale_fmt=config.fp8_scale_fmt,
        )
    else:
        layer = KVBLinear(in_features, out_features, bias=False)
    layer.configure_heads(config.num_attention_heads, config.qk_nope_head_dim, config.v_head_dim)
    return layer


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
            # Sub-norms use eps 1e-6 regardless of config.rms_norm_eps, as in the released code (docs/deepseek_v3.md §7).
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=1e-6)
            self.q_b_proj = make_linear(config, self.q_lora_rank, self.num_heads * self.qk_head_dim)
        self.kv_a_proj_with_mqa = make_linear(config, hidden, self.kv_lora_rank + self.qk_rope_head_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = _make_kv_b_proj(
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

    def choose_path(self, q_len: int, kv_len: int) -> str:
        impl = self.config.mla_impl
        if not isinstance(self.kv_b_proj, LatentAbsorbingProjection):
            return "expand"  # kv_b_proj was wrapped/replaced (LoRA, bitsandbytes): only expand honours it
        if impl != "auto":
            return impl
        cheaper = absorb_is_cheaper(
            q_len,
            kv_len,
            self.num_heads,
            self.qk_nope_head_dim,
            self.qk_rope_head_dim,
            self.v_head_dim,
            self.kv_lora_rank,
        )
        return "absorb" if cheaper else "expand"

    def forward(
        self,
        hidden_states: torch.Tensor,
        position_embeddings: tuple[torch.Tensor, torch.Tensor],
        attention_mask: torch.Tensor | None,
        cache=None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``attention_mask``: boolean ``[B, 1, S, T]`` (True = may attend), or None for plain causal
        attention where query ``i`` sits at cache position ``T - S + i``. Returns ``(out [B, S, hidden],
        probs [B, H, S, T] or None)``: the attention probabilities only with ``output_attentions`` (which
        runs the expand path with an explicit softmax; ``attn_implementation="eager"`` does too)."""
        b, s, _ = hidden_states.shape
        cos, sin = position_embeddings  # (B, S, rope/2) each
        q = self.project_query(hidden_states)  # (B, H, S, 192)
        q_nope, q_pe = q.split([self.qk_nope_head_dim, self.qk_rope_head_dim], dim=-1)
        q_pe = apply_rope(q_pe, cos[:, None], sin[:, None], self.rope_interleave)
        latent = self.project_latent(hidden_states, cos, sin)  # (B, S, 576)
        if isinstance(cache, PackedSequencesCache):  # several sequences in one row, each with its own past
            out, probs = cache.attend(self, q_nope, q_pe, latent), None
        else:
            if cache is not None:
                latent = latent_cache_update(cache, latent, self.layer_idx)  # (B, T, 576)
            out, probs = self.attend(q_nope, q_pe, latent, attention_mask, output_attentions)
        out = out.transpose(1, 2).reshape(b, s, self.num_heads * self.v_head_dim)  # (B, S, H*v)
        return self.o_proj(out), probs

    def attend(
        self,
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        latent: torch.Tensor,
        mask: torch.Tensor | None,
        output_attentions: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Attention of roped queries ``q_nope [B, H, S, nope]``, ``q_pe [B, H, S, rope]`` over the latents
        ``[B, T, 576]`` of every visible token, by the path :meth:`choose_path` picks: ``(out [B, H, S, v],
        probs [B, H, S, T] or None)``. ``mask`` as in :meth:`forward` (None: query ``i`` sits at ``T - S + i``)."""
        if not output_attentions and self.choose_path(q_nope.shape[2], latent.shape[1]) == "absorb":
            attend = self._latent_attention(q_pe, latent, mask)
            return self.kv_b_proj(q_nope, latent_attention=attend), None  # (B, H, S, v)
        eager = output_attentions or self.config._attn_implementation == "eager"
        return self._attend_expanded(torch.cat((q_nope, q_pe), dim=-1), latent, mask, eager)

    def _attend_expanded(
        self, q: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None, eager: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reference attention: expand the latent to per-head K/V, then SDPA (or, ``eager``, the explicit
        ``softmax(q k^T * scale) v`` in float32 whose probabilities are returned). ``[B, H, S, v]``."""
        b, t, _ = latent.shape
        s = q.shape[2]
        c_kv, k_pe = latent.split([self.kv_lora_rank, self.qk_rope_head_dim], dim=-1)
        kv = self.kv_b_proj(c_kv).view(b, t, self.num_heads, self.qk_nope_head_dim + self.v_head_dim)
        kv = kv.transpose(1, 2)  # (B, H, T, 256)
        k_nope, v = kv.split([self.qk_nope_head_dim, self.v_head_dim], dim=-1)
        k_pe = k_pe[:, None].expand(b, self.num_heads, t, self.qk_rope_head_dim)  # (B, H, T, 64)
        k = torch.cat((k_nope, k_pe), dim=-1)  # (B, H, T, 192)
        dropout = self.attention_dropout if self.training else 0.0
        if mask is None and (1 < s < t or (eager and s > 1)):
            mask = _causal_mask(s, t, q.device)
        if eager:
            scores = torch.matmul(q, k.transpose(-1, -2)).float() * self.scaling  # (B, H, S, T)
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            probs = scores.softmax(dim=-1).to(q.dtype)
            weights = F.dropout(probs, p=dropout, training=True) if dropout else probs
            return torch.matmul(weights, v), probs
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=dropout, is_causal=mask is None and s == t and s > 1, scale=self.scaling
        )  # (B, H, S, v)
        return out, None

    def _latent_attention(self, q_pe: torch.Tensor, latent: torch.Tensor, mask: torch.Tensor | None):
        """Build the attention over the latent for :class:`LatentAbsorbingProjection` to call.

        All heads share the single latent "key" ``[c_kv ; k_pe]``, so heads fold into the query
        dimension: one ``[H*S, 576] x [576, T]`` product per sequence instead of H attention heads over
        copies of the cache. Softmax in float32."""
        r = self.kv_lora_rank
        scaling = self.scaling
        dropout = self.attention_dropout if self.training else 0.0

        def attend(q_latent: torch.Tensor) -> torch.Tensor:
            b, h, s, _ = q_latent.shape
            t = latent.shape[1]
            query = torch.cat((q_latent, q_pe), dim=-1).reshape(b, h * s, -1)  # (B, H*S, 576)
            scores = torch.matmul(query, latent.transpose(1, 2)).view(b, h, s, t)  # (B, H, S, T)
            scores = scores.float() * scaling
            m = mask if mask is not None or s == 1 else _causal_mask(s, t, scores.device)
            if m is not None:
                scores = scores.masked_fill(~m, float("-inf"))  # m: (B or 1, 1, S, T) broadcasts over heads
            probs = scores.softmax(dim=-1).to(latent.dtype)
            if dropout:
                probs = F.dropout(probs, p=dropout, training=True)
            if latent.dtype in (torch.bfloat16, torch.float16):
                # CPU BLAS multiplies a half-precision operand with strided rows up to 2.5x slower than a whole one
                # (at a few heads); the 64 rope columns computed and dropped cost less.
                o_latent = torch.matmul(probs.view(b, h * s, t), latent)[..., :r]  # (B, H*S, 512)
            else:
                o_latent = torch.matmul(probs.view(b, h * s, t), latent[..., :r])  # (B, H*S, 512)
            return o_latent.view(b, h, s, r)

        return attend


def packed_segment_ids(
    position_ids: torch.Tensor | None,
    attention_mask: torch.Tensor | None,
    past,
    cu_seq_lens: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """``[B, S]`` ids of the packed sequences each token belongs to, or None when nothing is packed.

    Padding-free batches (TRL's ``padding_free=True``, ``DataCollatorWithFlattening``) put several sequences
    in one row with no attention mask; they are told apart by ``cu_seq_lens_q`` (sequence start offsets, batch
    1) or, as transformers does, by ``position_ids`` that do not step by 1. Only a prompt without an
    attention mask and without cached tokens is examined."""
    if attention_mask is not None or not (isinstance(past, int) and past == 0):
        return None
    if cu_seq_lens is not None:
        cu = cu_seq_lens.to(torch.long).flatten()
        length = int(cu[-1])
        starts = torch.zeros(length, dtype=torch.long, device=cu.device)
        starts[cu[1:-1]] = 1
        return starts.cumsum(0)[None]
    if position_ids is None or position_ids.shape[-1] < 2:
        return None
    first = position_ids[:, :1] - 1
    segments = (torch.diff(position_ids, prepend=first, dim=-1) != 1).cumsum(-1)  # (B, S)
    if not torch.compiler.is_compiling() and not bool(segments[:, -1].any()):
        return None  # the one host sync, only when position_ids are passed without a mask
    return segments


def build_attention_mask(
    attention_mask: torch.Tensor | None,
    batch: int,
    q_len: int,
    past,
    kv_len: int,
    device,
    segment_ids: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """Boolean ``[B, 1, S, kv_len]`` mask (True = may attend), or None when plain causal attention suffices.

    ``attention_mask`` is the usual ``[B, past + S]`` 0/1 padding mask, or an already-built 4-D mask
    (boolean, or additive float with 0 = attend, as ``generate()`` builds for static caches). Query ``i``
    sits at cache index ``past + i`` and sees keys ``j <= past + i`` that are not padding; ``kv_len``
    exceeds ``past + S`` for a pre-allocated cache, whose unwritten slots are masked by position. A query
    on a padding token still sees itself, so its row never becomes all ``-inf`` (its output is ignored
    but stays finite). ``segment_ids`` (:func:`packed_segment_ids`) make the mask block-diagonal: a token
    sees only earlier tokens of its own packed sequence."""
    q_pos = torch.arange(q_len, device=device)[:, None] + past  # (S, 1)
    k_pos = torch.arange(kv_len, device=device)[None, :]  # (1, T)
    if (
        attention_mask is not None
        and attention_mask.dim() == 2
        and isinstance(past, int)
        and attention_mask.shape[-1] < past + q_len
    ):
        raise ValueError(
            f"attention_mask covers {attention_mask.shape[-1]} positions but the cache plus the new tokens are "
            f"{past + q_len}; pass the mask for the whole sequence so far (a shorter one is not padded)."
        )
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask if attention_mask.dtype == torch.bool else attention_mask == 0
        return mask.to(device) | (k_pos == q_pos)[None, None]
    padded = attention_mask is not None and not bool(attention_mask.all())
    dense = isinstance(past, int) and kv_len == past + q_len
    if dense and not padded and segment_ids is None and (q_len == 1 or past == 0):
        return None
    mask = (k_pos <= q_pos)[None, None].expand(batch, 1, q_len, kv_len)  # (B, 1, S, T)
    if segment_ids is not None:
        seg = segment_ids.to(device)
        mask = mask & (seg[:, None, :, None] == seg[:, None, None, :])  # (B, 1, S, S): same sequence only
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


def _causal_mask(q_len: int, kv_len: int, device) -> torch.Tensor:
    """``[1, 1, S, T]``: the S queries are the last S of T positions."""
    q_pos = torch.arange(kv_len - q_len, kv_len, device=device)[:, None]
    return (torch.arange(kv_len, device=device)[None, :] <= q_pos)[None, None]
