"""Speculative decoding with the MTP layer: ``model.generate(..., use_mtp=True, num_speculative_tokens=k)``.

Each step drafts ``k`` tokens with the multi-token-prediction layer (the first from the main model's post-norm
hidden state, as engines do; the next ones by feeding the MTP layer its own output hidden state before
``shared_head.norm``, vLLM's convention), verifies the next token and all drafts in **one** forward of the
main model, and emits the accepted drafts plus one token of the main model's own (the correction or the
bonus). Greedy output is identical to ``use_mtp=False`` token for token; with sampling, drafts are sampled from
the MTP distribution and accepted with probability ``min(1, p/q)`` (resampling from ``norm(max(p - q, 0))`` on
rejection; Leviathan et al., 2023), so the output distribution is exactly the model's. ``p`` and ``q`` are the
final distributions after every logits processor (temperature, top-k/top-p, repetition penalty, ...), each
applied with the prefix the token would have in plain decoding.

Batches without rollback: every step appends ``k + 1`` slots to every row's latent cache; a row that rejects
drafts marks those slots invalid in its attention mask ("holes") and keeps its own positions, so rows accept
different numbers of tokens without re-feeding or cropping. The MTP layer keeps its own latent cache the same
way. Rows stop independently (EOS, stop strings, length). ``LatentCache``, ``StaticLatentCache`` and the FP8
latent formats work unchanged (the static cache is sized for the holes).

Statistics (acceptance per draft position, tokens per main-model forward) come back on the output of
``return_dict_in_generate=True`` as ``mtp_stats``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..core.attention import build_attention_mask
from ..core.cache import LatentCache, StaticLatentCache

__all__ = [
    "MTPGenerateOutput",
    "MTPStats",
    "accept_drafts",
    "mtp_decode",
    "mtp_generation_config",
    "speculative_tokens",
]

_FLAG = "_plugin_mtp_tokens"  # on the GenerationConfig generate() runs with: our loop, k drafts per step


def mtp_generation_config(model, generation_config, kwargs: dict):
    """``generate()``'s MTP switch: with ``use_mtp=True`` (keyword or generation config) validate the request
    and return a generation config that transformers runs as plain greedy/sampling (its own ``use_mtp`` path
    is single-row, one-draft and reloads weights from disk) with our decoding loop behind ``_sample``. Every
    conflict is an error naming what to change, never a silent fall back to plain decoding."""
    import copy

    use_mtp = kwargs.pop("use_mtp", None)
    k = kwargs.pop("num_speculative_tokens", None)
    base = generation_config if generation_config is not None else model.generation_config
    if use_mtp is None:
        use_mtp = bool(getattr(base, "use_mtp", False))
    if not use_mtp:
        return generation_config, kwargs
    k = speculative_tokens(model, base, k)
    for key in ("assistant_model", "prompt_lookup_num_tokens"):
        if kwargs.get(key) is not None:
            raise ValueError(f"use_mtp=True already speculates with the MTP layer; drop {key}.")
    cache = kwargs.get("cache", kwargs.get("past_key_values"))
    if cache is not None and not isinstance(cache, LatentCache):
        raise ValueError(
            f"use_mtp=True keeps rejected drafts as masked slots in the latent cache; a {type(cache).__name__} cannot "
            "do that. Pass a LatentCache / StaticLatentCache, or no cache (generate builds one)."
        )
    config = copy.deepcopy(base)
    model_kwargs = config.update(**kwargs)  # generation parameters onto the config, the rest are model inputs
    if int(config.num_beams or 1) > 1:
        raise ValueError(
            "use_mtp=True cannot be combined with beam search (num_beams > 1): MTP drafts one "
            "continuation; use greedy decoding or sampling."
        )
    if config.use_cache is False:
        raise ValueError(
            "use_mtp=True verifies drafts against the latent cache, but use_cache=False was asked (in the "
            "call or the model's generation_config.json); drop it or set use_cache=True."
        )
    if config.compile_config is not None:
        raise ValueError(
            "use_mtp=True runs its own decoding loop, which is not compiled, so compile_config would be ignored: "
            "drop compile_config (or use_mtp) for this call."
        )
    config.use_mtp = False
    setattr(config, _FLAG, k)
    return config, model_kwargs


def speculative_tokens(model, generation_config, k: int | None = None) -> int:
    """Drafts per step for ``use_mtp=True``: ``k``, else the config's ``num_speculative_tokens``, else 1; refused by
    name when the model has no MTP layer or ``k`` is not a positive integer."""
    if not model.model.mtp_layers:
        raise ValueError(
            "use_mtp=True needs the MTP layer, but this model was built without it (the checkpoint has no "
            f"model.layers.{model.config.num_hidden_layers}.* tensors, or load_mtp=False). Load a checkpoint with "
            "its MTP layer, or generate without use_mtp."
        )
    k = getattr(generation_config, "num_speculative_tokens", None) if k is None else k
    k = 1 if k is None else k
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"num_speculative_tokens must be an integer >= 1 (drafts per step), got {k!r}.")
    return k


def mtp_tokens(generation_config) -> int | None:
    return getattr(generation_config, _FLAG, None)


@dataclass
class MTPStats:
    """Counts of one ``generate(use_mtp=True)`` call (all rows together)."""

    num_speculative_tokens: int
    proposed: list[int] = field(default_factory=list)  # drafts verified, per draft position
    accepted: list[int] = field(default_factory=list)  # drafts accepted, per draft position
    forwards: int = 0  # main-model verify forwards, counted per active row (the prompt's forward not counted)
    emitted: int = 0  # tokens those forwards emitted (accepted drafts + one of the model's own)

    def __post_init__(self):
        self.proposed = self.proposed or [0] * self.num_speculative_tokens
        self.accepted = self.accepted or [0] * self.num_speculative_tokens

    @property
    def acceptance(self) -> list[float]:
        """Acceptance rate of draft position 1..k (a position is only verified when the earlier ones passed)."""
        return [a / p if p else 0.0 for a, p in zip(self.accepted, self.proposed)]

    @property
    def tokens_per_forward(self) -> float:
        """Tokens emitted per main-model forward per row: 1 without MTP, up to k + 1 with it."""
        return self.emitted / self.forwards if self.forwards else 0.0

    def summary(self) -> str:
        rates = ", ".join(f"{r:.0%}" for r in self.acceptance)
        return f"MTP k={self.num_speculative_tokens}: acceptance {rates}, {self.tokens_per_forward:.2f} tokens/forward"


@dataclass
class MTPGenerateOutput(GenerateDecoderOnlyOutput):
    """``GenerateDecoderOnlyOutput`` plus ``mtp_stats`` (:class:`MTPStats`)."""

    mtp_stats: MTPStats | None = None


def mtp_cache_length(prompt_len: int, max_new_tokens: int, k: int) -> int:
    """Slots a static latent cache needs: every step appends k + 1 slots and emits at least one token."""
    return prompt_len + (k + 1) * (max_new_tokens + 1)


def _new_cache_like(cache, config, layers: int, length: int):
    if isinstance(cache, StaticLatentCache):
        return StaticLatentCache(config, max_cache_len=length, num_layers=layers)
    return LatentCache(config=config)


class _Rows:
    """Per-row decoding state: the tokens so far (prompt as given, left padding included, like plain
    ``generate``'s ``input_ids``), whether the row stopped, and its next position."""

    def __init__(self, input_ids: torch.Tensor, positions: torch.Tensor):
        self.tokens = [row.clone() for row in input_ids]
        self.done = [False] * input_ids.shape[0]
        self.next_pos = positions[:, -1] + 1  # (B,)

    def prefix(self, r: int, drafts: torch.Tensor | None = None, j: int = 0) -> torch.Tensor:
        seq = self.tokens[r] if drafts is None or j == 0 else torch.cat((self.tokens[r], drafts[:j]))
        return seq[None]  # (1, L)


def _choose(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    """One token (a 0-d tensor) from processed scores ``[1, V]``."""
    if do_sample:
        return torch.multinomial(scores.softmax(-1).float(), 1).reshape(())
    return scores.argmax(-1).reshape(())


def _mtp_forward(model, layer, tokens, hidden, positions, valid, cache):
    """Run the MTP layer on new slots. ``valid_all [B, T]`` (cache slots so far + these) masks the holes."""
    b, s = tokens.shape
    idx = layer.self_attn.layer_idx  # the MTP layer's slot in its own cache (num_hidden_layers)
    past = cache.get_seq_length(idx)
    kv_len = cache.get_mask_sizes(s, idx)[0]
    mask = build_attention_mask(valid.long(), b, s, past, kv_len, tokens.device)
    pe = model.model.rotary_emb(positions)
    return layer(tokens, hidden, pe, mask, cache)  # (hidden before shared_head.norm, logits)


def mtp_decode(
    model,
    input_ids: torch.Tensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    num_speculative_tokens: int,
    streamer=None,
    cache=None,
    attention_mask: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    **_unused,
):
    """The decoding loop (module docstring); called by ``generate`` with transformers' prepared inputs,
    processors, stopping criteria and cache."""
    k = num_speculative_tokens
    b, prompt_len = input_ids.shape
    device = input_ids.device
    do_sample = bool(generation_config.do_sample)
    pad = generation_config._pad_token_tensor
    pad = int(pad) if pad is not None else 0
    layer = model.model.mtp_layers[0]
    stats = MTPStats(k)
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    if position_ids is None:
        position_ids = torch.arange(prompt_len, device=device)[None].expand(b, prompt_len)
    position_ids = position_ids.expand(b, prompt_len)
    main_valid = attention_mask.bool()  # (B, slots) validity of the main cache's slots
    max_new = generation_config.max_length - prompt_len

    # prompt: one forward of the main model, then the first token of each row (plain decoding's first step)
    out = model.model(
        input_ids,
        attention_mask=None if bool(main_valid.all()) else attention_mask,
        position_ids=position_ids,
        cache=cache,
        use_cache=True,
    )
    hidden = out.last_hidden_state  # (B, L, D) post-norm
    scores = logits_processor(input_ids, model.lm_head(hidden[:, -1]).float())  # (B, V)
    rows = _Rows(input_ids, position_ids)
    first = scores.softmax(-1).multinomial(1)[:, 0] if do_sample else scores.argmax(-1)  # (B,)
    next_token = first.clone()
    _emit_all(rows, [[t] for t in first.tolist()], stopping_criteria, streamer, scores)

    # the MTP layer over the prompt: slot i pairs h_i with token i+1 (the last with the first new token)
    mtp_cache = _new_cache_like(
        cache, model.config, layer.self_attn.layer_idx + 1, mtp_cache_length(prompt_len, max_new, k)
    )
    mtp_tokens = torch.cat((input_ids[:, 1:], first[:, None]), 1)
    mtp_valid = main_valid.clone()
    mtp_hidden, mtp_logits = _mtp_forward(model, layer, mtp_tokens, hidden, position_ids, mtp_valid, mtp_cache)
    drafts, q_scores, mtp_valid = _draft(
        model,
        layer,
        rows,
        mtp_hidden[:, -1],
        mtp_logits[:, -1],
        next_token,
        mtp_valid,
        mtp_cache,
        logits_processor,
        k,
        do_sample,
    )

    while not all(rows.done):
        # verify [next token, drafts] in one forward of the main model
        verify = torch.cat((next_token[:, None], drafts), 1)  # (B, k+1)
        pos = rows.next_pos[:, None] + torch.arange(k + 1, device=device)  # (B, k+1)
        valid_all = torch.cat((main_valid, torch.ones(b, k + 1, dtype=torch.bool, device=device)), 1)
        out = model.model(verify, attention_mask=valid_all.long(), position_ids=pos, cache=cache, use_cache=True)
        hidden = out.last_hidden_state  # (B, k+1, D)
        logits = model.lm_head(hidden).float()  # (B, k+1, V)
        stats.forwards += sum(not d for d in rows.done)

        accepted_slots = torch.zeros(b, k + 1, dtype=torch.bool, device=device)
        emitted, n_acc = [], []
        for r in range(b):
            if rows.done[r]:
                emitted.append([])
                n_acc.append(0)
                continue
            tokens, n = _verify_row(rows, r, drafts[r], q_scores[r], logits[r], logits_processor, do_sample, stats)
            emitted.append(tokens)
            n_acc.append(n)
            accepted_slots[r, : n + 1] = True  # the fed next token and the accepted drafts
            stats.emitted += len(tokens)
        main_valid = torch.cat((main_valid, accepted_slots), 1)
        _emit_all(rows, emitted, stopping_criteria, streamer, None)
        n_acc_t = torch.tensor(n_acc, device=device)
        new_token = torch.tensor([e[-1] if e else pad for e in emitted], device=device)
        start = rows.next_pos.clone()
        rows.next_pos = rows.next_pos + n_acc_t + 1

        # MTP over the newly confirmed slots: slot j pairs h_{p+j} with the token at p+j+1 (valid for j <= n)
        slot_tok = torch.cat((drafts, torch.full((b, 1), pad, device=device)), 1)  # d1..dk, pad
        slot_tok = slot_tok.scatter(1, n_acc_t[:, None], new_token[:, None])  # token after p+n is the new one
        j = torch.arange(k + 1, device=device)[None]
        slot_valid = j <= n_acc_t[:, None]
        mtp_valid = torch.cat((mtp_valid, slot_valid), 1)
        mtp_hidden, mtp_logits = _mtp_forward(model, layer, slot_tok, hidden, start[:, None] + j, mtp_valid, mtp_cache)
        last = n_acc_t[:, None, None]
        h_last = mtp_hidden.gather(1, last.expand(b, 1, mtp_hidden.shape[-1]))[:, 0]  # (B, D)
        l_last = mtp_logits.gather(1, last.expand(b, 1, mtp_logits.shape[-1]))[:, 0]  # (B, V)
        next_token = new_token
        drafts, q_scores, mtp_valid = _draft(
            model, layer, rows, h_last, l_last, next_token, mtp_valid, mtp_cache, logits_processor, k, do_sample
        )

    if streamer is not None:
        streamer.end()
    longest = max(len(t) for t in rows.tokens)
    sequences = torch.full((b, longest), pad, dtype=input_ids.dtype, device=device)
    for r, t in enumerate(rows.tokens):
        sequences[r, : len(t)] = t
    if generation_config.return_dict_in_generate:
        return MTPGenerateOutput(sequences=sequences, cache=cache, mtp_stats=stats)
    return sequences


def _draft(model, layer, rows, h_last, logits_last, next_token, mtp_valid, mtp_cache, logits_processor, k, do_sample):
    """Draft k tokens per row. The first comes from the MTP pass just run (``logits_last``); each next one feeds
    the MTP layer its own output (hidden before ``shared_head.norm``) and the previous draft, in slots that are
    marked invalid right away (they are guesses, replaced once verified). Returns ``(drafts [B, k], processed
    draft scores [B, k, V], mtp_valid)``."""
    b = h_last.shape[0]
    device = h_last.device
    drafts, scores = [], []
    h, lg = h_last, logits_last
    for step in range(k):
        row_scores = []
        chosen = []
        for r in range(b):
            prev = torch.stack(drafts, 1)[r] if drafts else None
            s = logits_processor(rows.prefix(r, prev, step), lg[r : r + 1].float())  # (1, V)
            row_scores.append(s[0])
            chosen.append(
                _choose(s, do_sample) if not rows.done[r] else torch.zeros((), dtype=torch.long, device=device)
            )
        d = torch.stack(chosen).reshape(b)
        drafts.append(d)
        scores.append(torch.stack(row_scores))
        if step + 1 < k:
            # the slot pairing draft `step` with the MTP's own hidden: one position before that draft
            pos = (rows.next_pos + step)[:, None]
            mtp_valid = torch.cat((mtp_valid, torch.ones(b, 1, dtype=torch.bool, device=device)), 1)
            h_new, l_new = _mtp_forward(model, layer, d[:, None], h[:, None], pos, mtp_valid, mtp_cache)
            mtp_valid[:, -1] = False  # a guess: never attended to by later steps
            h, lg = h_new[:, 0], l_new[:, 0]
    return torch.stack(drafts, 1), torch.stack(scores, 1), mtp_valid


def _verify_row(rows, r, drafts, q_scores, logits, logits_processor, do_sample, stats):
    """Accept a prefix of the row's drafts; return ``(tokens to emit, accepted count)``. ``logits [k+1, V]``:
    position j predicts the token after draft j (position 0: after the fed next token), processed with the prefix
    it has in plain decoding."""
    k = drafts.shape[0]
    p_scores = torch.cat([logits_processor(rows.prefix(r, drafts, j), logits[j : j + 1]) for j in range(k + 1)])
    return accept_drafts(p_scores, drafts.tolist(), q_scores, do_sample, stats)


def accept_drafts(p_scores, drafts: list[int], q_scores, do_sample: bool, stats: MTPStats | None):
    """The lossless acceptance rule, shared with continuous batching: ``p_scores [m+1, V]`` the target's processed
    scores (row j: the token after draft j), ``drafts`` m tokens, ``q_scores [m, V]`` the scores they were sampled
    from (unused greedy). Greedy keeps drafts while they equal the target's argmax; sampling accepts draft j with
    probability ``min(1, p/q)`` and resamples from ``norm(max(p - q, 0))`` at the first rejection. Returns ``(tokens
    to emit, accepted count)``: the accepted drafts plus one token of the target's own (correction or bonus)."""
    tokens = []
    for j, d in enumerate(drafts):
        if stats is not None:
            stats.proposed[j] += 1
        if not do_sample:
            target = int(p_scores[j].argmax())
            if target != d:
                return tokens + [target], j
        else:
            p = p_scores[j].softmax(-1)
            q = q_scores[j].softmax(-1)
            if torch.rand((), device=p.device) * q[d] > p[d]:  # rejected: accept with probability min(1, p/q)
                residual = (p - q).clamp(min=0)
                total = residual.sum()
                return tokens + [int(torch.multinomial(residual / total if total > 0 else p, 1))], j
        if stats is not None:
            stats.accepted[j] += 1
        tokens.append(d)
    m = len(drafts)
    return tokens + [int(_choose(p_scores[m : m + 1], do_sample))], m  # every draft accepted: the bonus token


def _emit_all(rows, emitted, stopping_criteria, streamer, scores):
    """Append each row's tokens one at a time, stopping a row at the token where plain decoding would have
    stopped (EOS, stop strings, max length); stream (batch 1)."""
    for r, tokens in enumerate(emitted):
        for t in tokens:
            if rows.done[r]:
                break
            rows.tokens[r] = torch.cat((rows.tokens[r], rows.tokens[r].new_tensor([t])))
            if streamer is not None:
                streamer.put(rows.tokens[r].new_tensor([t]))
            seq = rows.tokens[r][None]
            fake_scores = scores[r : r + 1] if scores is not None else None
            if bool(stopping_criteria(seq, fake_scores)[0]):
                rows.done[r] = True
