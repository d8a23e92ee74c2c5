"""MLA: the absorbed path equals the expanded reference; cached decoding equals the full forward."""

from __future__ import annotations

import pytest
import torch

from helpers import attention_layer, input_ids, load
from modeling_deepseekv3.core.attention import LatentAbsorbingProjection, absorb_is_cheaper
from modeling_deepseekv3.core.cache import LatentCache

PATHS = ["expand", "absorb", "auto"]


@pytest.mark.parametrize("q_lora_rank", [96, None], ids=["q_lora", "direct_q"])
@pytest.mark.parametrize("rope", ["yarn", "plain"])
def test_absorb_equals_expand_prefill_and_decode(q_lora_rank, rope):
    overrides = {"q_lora_rank": q_lora_rank}
    if rope == "plain":
        overrides["rope_scaling"] = None
    layer, rotary = attention_layer(**overrides)
    x = torch.randn(2, 13, layer.config.hidden_size)
    pe_all = rotary(torch.arange(13)[None].expand(2, 13))
    outs = {}
    for impl in ("expand", "absorb"):
        layer.config.mla_impl = impl
        with torch.no_grad():
            full = layer(x, pe_all, None)[0]
            cache = LatentCache(config=layer.config)
            steps = [layer(x[:, :8], tuple(t[:, :8] for t in pe_all), None, cache)[0]]
            for i in range(8, 13):
                steps.append(layer(x[:, i : i + 1], tuple(t[:, i : i + 1] for t in pe_all), None, cache)[0])
        outs[impl] = (full, torch.cat(steps, 1))
    torch.testing.assert_close(outs["absorb"][0], outs["expand"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["absorb"][1], outs["expand"][0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(outs["expand"][1], outs["expand"][0], rtol=1e-5, atol=1e-5)


def test_absorb_equals_expand_with_padding_mask():
    layer, rotary = attention_layer()
    x = torch.randn(2, 9, layer.config.hidden_size)
    pe = rotary(torch.arange(9)[None].expand(2, 9))
    keep = torch.ones(2, 9, dtype=torch.bool)
    keep[1, :3] = False
    mask = torch.ones(9, 9, dtype=torch.bool).tril()[None, None] & keep[:, None, None, :]
    mask = mask | torch.eye(9, dtype=torch.bool)[None, None]
    outs = {}
    for impl in ("expand", "absorb"):
        layer.config.mla_impl = impl
        with torch.no_grad():
            outs[impl] = layer(x, pe, mask)[0]
    torch.testing.assert_close(outs["absorb"], outs["expand"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", PATHS)
def test_model_paths_agree_and_cached_decoding_equals_full_forward(tiny_fp8, impl):
    reference = load(tiny_fp8, mla_impl="expand")
    model = load(tiny_fp8, mla_impl=impl)
    ids = input_ids(batch=2, seq=14)
    with torch.no_grad():
        full = reference(ids, use_cache=False).logits
        torch.testing.assert_close(model(ids, use_cache=False).logits, full, rtol=1e-4, atol=1e-4)
        out = model(ids[:, :9], use_cache=True)
        steps, cache = [out.logits], out.cache
        for t in range(9, 14):
            out = model(ids[:, t : t + 1], cache=cache)
            steps.append(out.logits)
    assert isinstance(cache, LatentCache) and cache.get_seq_length() == 14
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("impl", PATHS)
def test_left_padded_batch_all_paths(tiny_fp8, impl):
    model = load(tiny_fp8, mla_impl=impl)
    long, short = input_ids(1, 9, seed=1), input_ids(1, 5, seed=2)
    batch = torch.cat((long, torch.cat((torch.zeros(1, 4, dtype=torch.long), short), 1)))
    mask = torch.ones_like(batch)
    mask[1, :4] = 0
    out = model.generate(batch, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(out[0], model.generate(long, max_new_tokens=8, do_sample=False)[0])
    assert torch.equal(out[1, 4:], model.generate(short, max_new_tokens=8, do_sample=False)[0])


@pytest.mark.parametrize("impl", PATHS)
def test_generate_with_cache_equals_without_all_paths(tiny_fp8, impl):
    model = load(tiny_fp8, mla_impl=impl)
    ids = input_ids(2, 6)
    a = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False)
    b = model.generate(ids, max_new_tokens=12, min_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_auto_picks_absorb_for_decode_and_expand_for_long_prompts():
    v3 = dict(heads=128, nope=128, rope=64, v_dim=128, rank=512)
    assert absorb_is_cheaper(1, 4096, **v3) and absorb_is_cheaper(1, 16, **v3)
    assert absorb_is_cheaper(4, 4096, **v3)  # short chunks on a long cache (speculative verification)
    assert not absorb_is_cheaper(2048, 2048, **v3) and not absorb_is_cheaper(512, 512, **v3)


def test_kv_b_read_inside_its_own_forward(tiny_fp8):
    """The absorbed path calls kv_b_proj's forward (never reads its weight from outside): what an offload
    hook materializes only for that forward is all it needs."""
    model = load(tiny_fp8, mla_impl="absorb")
    kv_b = model.model.layers[1].self_attn.kv_b_proj
    assert isinstance(kv_b, LatentAbsorbingProjection)
    calls = []
    kv_b.register_forward_pre_hook(lambda m, args, kwargs: calls.append(sorted(kwargs)), with_kwargs=True)
    with torch.no_grad():
        model(input_ids(1, 3))
    assert calls == [["latent_attention"]]


def test_replaced_kv_b_proj_falls_back_to_expand(tiny_bf16_direct_q):
    """A kv_b_proj that is no longer ours (e.g. wrapped by PEFT) must be honoured by using expand: the
    output is the expand path's with the new weight, not the absorbed path's with the old one."""
    ids = input_ids(1, 4)
    outs = {}
    for impl in ("absorb", "expand"):
        model = load(tiny_bf16_direct_q, mla_impl=impl)
        with torch.no_grad():
            before = model(ids).logits
        for layer in model.model.layers:
            attn = layer.self_attn
            plain = torch.nn.Linear(attn.kv_b_proj.in_features, attn.kv_b_proj.out_features, bias=False)
            plain.weight.data.copy_(attn.kv_b_proj.weight.data * 1.5)
            attn.kv_b_proj = plain
            assert attn.choose_path(1, 100) == "expand"
        with torch.no_grad():
            outs[impl] = model(ids).logits
    torch.testing.assert_close(outs["absorb"], outs["expand"])
    assert (outs["absorb"] - before).abs().max() > 1e-3  # the replaced weight is in effect


def test_dequantized_model_keeps_the_absorbing_kv_b(tiny_fp8):
    model = load(tiny_fp8, dequantize_fp8=True)
    kv_b = model.model.layers[1].self_attn.kv_b_proj
    assert isinstance(kv_b, LatentAbsorbingProjection) and kv_b.weight.dtype == torch.float32
    assert model.model.layers[1].self_attn.choose_path(1, 50) == "absorb"


def test_fp8_kv_b_dense_cache_follows_weight_changes():
    """The absorbed path keeps the dequantized FP8 kv_b_proj for inference; changing the FP8 weight (a LoRA
    merge requantizes in place) must invalidate it."""
    from modeling_deepseekv3.core.attention import KVBFP8Linear

    layer = KVBFP8Linear(160, 4 * 64)
    layer.configure_heads(4, 32, 32)
    layer.set_dense_weight(torch.randn(256, 160))
    with torch.no_grad():
        first = layer.dense_weight(torch.float32)
        assert layer.dense_weight(torch.float32) is first  # reused
        layer.set_dense_weight(torch.randn(256, 160))
        second = layer.dense_weight(torch.float32)
    assert second is not first
    torch.testing.assert_close(second, layer.dequantized_weight(torch.float32))
    assert layer.dense_weight(torch.float32).requires_grad is False
    x = torch.randn(1, 4, 1, 32, requires_grad=True)
    layer(x, latent_attention=lambda q: q).sum().backward()  # with autograd: no cache, gradients flow
    assert x.grad is not None
