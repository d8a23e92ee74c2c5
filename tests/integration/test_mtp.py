"""MTP speculative decoding: lossless (greedy token for token, sampling in distribution), batched with ragged
acceptance, on every cache kind; an oracle draft is always accepted; draft logits equal transformers-native's
MtpModel; every conflict is a clear error."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers
from transformers import TextIteratorStreamer
from transformers.generation.configuration_utils import CompileConfig

import modeling_deepseekv3 as ds
from helpers import input_ids, load, native_from, oracle_model
from modeling_deepseekv3.generation import MTPStats


def left_padded(lengths, seed=0):
    rows = [input_ids(1, n, seed=seed + i)[0] for i, n in enumerate(lengths)]
    width = max(lengths)
    batch = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(batch)
    for i, r in enumerate(rows):
        batch[i, width - len(r) :] = r
        mask[i, width - len(r) :] = 1
    return batch, mask


@pytest.mark.parametrize("fixture", ["tiny_fp8", "tiny_bf16_mtp"])
@pytest.mark.parametrize("k", [1, 3])
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_is_identical_to_plain_decoding(request, fixture, k, batch):
    model = load(request.getfixturevalue(fixture))
    ids, mask = left_padded([9, 5, 12, 7][:batch]) if batch > 1 else (input_ids(1, 8), None)
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=18, do_sample=False)
    out = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=18,
        do_sample=False,
        use_mtp=True,
        num_speculative_tokens=k,
        return_dict_in_generate=True,
    )
    assert torch.equal(out.sequences, plain)
    stats = out.mtp_stats
    assert isinstance(stats, MTPStats) and stats.forwards > 0 and len(stats.acceptance) == k


@pytest.fixture(scope="module")
def tiny_bf16_mtp(tmp_path_factory):
    return ds.make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "bf16-mtp", fp8=False, seed=3)


@pytest.mark.parametrize("do_sample", [False, True], ids=["greedy", "sampling"])
def test_a_draft_equal_to_the_target_is_always_accepted(tiny_bf16_mtp, do_sample):
    model = oracle_model(tiny_bf16_mtp)
    ids = input_ids(2, 6)
    torch.manual_seed(0)
    out = model.generate(
        ids,
        max_new_tokens=13,
        min_new_tokens=13,
        do_sample=do_sample,
        use_mtp=True,
        num_speculative_tokens=3,
        return_dict_in_generate=True,
    )
    assert out.mtp_stats.acceptance == [1.0, 1.0, 1.0]
    assert out.mtp_stats.tokens_per_forward == 4.0  # k drafts + the bonus token per forward
    if not do_sample:
        assert torch.equal(out.sequences, model.generate(ids, max_new_tokens=13, min_new_tokens=13, do_sample=False))


def test_sampling_is_exact_in_distribution(tiny_bf16_mtp):
    """The first two sampled tokens, with and without MTP, over many seeds: the joint distributions agree
    within sampling noise (total variation < 0.06 at 1200 samples per side over <= 16 outcomes; two draws of
    plain sampling differ by ~0.03 here). Top-k 4 at temperature 1.5 keeps the outcome space small."""
    model = load(tiny_bf16_mtp)
    prompt = input_ids(1, 5, seed=11).expand(1200, 5)
    kw = {"max_new_tokens": 2, "min_new_tokens": 2, "do_sample": True, "top_k": 4, "temperature": 1.5}
    torch.manual_seed(1)
    plain = model.generate(prompt, **kw)[:, -2:]
    torch.manual_seed(2)
    spec = model.generate(prompt, use_mtp=True, **kw)[:, -2:]

    def dist(pairs):
        keys, counts = torch.unique(pairs, dim=0, return_counts=True)
        return {tuple(k.tolist()): c.item() / len(pairs) for k, c in zip(keys, counts)}

    a, b = dist(plain), dist(spec)
    tv = 0.5 * sum(abs(a.get(k, 0) - b.get(k, 0)) for k in set(a) | set(b))
    assert len(a) > 4 and tv < 0.06, (tv, len(a))


def test_rows_stop_independently_and_all_generate_features(tiny_fp8):
    model = load(tiny_fp8)
    tok = ds.load_tokenizer(tiny_fp8)
    ids, mask = left_padded([6, 9])
    plain = model.generate(ids, attention_mask=mask, max_new_tokens=20, do_sample=False)
    eos = int(plain[0, 12])  # a token row 0 emits mid-way: as EOS it ends row 0 early
    plain_eos = model.generate(
        ids, attention_mask=mask, max_new_tokens=20, do_sample=False, eos_token_id=eos, pad_token_id=0
    )
    spec_eos = model.generate(
        ids,
        attention_mask=mask,
        max_new_tokens=20,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
        use_mtp=True,
        num_speculative_tokens=2,
    )
    assert torch.equal(spec_eos, plain_eos)
    torch.manual_seed(0)
    several = model.generate(
        input_ids(1, 7), max_new_tokens=6, min_new_tokens=6, do_sample=True, num_return_sequences=3, use_mtp=True
    )
    assert several.shape == (3, 13) and not torch.equal(several[0], several[1])
    # repetition penalty, static and FP8 latent caches
    for extra in ({"repetition_penalty": 1.3}, {"cache_implementation": "static"}):
        a = model.generate(input_ids(1, 7), max_new_tokens=10, do_sample=False, **extra)
        b = model.generate(input_ids(1, 7), max_new_tokens=10, do_sample=False, use_mtp=True, **extra)
        assert torch.equal(a, b), extra
    fp8_cache = load(tiny_fp8, latent_cache_format="fp8")
    assert torch.equal(
        fp8_cache.generate(input_ids(1, 7), max_new_tokens=10, do_sample=False),
        fp8_cache.generate(input_ids(1, 7), max_new_tokens=10, do_sample=False, use_mtp=True),
    )
    # stop strings and a streamer
    prompt = tok("The sea is", return_tensors="pt").input_ids
    text = tok.decode(model.generate(prompt, max_new_tokens=12, do_sample=False)[0, prompt.shape[1] :])
    stop = text[3:6]
    a = model.generate(prompt, max_new_tokens=12, do_sample=False, stop_strings=[stop], tokenizer=tok)
    b = model.generate(prompt, max_new_tokens=12, do_sample=False, stop_strings=[stop], tokenizer=tok, use_mtp=True)
    assert torch.equal(a, b) and a.shape[1] < prompt.shape[1] + 12
    streamer = TextIteratorStreamer(tok, skip_prompt=True)
    out = model.generate(prompt, max_new_tokens=12, do_sample=False, use_mtp=True, streamer=streamer)
    assert "".join(streamer) == tok.decode(out[0, prompt.shape[1] :])


def test_draft_logits_equal_transformers_native_mtp(tiny_fp8, tmp_path):
    """Independent reference: native's MtpModel (its ignore-list pointed at the tiny model's MTP layer index)
    on the same weights gives our MTP layer's logits; and native's own batch-1 use_mtp greedy equals ours."""
    from transformers.modeling_layers import MtpModel

    ours = load(tiny_fp8)
    native = native_from(ours, tmp_path)
    n = ours.config.num_hidden_layers
    native._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n}.*"]
    mtp = MtpModel.from_pretrained(native, device_map={"": "cpu"}).float().eval()
    ids = input_ids(1, 10)
    with torch.no_grad():
        hidden = ours.model(ids).last_hidden_state
        pos = torch.arange(9)[None]
        _, our_logits = ours.model.mtp_layers[0](ids[:, 1:], hidden[:, :-1], ours.model.rotary_emb(pos))
        h = mtp.forward_layer(0, native.model(ids).last_hidden_state[:, :-1], pos, None, input_ids=ids[:, 1:])
        native_logits = mtp._project_to_logits(h)
    assert (our_logits - native_logits).abs().max() < 1e-4 and our_logits.abs().max() > 0.5
    a = native.generate(ids, max_new_tokens=12, do_sample=False, use_mtp=True)
    b = ours.generate(ids, max_new_tokens=12, do_sample=False, use_mtp=True)
    assert torch.equal(a, b)


def test_conflicts_are_clear_errors(tiny_fp8, tiny_bf16_direct_q):
    model = load(tiny_fp8)
    ids = input_ids(1, 5)
    with pytest.raises(ValueError, match="MTP layer"):
        load(tiny_bf16_direct_q).generate(ids, use_mtp=True, max_new_tokens=3)
    with pytest.raises(ValueError, match="MTP layer"):
        load(tiny_fp8, load_mtp=False).generate(ids, use_mtp=True, max_new_tokens=3)
    with pytest.raises(ValueError, match="beam search"):
        model.generate(ids, use_mtp=True, num_beams=2, max_new_tokens=3)
    with pytest.raises(ValueError, match="num_speculative_tokens"):
        model.generate(ids, use_mtp=True, num_speculative_tokens=0, max_new_tokens=3)
    with pytest.raises(ValueError, match="DynamicCache"):
        model.generate(ids, use_mtp=True, cache=transformers.DynamicCache(), max_new_tokens=3)
    with pytest.raises(ValueError, match="use_cache=False"):
        model.generate(ids, use_mtp=True, use_cache=False, max_new_tokens=3)
    with pytest.raises(ValueError, match="compile_config would be ignored"):
        model.generate(ids, use_mtp=True, compile_config=CompileConfig(fullgraph=True), max_new_tokens=3)
    assert model.generate(ids, use_mtp=False, max_new_tokens=3).shape == (1, 8)  # off means plain decoding


SHIPPED = Path(__file__).resolve().parents[2] / "models" / "shakespeare-deepseek-v3"


@pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="no shipped model in this checkout")
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_parity_on_the_shipped_model(k):
    """The trained model (real drafts, most accepted): batch 1 and a left-padded batch of 4, FP8 weights."""
    model = load(SHIPPED)
    tok = ds.load_tokenizer(SHIPPED)
    tok.padding_side = "left"
    text = ["KING HENRY.\nNow, lords,", "LADY MACBETH.\nOut, damned spot! out, I say!", "HAMLET.\nTo be", "ROMEO.\n"]
    for prompts in (text[:1], text):
        enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        kw = {"max_new_tokens": 24, "do_sample": False, "pad_token_id": tok.pad_token_id}
        plain = model.generate(**enc, **kw)
        out = model.generate(**enc, **kw, use_mtp=True, num_speculative_tokens=k, return_dict_in_generate=True)
        assert torch.equal(out.sequences, plain)
        assert out.mtp_stats.tokens_per_forward > 1.2  # the trained MTP layer's drafts are mostly accepted


def test_experts_offloaded_to_cpu_and_disk(tiny_fp8):
    """Routed experts placed by the planner in CPU RAM and on disk (read from the shards inside their forward):
    MTP decoding still gives the plain greedy tokens."""
    from modeling_deepseekv3.placement import placement_units

    reference = load(tiny_fp8)
    budget = int(sum(placement_units(reference.config, torch.float32).values()) * 0.6)
    device_map = ds.plan_device_map(tiny_fp8, {"cpu": budget, "disk": "1GiB"}, dtype=torch.float32)
    assert "disk" in device_map.values()
    model = load(tiny_fp8, device_map=device_map)
    ids = input_ids(1, 8)
    plain = reference.generate(ids, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(ids, max_new_tokens=12, do_sample=False, use_mtp=True), plain)
