"""MTP drafts inside continuous batching (``generation/mtp_batching.py``).

Greedy, every request's tokens equal its own plain ``generate()`` whatever its drafts: random MTP weights (drafts
mostly rejected: the cache position steps back every step), an oracle MTP layer (every draft accepted: k + 1 tokens
per forward, EOS inside an accepted run), the trained shipped model (a mix). Sampling follows the model's
distribution through the acceptance rule. Mixed prompt lengths, chunked prefills, a cache too small for all requests
at once and a token budget that cuts drafts all run through the same steps.
"""

from __future__ import annotations

import copy
from collections import Counter

import pytest
import torch
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig

import modeling_deepseekv3 as ds
from helpers import ROOT, load, oracle_model

SHIPPED = ROOT / "models" / "shakespeare-deepseek-v3"
PROMPT_LENGTHS = (1, 3, 9, 17, 30, 64, 5, 120)


@pytest.fixture(scope="module")
def model(tiny_fp8):
    return load(tiny_fp8).eval()


@pytest.fixture(scope="module")
def oracle(tmp_path_factory):
    path = ds.make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "bf16-mtp", fp8=False, seed=3)
    return oracle_model(path).eval()


def _prompts(lengths, vocab, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(2, vocab, (n,), generator=g).tolist() for n in lengths]


def _greedy(max_new_tokens, eos=None):
    return GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=eos, pad_token_id=0)


def _own_generate(model, prompt, config):
    return model.generate(torch.tensor([prompt]), generation_config=config)[0, len(prompt) :].tolist()


def _check_each_request(model, prompts, out, config):
    assert list(out) == [f"req_{i}" for i in range(len(prompts))]
    for i, prompt in enumerate(prompts):
        assert out[f"req_{i}"].generated_tokens == _own_generate(model, prompt, config), f"request {i}"


@pytest.mark.parametrize("k", [1, 3])
def test_rejected_drafts_step_the_cache_back(model, k):
    """Random MTP weights: nearly every draft is rejected, so every step verifies, rejects and overwrites slots;
    chunked prefills (``max_batch_tokens`` 40 also cuts some requests' drafts) and a cache that holds only part of the
    requests at once."""
    prompts = _prompts(PROMPT_LENGTHS, model.config.vocab_size)
    cb = ContinuousBatchingConfig(page_size=16, num_blocks=24, max_batch_tokens=40)
    out = model.generate_batch(
        prompts, generation_config=_greedy(12), continuous_batching_config=cb, use_mtp=True, num_speculative_tokens=k
    )
    _check_each_request(model, prompts, out, _greedy(12))
    stats = [o.mtp_stats for o in out.values()]
    assert all(s.num_speculative_tokens == k and s.proposed[0] > 0 for s in stats)
    # drafts are verified at nearly every step (not at a request's last, nor where the token budget cut them all)
    assert sum(s.proposed[0] for s in stats) >= 0.8 * sum(s.forwards for s in stats)


@pytest.mark.parametrize("k", [1, 3])
def test_accepted_drafts_emit_k_plus_one_tokens_per_forward(oracle, k):
    """An MTP layer that predicts exactly what the model will: every draft is accepted, each verify forward emits
    k + 1 tokens (1 + 3 (k + 1) tokens: the prefill's own token, then three verify steps)."""
    prompts = _prompts(PROMPT_LENGTHS, oracle.config.vocab_size, seed=4)
    n = 1 + 3 * (k + 1)
    config = GenerationConfig(max_new_tokens=n, do_sample=False, eos_token_id=None, pad_token_id=0)
    out = oracle.generate_batch(prompts, generation_config=config, use_mtp=True, num_speculative_tokens=k)
    _check_each_request(oracle, prompts, out, config)
    for o in out.values():
        assert o.mtp_stats.acceptance == [1.0] * k
        assert o.mtp_stats.tokens_per_forward == k + 1


def test_eos_inside_an_accepted_run_ends_the_request_there(oracle):
    """Through the manager, request by request: an EOS that arrives as an accepted draft ends that request at the
    EOS (the drafts after it are dropped), each request keeps its own ``max_new_tokens``."""
    prompts = _prompts((7, 33, 12, 50), oracle.config.vocab_size, seed=1)
    limits = (3, 12, 6, 9)
    free = _own_generate(oracle, prompts[1], _greedy(12))
    eos = free[5]  # in the second verify step's run of drafts (k = 3: tokens 1-4, 5-8)
    assert eos not in free[:5]
    config = _greedy(12, eos)
    config.use_mtp, config.num_speculative_tokens = True, 3
    with oracle.continuous_batching_context_manager(
        generation_config=config, continuous_batching_config=ContinuousBatchingConfig(page_size=16)
    ) as manager:
        ids = [manager.add_request(p, max_new_tokens=n, eos_token_id=eos) for p, n in zip(prompts, limits)]
        results = {}
        while len(results) < len(ids):
            r = manager.get_result(timeout=60)
            assert r is not None, "the engine stopped answering"
            results[r.request_id] = r
    for rid, prompt, n in zip(ids, prompts, limits):
        assert results[rid].error is None, results[rid].error
        assert results[rid].generated_tokens == _own_generate(oracle, prompt, _greedy(n, eos)), rid
    assert results[ids[1]].generated_tokens == free[:6]


@pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="no shipped model in this checkout")
def test_the_trained_model_accepts_most_drafts_and_stays_exact():
    """The shipped model's trained MTP layer: drafts partly accepted (every request takes both branches), the
    output equal to plain decoding token for token."""
    model = load(SHIPPED).eval()
    tok = ds.load_tokenizer(SHIPPED)
    text = ["KING HENRY.\nNow, lords,", "LADY MACBETH.\nOut, damned spot!", "HAMLET.\nTo be", "ROMEO.\n"]
    prompts = [tok(t, add_special_tokens=False)["input_ids"] for t in text]
    config = GenerationConfig(max_new_tokens=32, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=0)
    out = model.generate_batch(prompts, generation_config=config, use_mtp=True, num_speculative_tokens=3)
    _check_each_request(model, prompts, out, config)
    stats = [o.mtp_stats for o in out.values()]
    assert sum(s.emitted for s in stats) / sum(s.forwards for s in stats) > 1.8
    assert all(0 < sum(s.accepted) < sum(s.proposed) for s in stats)


def test_sampling_follows_the_models_distribution(oracle):
    """800 sampled continuations of one prompt, one draft per step, temperature 1.5, top-k 4. The drafts come from a
    sharpened copy of the target (the oracle's MTP head scaled by 20: nearly always the target's most likely token),
    so the rule accepts about a third and resamples the rest from the residual. The second token must follow the
    model's own probabilities after each first token (chi-square summed over the four first tokens, 12 degrees of
    freedom, at p = 1e-4). Accepting every draft, or resampling from the target instead of the residual, fails it by
    far."""
    model = copy.deepcopy(oracle)
    with torch.no_grad():
        model.model.mtp_layers[0].shared_head.norm.weight.mul_(20.0)
    prompt = _prompts((11,), model.config.vocab_size, seed=2)[0]
    n = 800
    config = GenerationConfig(  # 3 tokens: the second is verified (a draft only pays with 2 tokens still to go)
        max_new_tokens=3, do_sample=True, temperature=1.5, top_k=4, top_p=1.0, eos_token_id=None, pad_token_id=0
    )
    torch.manual_seed(0)
    out = model.generate_batch([prompt] * n, generation_config=config, use_mtp=True, num_speculative_tokens=1)
    pairs = [tuple(o.generated_tokens[:2]) for o in out.values()]
    assert len(pairs) == n and all(len(o.generated_tokens) == 3 for o in out.values())
    accepted = sum(o.mtp_stats.accepted[0] for o in out.values())
    assert 0.15 * n < accepted < 0.9 * n, accepted  # both branches of the rule ran, often

    stat, outcomes = 0.0, 0
    for head, m in Counter(a for a, _ in pairs).items():
        with torch.no_grad():
            logits = model(torch.tensor([prompt + [head]])).logits[0, -1].double() / 1.5
        top = logits.topk(4)
        p = dict(zip(top.indices.tolist(), top.values.softmax(-1).tolist()))
        second = Counter(b for a, b in pairs if a == head)
        assert set(second) <= set(p), f"sampled {set(second) - set(p)} outside the top-k"
        stat += sum((second.get(t, 0) - m * q) ** 2 / (m * q) for t, q in p.items())
        outcomes += 1
    assert outcomes == 4 and stat < 39.1, f"chi2 {stat:.1f} over 12 degrees of freedom"


def test_what_mtp_batching_cannot_do_is_refused_by_name(model, tiny_bf16_direct_q):
    prompts = _prompts((5, 6), model.config.vocab_size)
    forked = _greedy(4)
    forked.num_return_sequences = 2
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.generate_batch(prompts, generation_config=forked, use_mtp=True)
    forked.use_mtp = True
    with pytest.raises(ValueError, match="num_return_sequences"):
        model.init_continuous_batching(generation_config=forked)
    with pytest.raises(ValueError, match="num_speculative_tokens must be an integer >= 1"):
        model.generate_batch(prompts, generation_config=_greedy(4), use_mtp=True, num_speculative_tokens=0)
    with pytest.raises(ValueError, match="needs the MTP layer"):
        load(tiny_bf16_direct_q).generate_batch(prompts, generation_config=_greedy(4), use_mtp=True)
    async_cb = ContinuousBatchingConfig(use_async_batching=True)
    config = _greedy(4)
    config.use_mtp = True
    with pytest.raises(ValueError, match="use_async_batching=False"):
        model.init_continuous_batching(generation_config=config, continuous_batching_config=async_cb)
    small = ContinuousBatchingConfig(page_size=16, num_blocks=1)
    with pytest.raises(ValueError, match="num_blocks"):  # 12 + 4 tokens fit 16 slots; the 3 drafts do not
        model.generate_batch(
            [[5] * 12], generation_config=config, continuous_batching_config=small, num_speculative_tokens=3
        )
