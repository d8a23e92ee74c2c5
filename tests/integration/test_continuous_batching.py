"""transformers' continuous batching on the paged latent cache (``generation/continuous_batching.py``).

Every request of a ``generate_batch`` (or of a manager fed request by request) must get, greedy and in fp32, the
tokens its own ``generate()`` gives: mixed prompt lengths (decode groups, prefills alone, prefills chunked over a
past), more requests than the cache holds at once, EOS mid-way, ``max_new_tokens`` per request. Sampling must follow
the model's distribution. Requests that could never finish are refused up front, by name.
"""

from __future__ import annotations

import inspect
import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

from helpers import load
from modeling_deepseekv3.generation import continuous_batching as cb_mod
from modeling_deepseekv3.generation import paged_latents as pl_mod
from modeling_deepseekv3.generation.paged_latents import PagedLatentBatch, _plan_groups, _plan_read, _visible

PROMPT_LENGTHS = (1, 3, 9, 17, 30, 64, 5, 120)


@pytest.fixture(scope="module")
def model(tiny_fp8):
    return load(tiny_fp8).eval()


def _prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def _greedy(max_new_tokens, eos=None):
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)


def _own_generate(model, prompt, config):
    out = model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt) :].tolist()
    return out


def _count_attends(monkeypatch):
    calls = Counter()
    attend = PagedLatentBatch.attend

    def counting(self, module, *args):
        calls[tuple((g.requests, g.q_len) for g in self.groups)] += 1
        return attend(self, module, *args)

    monkeypatch.setattr(PagedLatentBatch, "attend", counting)
    return calls


@pytest.mark.parametrize("mla_impl", ["auto", "expand"])
def test_generate_batch_greedy_equals_each_requests_generate(model, monkeypatch, mla_impl):
    """Mixed lengths, a chunked prefill (``max_batch_tokens`` 48: the 64- and 120-token prompts prefill over their
    own past) and a cache that holds only part of the requests at once (the engine must wait for pages); decode
    groups through the absorbed projection shared by all groups (auto) and through each layer's expanded path."""
    monkeypatch.setattr(model.config, "mla_impl", mla_impl)
    calls = _count_attends(monkeypatch)
    prompts = _prompts(PROMPT_LENGTHS, model.config.vocab_size)
    config = _greedy(12)
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=24, max_batch_tokens=48)
    out = model.generate_batch(prompts, generation_config=config, continuous_batching_config=cb)
    assert len(out) == len(prompts)
    for i, prompt in enumerate(prompts):
        assert out[f"req_{i}"].generated_tokens == _own_generate(model, prompt, _greedy(12)), f"request {i}"
    layouts = {layout for layout in calls}
    assert any(sum(r for r, _ in layout) > 1 for layout in layouts), "no step attended several requests at once"
    assert any(any(q > pl_mod.DECODE_GROUP_MAX for _, q in layout) for layout in layouts), "no prefill chunk ran"


def test_requests_added_one_by_one_with_their_own_limits_and_eos(model):
    """Through the manager, as ``transformers serve`` drives it: each request's ``max_new_tokens``, and an EOS token
    (one the greedy continuation of a request reaches mid-way) ending that request early and no other."""
    prompts = _prompts((7, 33, 12, 50), model.config.vocab_size, seed=1)
    limits = (3, 10, 6, 8)
    free = _own_generate(model, prompts[1], _greedy(10))
    eos = free[4]  # request 1 stops after its 5th token
    with model.continuous_batching_context_manager(
        generation_config=_greedy(10, eos), continuous_batching_config=ContinuousBatchingConfig(page_size=16)
    ) as manager:
        ids = [manager.add_request(p, max_new_tokens=n, eos_token_id=eos) for p, n in zip(prompts, limits)]
        results = {}
        while len(results) < len(ids):
            r = manager.get_result(timeout=60)
            assert r is not None, "the engine stopped answering"
            results[r.request_id] = r
    for rid, prompt, n in zip(ids, prompts, limits):
        expected = _own_generate(model, prompt, _greedy(n, eos))
        assert results[rid].generated_tokens == expected, rid
    assert results[ids[1]].generated_tokens == free[:5]


