"""MTP drafts inside continuous batching: ``generate_batch`` / ``init_continuous_batching`` with
``GenerationConfig(use_mtp=True, num_speculative_tokens=k)``.

Each decoding request carries its next token and up to ``k`` drafts of the MTP layer into the engine's next batch
(its ``tokens_to_process``: the scheduler packs them like a short prefill chunk). One forward of the main model
verifies every request's drafts beside the other requests' decode tokens and prefill chunks; each request accepts
its own prefix of drafts (:func:`~.mtp.accept_drafts`, the rule of ``generate(use_mtp=True)``: greedy exact,
sampling exact in distribution), emits the accepted drafts plus one token of the model's own, and steps its cache
position back over the rejected ones (their pages stay allocated and are overwritten). In the same step the MTP
layer runs over every position the main model confirmed (prefill chunks too, so its latents follow the main ones)
and drafts the next ``k`` tokens of each decoding request, all requests in one packed pass per draft position.

The MTP layer's latents live in the engine's paged cache as one more MLA layer (the cache is built for
``num_hidden_layers + 1`` layers, a page for the MTP layer in every block), so allocation, freeing and offloading
cover it and :class:`~.paged_latents.PagedLatentBatch` reads it like any layer. Prefix sharing is switched
off (a page that held rejected drafts must never be shared as a finished prefix).

Unlike ``generate(use_mtp=True)``, drafts 2..k attend to the earlier guesses' slots (they sit in the pages until
the confirmed slots overwrite them; there they are masked holes): drafts only decide speed, never the output.
Logits processors run with continuous batching's per-request arguments (temperature, top-k, top-p) on every
verified and drafted row, each row given the token it follows, as the engine does for its one row per request.

Private transformers pieces (``PRIVATE_API``, checked by ``tests/unit/test_layout.py``): the batch processor's
``_generation_step`` and ``update_batch`` are replaced (the engine's processor is switched to
:class:`MTPBatchProcessor` once built), the manager's ``_create_batch_processor`` is wrapped to size the cache for
the MTP layer, and the scheduler's ``schedule_batch`` is wrapped so that a token budget that cuts a request's drafts
verifies fewer drafts instead of turning the rest into a prefill.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from transformers.generation.continuous_batching.continuous_api import ContinuousBatchProcessor
from transformers.generation.continuous_batching.requests import RequestStatus

from .mtp import MTPStats, accept_drafts
from .paged_latents import PagedLatentBatch

__all__ = ["PRIVATE_API", "MTPBatchProcessor", "attach_mtp"]

#: transformers' private continuous-batching pieces this file overrides, wraps or calls -> their parameters
PRIVATE_API = {
    "ContinuousBatchingManager._create_batch_processor": ("self",),
    "ContinuousBatchProcessor._generation_step": ("self", "model"),
    "ContinuousBatchProcessor.update_batch": ("self",),
    "FIFOScheduler.schedule_batch": ("self", "token_budget", "cache_budget"),
    "RequestState.update_and_check_completion": ("self", "token_id", "logprob"),
    "PagedAttentionCache.extend_read_and_write_indices": (
        "self",
        "request_id",
        "past_length",
        "query_length",
        "read_index",
        "write_index",
    ),
    "PagedAttentionCache.can_store_request_tokens": ("self", "state", "request_len", "dry_run"),
    "ContinuousBatchingIOs.get_model_kwargs": ("self", "use_padding"),
}


def attach_mtp(manager, model, k: int) -> None:
    """Make a new ``ContinuousBatchingManager`` of ``model`` draft ``k`` tokens per request and step with the MTP
    layer (module docstring). Refuses asynchronous batching (each step's drafts come from the step before) and
    forked requests (``num_return_sequences > 1``: the copies would share their parent's drafts)."""
    if (manager.generation_config.num_return_sequences or 1) > 1:
        raise ValueError(
            "use_mtp=True in continuous batching cannot fork a request into num_return_sequences > 1 copies; "
            "repeat the prompt instead."
        )
    cb = manager.continuous_batching_config
    if cb.use_async_batching is None:
        cb.use_async_batching = False
    if cb.use_async_batching:
        raise ValueError(
            "use_mtp=True in continuous batching drafts each step from the step before and needs synchronous "
            "batching; pass ContinuousBatchingConfig(use_async_batching=False)."
        )
    cb.allow_block_sharing = False  # a page that held rejected drafts must never be shared as a finished prefix
    # the step runs its own forwards (verify, MTP layer) eagerly over read/write indices: no padded static shapes for
    # CUDA graphs or compile, no block-table decode path
    cb.use_cuda_graph, cb.varlen_compile_config, cb.decode_compile_config = False, None, None
    cb.max_blocks_per_request = 0
    create = manager._create_batch_processor

    def create_with_mtp_pages():
        if isinstance(getattr(manager, "batch_processor", None), MTPBatchProcessor):
            processor = create()  # the engine resets and reuses its processor
            processor.setup_mtp(manager.model, k)
            return processor
        real = manager.model
        manager.model = _WithMTPPages(real)  # only what the processor's cache is sized from
        try:
            processor = create()
        finally:
            manager.model = real
        processor.__class__ = MTPBatchProcessor
        processor.setup_mtp(real, k)
        return processor

    manager._create_batch_processor = create_with_mtp_pages


class _WithMTPPages:
    """What ``_create_batch_processor`` reads of the model, the MTP layer counted as one more MLA layer (its index
    is ``num_hidden_layers``), so the engine's paged cache holds its latents too."""

    def __init__(self, model):
        self.config = copy.copy(model.config)
        self.config.num_hidden_layers = model.config.num_hidden_layers + 1
        self.device, self.dtype = model.device, model.dtype
        self._supports_logits_to_keep = getattr(model, "_supports_logits_to_keep", None)


@dataclass
class _Drafts:
    """A request's drafts for its next step and the processed scores they were drawn from (sampling only)."""

    tokens: list[int]
    scores: torch.Tensor | None  # (len(tokens), V)


@dataclass
class _Slot:
    """One request's share of a step: its rows ``start:end`` of the packed batch and what they are."""

    state: object  # the engine's RequestState
    start: int
    end: int
    verify: bool  # a decoding request: row 0 its next token, the rest its drafts
    column: int | None  # its column among the requests with a new token (logits processor arguments), or None


class MTPBatchProcessor(ContinuousBatchProcessor):
    """transformers' batch processor with MTP drafts (module docstring). Never constructed: :func:`attach_mtp`
    switches the engine's own processor to this class once it is built."""

    def setup_mtp(self, model, k: int) -> None:
        self.mtp_k = k
        self.mtp_layer = model.model.mtp_layers[0]
        self._drafts: dict[str, _Drafts] = {}
        self._emitted: dict[str, list[tuple[int, float | None]]] = {}
        self._stats: dict[str, MTPStats] = {}
        schedule = getattr(self.scheduler.schedule_batch, "__wrapped__", self.scheduler.schedule_batch)

        def schedule_keeping_drafts(token_budget, cache_budget):
            scheduled = schedule(token_budget, cache_budget)
            for future in scheduled[0] or ():
                state = future.state
                if state.status == RequestStatus.DECODING and state.remaining_prefill_tokens:
                    state.remaining_prefill_tokens = []  # the budget cut its drafts: verify the ones scheduled
                    future.has_new_token = True
            return scheduled

        schedule_keeping_drafts.__wrapped__ = schedule
        self.scheduler.schedule_batch = schedule_keeping_drafts

    @torch.no_grad()
    def _generation_step(self, model) -> None:
        """One forward of the main model over the packed batch, each request's verdict on its drafts, the MTP
        layer over the confirmed positions, and the next drafts (what ``update_batch`` then records)."""
        io = self.inputs_and_outputs
        batch = io.get_model_kwargs(use_padding=False)
        tokens = batch["input_ids"][0].long()  # (S,)
        positions = batch["position_ids"][0].long()  # (S,)
        self._args = batch["logits_processor_args"]  # (P, requests with a new token)
        pages = PagedLatentBatch(batch["cache"], batch)
        hidden = model.model(tokens[None], position_ids=positions[None], cache=pages, use_cache=True)
        hidden = hidden.last_hidden_state[0]  # (S, D) after the final norm

        cu_q = batch["cu_seq_lens_q"].tolist()
        slots, rows, columns, column = [], [], [], 0
        for i, future in enumerate(io.requests_in_batch):
            start, end = cu_q[i], cu_q[i + 1]
            verify = future.has_new_token and future.state.generated_len() > 0
            slots.append(_Slot(future.state, start, end, verify, column if future.has_new_token else None))
            if future.has_new_token:
                first = start if verify else end - 1  # a finished prefill: only its last row predicts
                rows.extend(range(first, end))
                columns.extend([column] * (end - first))
                column += 1

        if rows:
            index = torch.tensor(rows, device=hidden.device)
            logits = model.lm_head(hidden[index]).float()  # (N, V)
            scores = self._process(logits, tokens[index], columns)
            logprobs = scores.log_softmax(-1) if self.return_logprobs else None
            self._verify(slots, tokens, scores, logprobs)
        self._draft(model, slots, tokens, positions, hidden)

    def _verify(self, slots: list[_Slot], tokens, scores, logprobs) -> None:
        """Each request with a new token: accept a prefix of its drafts (or choose the token after its prompt) and
        step its cache position back over the rejected drafts."""
        row = 0
        for slot in slots:
            if slot.column is None:
                continue
            state = slot.state
            rid = state.request_id
            n = slot.end - slot.start if slot.verify else 1
            scheduled = tokens[slot.start + 1 : slot.end].tolist() if slot.verify else []
            drafts, q = scheduled, None
            if scheduled and self.do_sample:
                known = self._drafts.get(rid)
                if known is not None and known.tokens[: len(scheduled)] == scheduled:
                    q = known.scores[: len(scheduled)]
                else:  # no record of what they were drawn from: verify none (lossless, only slower)
                    drafts = []
            stats = self._stats.setdefault(rid, MTPStats(self.mtp_k)) if slot.verify else None
            emitted, accepted = accept_drafts(scores[row : row + n], drafts, q, self.do_sample, stats)
            if stats is not None:
                stats.forwards += 1
                stats.emitted += len(emitted)
            state.position_offset -= len(scheduled) - accepted  # rejected slots: overwritten by the next step
            self._emitted[rid] = [
                (t, None if logprobs is None else float(logprobs[row + j, t])) for j, t in enumerate(emitted)
            ]
            row += n

    def _draft(self, model, slots: list[_Slot], tokens, positions, hidden) -> None:
        """The MTP layer over every position the main model confirmed (slot ``i`` pairs ``h_i`` with token
        ``i + 1``), then up to ``k`` drafts for each request that will decode again."""
        spans, drafting = [], []
        for slot in slots:
            state = slot.state
            if slot.column is None:  # a prefill chunk with more to come: the token after it is the prompt's
                confirmed, following = slot.end - slot.start, state.remaining_prefill_tokens[0]
            else:
                emitted = [t for t, _ in self._emitted[state.request_id]]
                confirmed = len(emitted) if slot.verify else slot.end - slot.start
                following = emitted[-1]
                left = _tokens_left(state, len(emitted))
                if left <= 0:
                    continue  # finishes this step: no drafts needed
                drafting.append((len(spans), slot, following, left))
            slot_tokens = tokens[slot.start + 1 : slot.start + confirmed].tolist() + [following]
            past = int(positions[slot.start])
            spans.append((state.request_id, past, slot_tokens, hidden[slot.start : slot.start + confirmed]))
        if not spans:
            return
        last_hidden, last_logits = self._mtp_forward(model, spans)  # (R, D), (R, V)

        # first drafts from each request's last confirmed slot; the next ones from the MTP layer's own output
        plans = []
        for span_index, slot, following, left in drafting:
            k = min(self.mtp_k, left - 1)
            while k and not self.cache.can_store_request_tokens(slot.state, 1 + k):
                k -= 1  # the cache is short: fewer drafts (the next step's tokens and the draft slots, allocated now)
            if k:
                plans.append((slot.state, k, span_index, following, slot.column))
            else:
                self._drafts[slot.state.request_id] = _Drafts([], None)
        if not plans:
            return
        index = torch.tensor([p[2] for p in plans], device=hidden.device)
        h, lg = last_hidden[index], last_logits[index]
        fed = torch.tensor([p[3] for p in plans], device=hidden.device)
        cols = [p[4] for p in plans]
        drafts, draft_scores = [], []
        for step in range(max(p[1] for p in plans)):
            scores = self._process(lg, fed, cols)
            choice = scores.softmax(-1).multinomial(1)[:, 0] if self.do_sample else scores.argmax(-1)  # (R,)
            drafts.append(choice)
            draft_scores.append(scores if self.do_sample else None)
            live = [i for i, p in enumerate(plans) if p[1] > step + 1]
            if not live:
                break
            spans = [
                (plans[i][0].request_id, plans[i][0].position_offset + step, [int(choice[i])], h[i : i + 1])
                for i in live
            ]
            live_index = torch.tensor(live, device=hidden.device)
            h_live, lg_live = self._mtp_forward(model, spans)
            h, lg = h.index_copy(0, live_index, h_live), lg.index_copy(0, live_index, lg_live)
            fed = choice
        for i, (state, k, *_) in enumerate(plans):
            tokens_i = [int(d[i]) for d in drafts[:k]]
            scores_i = torch.stack([s[i] for s in draft_scores[:k]]) if self.do_sample else None
            self._drafts[state.request_id] = _Drafts(tokens_i, scores_i)

    def _mtp_forward(self, model, spans):
        """The MTP layer over packed spans ``(request id, past, slot tokens, main hidden [q, D])``, its latents
        written to (and read from) its pages -> each span's last ``(hidden before shared_head.norm [R, D],
        logits [R, V])``."""
        cache = self.cache
        read = [[] for _ in cache.cache_allocators]
        write = [[] for _ in cache.cache_allocators]
        cu_q, cu_k, pos, toks = [0], [0], [], []
        for rid, past, slot_tokens, _ in spans:
            q = len(slot_tokens)
            cache.extend_read_and_write_indices(rid, past, q, read, write)
            cu_q.append(cu_q[-1] + q)
            cu_k.append(cu_k[-1] + past + q)
            pos.extend(range(past, past + q))
            toks.extend(slot_tokens)
        device = spans[0][3].device
        (layer_type,) = cache.cache_allocators

        def ints(values, dtype=torch.int64):
            return torch.tensor(values, dtype=dtype, device=device)

        layout = {
            "cu_seq_lens_q": ints(cu_q, torch.int32),
            "cu_seq_lens_k": {layer_type: ints(cu_k, torch.int32)},
            "read_index": [ints(r) for r in read],
            "write_index": [ints(w) for w in write],
        }
        last = ints(cu_q[1:]) - 1
        position_ids = ints(pos)[None]
        x, logits = self.mtp_layer(
            ints(toks)[None],
            torch.cat([s[3] for s in spans])[None],
            model.model.rotary_emb(position_ids),
            None,
            PagedLatentBatch(cache, layout),
            logits_index=last,
        )
        return x[0, last], logits[0].float()

    def _process(self, logits, fed, columns):
        """The engine's logits processors on rows ``[N, V]``, each row with its request's arguments."""
        if not self.logit_processor.do_processing:
            return logits
        args = self._args[:, torch.as_tensor(columns, device=self._args.device)]
        return self.logit_processor(fed, logits, args)

    def update_batch(self) -> None:
        """Record each request's emitted tokens (stopping at EOS or its limit), set its next step's tokens (the
        last emitted and its drafts), deliver outputs (``mtp_stats`` on each)."""
        pending = []
        for future in self.inputs_and_outputs.requests_in_batch:
            state = future.state
            rid = state.request_id
            if state.status in (RequestStatus.FINISHED, RequestStatus.PENDING):
                raise RuntimeError(f"Tried to update {state.status.name} request {rid} in sync mode.")
            if future.has_new_token:
                if state.generated_len() == 0:
                    state.status = RequestStatus.DECODING
                finished = False
                for token, logprob in self._emitted.pop(rid):
                    finished = state.update_and_check_completion(token, logprob)
                    if finished:
                        break
                self.cache.mark_complete_blocks(state, future.complete_blocks)
                stats = self._stats.get(rid) or MTPStats(self.mtp_k)
                if finished:
                    self.scheduler.finish_request(rid)
                    self.scheduler.block_new_requests = False
                    self._drafts.pop(rid, None)
                    self._stats.pop(rid, None)
                else:
                    drafts = self._drafts.get(rid)
                    state.tokens_to_process = [state.generated_tokens[-1]] + (drafts.tokens if drafts else [])
                if state.streaming or finished:
                    output = state.to_generation_output()
                    output.mtp_stats = stats
                    pending.append(output)
            elif state.status == RequestStatus.PREFILLING:
                self.cache.mark_complete_blocks(state, future.complete_blocks)
        if pending:
            self.output_router.deliver_batch(pending)
        if self.scheduler._requests_to_fork:
            raise RuntimeError("use_mtp=True in continuous batching cannot fork requests (num_return_sequences > 1).")
        active = self.scheduler.active_requests
        for table in (self._drafts, self._stats):
            for rid in [r for r in table if r not in active]:  # cancelled or failed requests
                del table[rid]


def _tokens_left(state, emitting: int) -> int:
    """Tokens the request may still generate after the ``emitting`` ones of this step."""
    if state.max_new_tokens is None:
        return 1 << 30
    return state.max_new_tokens - state.generated_len() - emitting
