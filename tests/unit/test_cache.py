"""The latent cache: bytes per token, generate() modes, static pre-allocation, FP8 storage."""

from __future__ import annotations

import json

import pytest
import torch

import modeling_deepseekv3 as ds
from helpers import ROOT, attention_layer, input_ids, load
from modeling_deepseekv3.core.cache import LatentCache, StaticLatentCache

HUB = ROOT / "hub_config"


def v3_config(**kw):
    return ds.DeepseekV3Config.from_dict({**json.loads((HUB / "deepseek-v3" / "config.json").read_text()), **kw})


@pytest.mark.parametrize(
    "fmt,dtype,expected",
    [
        ("dtype", torch.bfloat16, 1152),
        ("auto", torch.float32, 2304),
        ("fp8", torch.bfloat16, 656),
        ("fp8_plain", torch.bfloat16, 576),
    ],
)
def test_bytes_per_token_per_layer_v3(fmt, dtype, expected):
    cache = LatentCache(config=v3_config(latent_cache_format=fmt))
    assert cache.bytes_per_token_per_layer(dtype) == expected


@pytest.mark.parametrize("fmt", ["dtype", "fp8", "fp8_plain"])
def test_stored_bytes_match_the_formula(tiny_fp8, fmt):
    model = load(tiny_fp8, latent_cache_format=fmt, dtype=torch.bfloat16)
    with torch.no_grad():
        cache = model(input_ids(2, 10), use_cache=True).cache
    per_token = cache.bytes_per_token_per_layer()
    assert cache.nbytes() == per_token * 2 * 10 * model.config.num_hidden_layers
    assert per_token == {"dtype": 352, "fp8": 160 + 2 * 4 + 16 * 2, "fp8_plain": 176}[fmt]


@pytest.fixture(scope="module")
def model(tiny_fp8):
    return load(tiny_fp8)


@pytest.fixture(scope="module")
def reference(model):
    ids = input_ids(1, 6)
    return ids, model.generate(ids, max_new_tokens=16, do_sample=False, use_cache=False)


def test_generate_injects_the_latent_cache(model, reference):
    ids, ref = reference
    out = model.generate(ids, max_new_tokens=16, do_sample=False, return_dict_in_generate=True)
    assert isinstance(out.cache, LatentCache) and torch.equal(out.sequences, ref)


@pytest.mark.parametrize("mode", ["static", "assisted", "prompt_lookup"])
def test_generate_modes_equal_no_cache_greedy(model, reference, mode):
    ids, ref = reference
    kwargs = {
        "static": {"cache_implementation": "static"},
        "assisted": {"assistant_model": model},
        "prompt_lookup": {"prompt_lookup_num_tokens": 3},
    }[mode]
    out = model.generate(ids, max_new_tokens=16, do_sample=False, **kwargs)
    assert torch.equal(out, ref)


def test_beam_search_equals_no_cache_beam_search(model):
    ids = input_ids(2, 5)
    a = model.generate(ids, max_new_tokens=10, num_beams=3, num_return_sequences=2, do_sample=False)
    b = model.generate(ids, max_new_tokens=10, num_beams=3, num_return_sequences=2, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_sampling_with_repeats_equals_no_cache(model):
    ids = input_ids(1, 5)
    torch.manual_seed(3)
    a = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=20, num_return_sequences=3)
    torch.manual_seed(3)
    b = model.generate(ids, max_new_tokens=12, do_sample=True, top_k=20, num_return_sequences=3, use_cache=False)
    assert torch.equal(a, b)


def test_static_cache_left_padded(model):
    long, short = input_ids(1, 9, seed=1), input_ids(1, 5, seed=2)
    batch = torch.cat((long, torch.cat((torch.zeros(1, 4, dtype=torch.long), short), 1)))
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    dynamic = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    static = model.generate(
        batch, attention_mask=mask, max_new_tokens=6, do_sample=False, cache_implementation="static"
    )
    assert torch.equal(dynamic, static)


def test_cache_bookkeeping(model):
    ids = input_ids(2, 7)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    full = cache.layers[0].latent.clone()
    assert cache.get_seq_length() == 7 and cache.get_mask_sizes(1, 0) == (8, 0)
    cache.crop(-2)
    assert cache.get_seq_length() == 5 and torch.equal(cache.layers[0].latent, full[:, :5])
    cache.reorder_cache(torch.tensor([1, 0]))
    assert torch.equal(cache.layers[0].latent[0], full[1, :5])
    cache.batch_repeat_interleave(2)
    assert cache.layers[0].latent.shape[0] == 4
    cache.batch_select_indices(torch.tensor([0, 3]))
    assert torch.equal(cache.layers[0].latent[1], full[0, :5])
    cache.reset()
    assert cache.get_seq_length() == 0


def test_static_cache_compiles_and_matches(model):
    """A decode step with the pre-allocated cache, compiled to one graph (fullgraph), gives the eager result."""
    ids = input_ids(1, 6)
    with torch.no_grad():
        eager_cache = StaticLatentCache(model.config, max_cache_len=16)
        model(ids, cache=eager_cache)
        nxt = input_ids(1, 1, seed=9)
        eager = model(nxt, cache=eager_cache).logits
        cache = StaticLatentCache(model.config, max_cache_len=16)
        model(ids, cache=cache)
        compiled = torch.compile(model.forward, backend="aot_eager", fullgraph=True, dynamic=False)
        out = compiled(nxt, cache=cache).logits
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt,bound", [("fp8", 0.06), ("fp8_plain", 0.08)])
def test_fp8_latent_cache_accuracy_one_layer(fmt, bound):
    """The error the storage format alone adds to one attention layer's decode output (e4m3 keeps ~4
    significant bits: a few percent). Measured figures: benchmarks/latent_cache_accuracy.py."""
    layer, rotary = attention_layer()
    x = torch.randn(2, 65, layer.config.hidden_size)
    pe = rotary(torch.arange(65)[None].expand(2, 65))
    outs = {}
    for f in ("auto", fmt):
        layer.config.latent_cache_format = f
        cache = LatentCache(config=layer.config)
        with torch.no_grad():
            layer(x[:, :64], tuple(t[:, :64] for t in pe), None, cache)
            outs[f] = layer(x[:, 64:], tuple(t[:, 64:] for t in pe), None, cache)[0]
    rel = ((outs[fmt] - outs["auto"]).norm() / outs["auto"].norm()).item()
    assert 0 < rel < bound


def test_fp8_latent_cache_model_level(tiny_fp8):
    model = load(tiny_fp8, latent_cache_format="fp8")
    ref_model = load(tiny_fp8)
    ids = input_ids(1, 8)
    ref = ref_model.generate(ids, max_new_tokens=40, min_new_tokens=40, do_sample=False)
    with torch.no_grad():
        full = ref_model(ref, use_cache=False).logits[0, 7:-1]
        out = model(ref[:, :8], use_cache=True)
        steps, cache = [out.logits[:, -1:]], out.cache
        for t in range(8, ref.shape[1] - 1):
            out = model(ref[:, t : t + 1], cache=cache)
            steps.append(out.logits)
    logits = torch.cat(steps, 1)[0]
    assert cache.layers[0].parts["latent"].dtype == torch.float8_e4m3fn
    assert (logits.argmax(-1) == full.argmax(-1)).float().mean() > 0.75
    assert ((logits - full).norm() / full.norm()) < 0.3