def test_sampling_follows_the_models_distribution(model):
    """200 sampled continuations of one prompt (temperature 1.5, top-k 4): the first token's frequencies, and the
    second's after the most frequent first one, against the model's own probabilities (a chi-square test at
    p = 1e-4, so a correct sampler fails it once in 10^4 runs; drawing from the wrong step's logits or skipping the
    processors fails it by far)."""
    prompt = _prompts((11,), model.config.vocab_size, seed=2)[0]
    n = 200
    config = GenerationConfig(
        max_new_tokens=2, do_sample=True, temperature=1.5, top_k=4, top_p=1.0, eos_token_id=None, pad_token_id=0
    )
    torch.manual_seed(0)
    out = model.generate_batch([prompt] * n, generation_config=config)
    pairs = [tuple(o.generated_tokens) for o in out.values()]
    assert len(pairs) == n and all(len(p) == 2 for p in pairs)

    def probs(prefix):
        with torch.no_grad():
            logits = model(torch.tensor([prefix])).logits[0, -1].double() / 1.5
        top = logits.topk(4)
        return dict(zip(top.indices.tolist(), top.values.softmax(-1).tolist()))

    first = Counter(a for a, _ in pairs)
    _assert_chi_square(first, probs(prompt), n)
    head = first.most_common(1)[0][0]
    second = Counter(b for a, b in pairs if a == head)
    _assert_chi_square(second, probs(prompt + [head]), first[head])


def _assert_chi_square(counts: Counter, p: dict[int, float], n: int) -> None:
    assert set(counts) <= set(p), f"sampled {set(counts) - set(p)} outside the top-k"
    stat = sum((counts.get(t, 0) - n * q) ** 2 / (n * q) for t, q in p.items())
    # chi-square with 3 degrees of freedom: P(stat > 21.1) = 1e-4
    assert stat < 21.1, f"frequencies {dict(counts)} of {n} against probabilities {p}: chi2 {stat:.1f}"


def test_requests_that_could_never_finish_are_refused_by_name(model):
    prompts = _prompts((20, 40), model.config.vocab_size)
    limit = model.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"max_position_embeddings \\({limit}\\)"):
        model.generate_batch([[5] * (limit - 3)], generation_config=_greedy(8))
    small = ContinuousBatchingConfig(page_size=16, num_blocks=2)
    with pytest.raises(ValueError, match=r"num_blocks"):
        model.generate_batch(prompts, generation_config=_greedy(8), continuous_batching_config=small)
    manager = model.init_continuous_batching(
        generation_config=_greedy(8), continuous_batching_config=ContinuousBatchingConfig(page_size=16, num_blocks=2)
    )
    try:
        with pytest.raises(ValueError, match=r"32 \(2 blocks of 16\)"):
            manager.add_request(prompts[1], max_new_tokens=8)
    finally:
        manager.destroy()


def test_forward_keeps_its_signature_and_the_hook_is_attached_once(model):
    """Trainer drops the dataset columns ``forward`` does not name: the paged cache is wrapped by a forward pre-hook,
    never by a ``forward(*args, **kwargs)`` override."""
    for _ in range(2):
        model.init_continuous_batching(generation_config=_greedy(2)).destroy()
    assert {"input_ids", "labels", "position_ids"} <= set(inspect.signature(model.forward).parameters)
    assert len(model._forward_pre_hooks) == 1


def test_cpu_cache_is_sized_from_the_budget_not_the_free_ram(model):
    """transformers' default takes 90% of free memory (and a batch of 8192 tokens, with a dense mask over the whole
    cache); on CPU the latent cache holds ``CPU_CACHE_REQUESTS`` full contexts within ``CPU_CACHE_BYTES``, or just
    what the workload needs when ``generate_batch`` knows it; what the user sets is kept."""
    from transformers.generation.continuous_batching.utils import WorkloadHints

    c = model.config
    manager = model.init_continuous_batching(generation_config=_greedy(4))
    try:
        cb = manager.continuous_batching_config
        assert cb.num_blocks * cb.page_size == cb_mod.CPU_CACHE_REQUESTS * c.max_position_embeddings
        assert cb.max_batch_tokens == cb_mod.CPU_BATCH_TOKENS
    finally:
        manager.destroy()
    per_token = (c.kv_lora_rank + c.qk_rope_head_dim) * 4 * c.num_hidden_layers
    hints = WorkloadHints(max_prompt_length=300, max_generated_length=20, num_requests=3)
    assert cb_mod.cpu_cache_blocks(c, ContinuousBatchingConfig(), torch.float32, hints) == 3 * math.ceil(320 / 256)
    tight = cb_mod.cpu_cache_blocks(c, ContinuousBatchingConfig(), torch.float32, budget=per_token * 256 * 5 + 7)
    assert tight == 5
    user = ContinuousBatchingConfig(num_blocks=7, max_batch_tokens=64)
    manager = model.init_continuous_batching(generation_config=_greedy(4), continuous_batching_config=user)
    try:
        assert (manager.continuous_batching_config.num_blocks, manager.continuous_batching_config.max_batch_tokens) == (
            7,
            64,
        )
    finally:
        manager.destroy()


def test_groups_cover_every_query_once_with_causal_visibility():
    """The planner's twin: for each request, queries see exactly their own past and the new tokens before them;
    decode-sized requests share groups of similar past, longer chunks run alone."""
    q_lens = [1, 1, 1, 4, 0, 1, 40, 4, 1]
    k_lens = [300, 290, 100, 20, 0, 95, 60, 21, 7]
    cu_q = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
    cu_k = [0, *torch.tensor(k_lens).cumsum(0).tolist()]
    groups = _plan_groups(cu_q, cu_k, "cpu")
    seen = torch.cat([g.query_index for g in groups]).sort().values
    assert seen.tolist() == list(range(cu_q[-1]))
    for g in groups:
        keys = g.key_index.view(g.requests, -1)
        queries = g.query_index.view(g.requests, g.q_len)
        for r in range(g.requests):
            i = next(j for j in range(len(q_lens)) if cu_q[j] == int(queries[r, 0]) and q_lens[j])
            assert q_lens[i] == g.q_len
            k_len = k_lens[i]
            assert keys[r, :k_len].tolist() == list(range(cu_k[i], cu_k[i + 1]))
            mask = (
                g.mask[r, 0]
                if g.mask is not None
                else torch.ones(g.q_len, k_len, dtype=torch.bool).tril(k_len - g.q_len)
            )
            for j in range(g.q_len):
                assert mask[j].nonzero().flatten().tolist() == list(range(k_len - g.q_len + j + 1)), (i, j)
        lengths = [int((keys[r] != keys[r, -1]).sum()) + 1 for r in range(g.requests)]
        assert min(lengths) >= pl_mod.DECODE_GROUP_FILL * max(lengths) or g.requests == 1
    alone = [g for g in groups if g.q_len > pl_mod.DECODE_GROUP_MAX]
    assert [(g.requests, g.q_len) for g in alone] == [(1, 40)]
    assert sorted(g.requests for g in groups if g.q_len == 1) == [1, 2, 2]  # {300, 290}, {100, 95}, {7}


def test_page_reads_equal_token_reads():
    """The fast read (whole pages, ``_Read.pages``) against its twin, token rows through ``read_index``: the same
    latents where each request may look; and a layout that is not page by page falls back to token rows."""
    page, layers = 4, 2
    allocator = SimpleNamespace(tokens_per_page=page, layer_indices=list(range(layers)))
    stride = page * layers
    rows = torch.randn(10 * stride, 8)
    blocks = {0: [5, 1, 3], 1: [7], 2: [0, 9], 3: [2, 4, 6, 8]}
    k_lens = [10, 3, 7, 13]
    read = [b[j // page] * stride + j % page for i, b in blocks.items() for j in range(k_lens[i])]
    read_index = torch.tensor(read)
    cu_k = [0, *torch.tensor(k_lens).cumsum(0).tolist()]
    for q_lens in ([1, 1, 1, 1], [1, 2, 1, 2], [3, 3, 5, 2]):
        cu_q = [0, *torch.tensor(q_lens).cumsum(0).tolist()]
        for g in _plan_groups(cu_q, cu_k, "cpu"):
            twin = torch.index_select(rows, 0, read_index[g.key_index]).view(g.requests, -1, 8)
            fast = _plan_read(g, read_index, allocator)
            assert fast.pages == (page, stride)
            got = fast.latents(rows, g)
            for r in range(g.requests):
                n = int(g.k_lens[r])
                assert torch.equal(got[r, :n], twin[r, :n])
            if g.requests > 1:
                assert torch.equal(fast.mask, _visible(g.k_lens, g.q_len, got.shape[1]))
                assert torch.equal(fast.mask[..., : g.k_max], g.mask)
            else:
                assert fast.mask is None and got.shape[1] == g.k_max
    shuffled = read_index.clone()
    shuffled[[1, 2]] = shuffled[[2, 1]]
    for g in _plan_groups([0, 1, 2, 3, 4], cu_k, "cpu"):
        slow = _plan_read(g, shuffled, allocator)
        twin = torch.index_select(rows, 0, shuffled[g.key_index]).view(g.requests, -1, 8)
        if 0 in g.k_start.tolist():  # request 0 holds the swapped rows: its group reads token rows
            assert slow.pages is None and torch.equal(slow.latents(rows, g), twin)
        else:
            assert slow.pages == (page, stride)
