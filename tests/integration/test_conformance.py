"""What transformers' own model test suite expects of a model, item by item (our tests; facts carried over from
running its ModelTesterMixin suites against our classes, see benchmarks/conformance.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import modeling_deepseekv3 as ds
from helpers import input_ids, load
from modeling_deepseekv3.checkpoint import TINY_CONFIG


def grads_of(model, ids) -> dict[str, torch.Tensor]:
    model.train()
    model.zero_grad(set_to_none=True)
    model(ids, labels=ids).loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.slow  # whole-model backward passes, with and without checkpointing
@pytest.mark.parametrize("reentrant", [False, True], ids=["non_reentrant", "reentrant"])
def test_checkpointing_gives_every_gradient(tiny_bf16_direct_q, reentrant):
    """Every parameter, routed experts included, gets the gradient it gets without checkpointing (the
    reentrant first pass runs without grad, which the grouped-expert path used to treat as inference and
    re-home the expert parameters, so their gradients went to objects nobody held). The balance loss needs
    router gradients, which reentrant checkpointing cannot give: it is refused there (below)."""
    ids = input_ids(2, 32)
    model = load(tiny_bf16_direct_q, balance_loss_alpha=0.0 if reentrant else 1e-4)
    before = {n: id(p) for n, p in model.named_parameters()}
    with torch.no_grad():
        model.eval()(ids)  # an inference call first: dense experts get stacked for grouped matmuls
    assert model.model.layers[1].mlp.experts._stack is not None
    assert {n: id(p) for n, p in model.named_parameters()} == before  # same parameter objects
    reference = grads_of(model, ids)
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    checkpointed = grads_of(model, ids)
    assert reference.keys() == checkpointed.keys()
    assert sum(".mlp.experts." in n for n in reference) > 0.8 * 2 * 16 * 3  # routed experts that got tokens
    for name in reference:
        err = (checkpointed[name] - reference[name]).norm() / reference[name].norm().clamp(min=1e-12)
        assert err < 1e-5, (name, err.item())


def test_reentrant_checkpointing_refuses_a_balance_loss_it_cannot_train(tiny_bf16_direct_q):
    model = load(tiny_bf16_direct_q).train()
    model.activation_checkpointing_enable({"use_reentrant": True})
    ids = input_ids(2, 8)
    with pytest.raises(ValueError, match="use_reentrant"):
        model(ids, labels=ids)
    for module in model.modules():  # frozen routers (LoRA): the balance term is only reported
        if isinstance(module, ds.core.moe.TopkRouter):
            module.weight.requires_grad_(False)
    assert model(ids, labels=ids).aux_loss is not None


def test_packed_batch_equals_the_sequences_one_by_one(tiny_fp8):
    """Padding-free batches: restarts in position_ids (or cu_seq_lens_q, as TRL passes them) keep packed
    sequences apart; logits and losses equal those of each sequence alone."""
    model = load(tiny_fp8)
    seqs = [input_ids(1, n, seed=n) for n in (7, 5, 9)]
    packed = torch.cat(seqs, 1)
    position_ids = torch.cat([torch.arange(s.shape[1]) for s in seqs])[None]
    with torch.no_grad():
        alone = torch.cat([model(s).logits for s in seqs], 1)
        by_positions = model(packed, position_ids=position_ids).logits
        cu = torch.tensor([0, 7, 12, 21], dtype=torch.int32)
        by_cu = model(
            packed, position_ids=position_ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9
        ).logits
        unpacked = model(packed).logits  # without the boundaries the later sequences attend across
    torch.testing.assert_close(by_positions, alone, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(by_cu, alone, rtol=1e-4, atol=1e-4)
    assert (unpacked[:, 7:] - alone[:, 7:]).abs().max() > 1e-2
    # the losses (LM and MTP) of the packed batch are those of the sequences, boundary tokens excluded
    labels = packed.clone()
    labels[position_ids == 0] = -100  # what TRL's padding-free collator does
    with torch.no_grad():
        out = model(packed, position_ids=position_ids, labels=labels)
        lm = sum(F.cross_entropy(model(s).logits[0, :-1], s[0, 1:], reduction="sum") for s in seqs) / (21 - 3)
    torch.testing.assert_close(out.lm_loss, lm)
    with torch.no_grad():
        mtp_alone = [model(s, labels=s).mtp_loss for s in seqs]  # per-sequence means of n - 2 targets each
    expected = sum(m * (s.shape[1] - 2) for m, s in zip(mtp_alone, seqs)) / sum(s.shape[1] - 2 for s in seqs)
    torch.testing.assert_close(out.mtp_loss, expected, rtol=1e-4, atol=1e-4)


def test_output_loading_info(tiny_fp8):
    model, info = ds.DeepseekV3ForCausalLM.from_pretrained(tiny_fp8, dtype=torch.float32, output_loading_info=True)
    assert (
        isinstance(model, ds.DeepseekV3ForCausalLM)
        and not model.fp8_modules()["model.layers.1.self_attn.o_proj"].weight.requires_grad
    )
    assert info["missing_keys"] == set() or not info["missing_keys"]


def test_from_pretrained_with_a_state_dict_and_no_path(tiny_fp8):
    source = load(tiny_fp8)
    model = ds.DeepseekV3ForCausalLM.from_pretrained(None, config=source.config, state_dict=source.state_dict())
    ids = input_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(model.float()(ids).logits, source(ids).logits)


def test_return_dict_false(tiny_fp8):
    causal = load(tiny_fp8)
    base = causal.model
    ids = input_ids(1, 5)
    with torch.no_grad():
        out = base(ids, return_dict=False)
        ref = base(ids)
        assert isinstance(out, tuple) and torch.equal(out[0], ref.last_hidden_state)
        lm = causal(ids, return_dict=False)
        assert isinstance(lm, tuple) and torch.equal(lm[0], causal(ids).logits)


@pytest.mark.slow  # torch.compile of whole models, fp32 and bf16
def test_compile_in_fp32_and_bf16(tmp_path):
    """torch.compile on CPU: fp32 takes the plain expert path (inductor's CPU grouped_mm is BF16-only). Every
    expert is routed to (top-16 of 16), so BF16 rounding differences cannot flip routing."""
    path = ds.make_tiny_checkpoint(
        tmp_path / "ckpt", fp8=False, mtp=False, overrides={"num_experts_per_tok": 16, "topk_group": 4}
    )
    for dtype in (torch.float32, torch.bfloat16):
        model = load(path, dtype=dtype)
        ids = input_ids(1, 6)
        with torch.no_grad():
            eager = model(ids, use_cache=False).logits
            compiled = torch.compile(model, backend="inductor")(ids, use_cache=False).logits
        if dtype == torch.float32:
            torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-4)
        else:  # inductor keeps fused intermediates in fp32: BF16 rounding differs a little
            assert ((compiled.float() - eager.float()).norm() / eager.float().norm()) < 2e-2


def test_eager_attention_and_output_attentions(tiny_fp8):
    """attn_implementation="eager" runs the explicit softmax (and equals SDPA); output_attentions returns the
    probabilities of every layer, by keyword or by config, rows summing to one, causal."""
    sdpa = load(tiny_fp8)
    eager = load(tiny_fp8, attn_implementation="eager")
    assert eager.config._attn_implementation == "eager"
    ids = input_ids(2, 9)
    with torch.no_grad():
        a = eager(ids, output_attentions=True)
        b = sdpa(ids)
    torch.testing.assert_close(a.logits, b.logits, rtol=1e-4, atol=1e-4)
    assert len(a.attentions) == 3 and a.attentions[0].shape == (2, 4, 9, 9)
    probs = a.attentions[1]
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, 9))
    assert probs.triu(1).abs().max() == 0
    with torch.no_grad():
        c = sdpa(ids, output_attentions=True)  # by keyword the SDPA model runs the eager path for this call
    torch.testing.assert_close(c.attentions[2], a.attentions[2], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="eager"):  # transformers refuses the config flag with SDPA...
        sdpa.config.output_attentions = True
    eager.config.output_attentions = True  # ...and honours it with eager
    with torch.no_grad():
        assert len(eager(ids).attentions) == 3
    eager.config.output_attentions = False
    with torch.no_grad():
        assert sdpa(ids).attentions is None
        out = sdpa.generate(
            ids, max_new_tokens=3, do_sample=False, output_attentions=True, return_dict_in_generate=True
        )
    assert len(out.attentions) == 3 and out.attentions[-1][0].shape[-1] == 11  # one per step, over the cache


def test_unsupported_rope_type_is_an_error_not_a_no_op():
    config = ds.DeepseekV3Config(**TINY_CONFIG)
    config.rope_scaling = {"type": "longrope", "factor": 2.0}
    with pytest.raises(ValueError, match=r"rope_scaling\.type"):
        ds.DeepseekV3ForCausalLM(config)
    with pytest.raises(ValueError, match=r"rope_scaling\.factor"):
        ds.DeepseekV3Config(**{**TINY_CONFIG, "rope_scaling": {"type": "linear", "factor": 0.5}})


def _rope_variant(rope_scaling):
    config = ds.DeepseekV3Config(**{**TINY_CONFIG, "rope_scaling": rope_scaling, "max_position_embeddings": 16})
    torch.manual_seed(0)
    return ds.DeepseekV3ForCausalLM(config).eval()


def test_linear_and_dynamic_rope_scaling_work():
    """transformers' linear and dynamic (NTK) rope types: linear interpolates every position (position p
    rotates as p / factor does unscaled); dynamic leaves inputs within max_position_embeddings alone and changes
    longer ones; both survive a save/reload of the config."""
    from modeling_deepseekv3.core.rope import RotaryEmbedding

    base = _rope_variant(None)
    linear, dynamic = (
        _rope_variant({"type": "linear", "factor": 2.0}),
        _rope_variant({"type": "dynamic", "factor": 2.0}),
    )
    linear.load_state_dict(base.state_dict())
    dynamic.load_state_dict(base.state_dict())
    pos = torch.arange(24)[None]
    cos_l, sin_l = RotaryEmbedding(linear.config)(pos)
    cos_b, sin_b = RotaryEmbedding(base.config)(pos[:, ::2] // 2 * 1.0)  # positions 0, 1, ... at half speed
    torch.testing.assert_close(cos_l[:, ::2], cos_b)
    torch.testing.assert_close(sin_l[:, ::2], sin_b)
    short, long = torch.randint(3, 500, (1, 10)), torch.randint(3, 500, (1, 24))
    with torch.no_grad():
        torch.testing.assert_close(dynamic(short).logits, base(short).logits)
        assert not torch.allclose(dynamic(long).logits, base(long).logits, atol=1e-4)
        assert not torch.allclose(linear(short).logits, base(short).logits, atol=1e-4)
    assert ds.DeepseekV3Config.from_dict(linear.config.to_dict()).rope_parameters["rope_type"] == "linear"


def test_causal_lm_from_a_base_model_checkpoint(tiny_bf16_direct_q, tmp_path, caplog):
    """A checkpoint saved from DeepseekV3Model lacks lm_head: loaded into the causal-LM class the head is
    initialized (and reported), as transformers does, while truly missing weights still fail loudly."""
    base = ds.DeepseekV3Model.from_pretrained(tiny_bf16_direct_q, dtype=torch.float32)
    base.save_pretrained(tmp_path / "base")
    model, info = ds.DeepseekV3ForCausalLM.from_pretrained(
        tmp_path / "base", dtype=torch.float32, output_loading_info=True
    )
    assert "lm_head.weight" in info["missing_keys"]
    assert torch.isfinite(model.lm_head.weight).all() and model.lm_head.weight.std() > 0
    torch.testing.assert_close(model.model.embed_tokens.weight, base.embed_tokens.weight)
    import safetensors.torch

    shard = next((tmp_path / "base").glob("*.safetensors"))
    tensors = safetensors.torch.load_file(shard)
    tensors.pop("norm.weight")
    safetensors.torch.save_file(tensors, shard, metadata={"format": "pt"})
    with pytest.raises(ds.CheckpointError, match=r"norm\.weight"):
        ds.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "base", dtype=torch.float32)


def test_cache_layers_expose_the_latent_as_keys(tiny_fp8):
    model = load(tiny_fp8)
    ids = input_ids(2, 6)
    with torch.no_grad():
        cache = model(ids, use_cache=True).cache
    layer = cache.layers[0]
    cfg = model.config
    assert layer.keys.shape == (2, 1, 6, cfg.kv_lora_rank + cfg.qk_rope_head_dim)
    assert layer.values.shape == (2, 1, 6, 0)
    assert torch.equal(layer.keys[:, 0], layer.latent)
    with pytest.raises(AttributeError, match="update"):
        layer.keys = torch.zeros(1)


def test_base_model_save_and_reload_keeps_the_mtp_layer(tmp_path):
    """DeepseekV3Model saves its MTP layer as layers.N.* (no model. prefix); reloading it must find it there, not
    decide the checkpoint has none and drop it."""
    config = ds.DeepseekV3Config(**TINY_CONFIG)
    model = ds.DeepseekV3Model(config)
    assert any(k.startswith(f"layers.{config.num_hidden_layers}.") for k in model.state_dict())
    model.save_pretrained(tmp_path)
    reloaded = ds.DeepseekV3Model.from_pretrained(tmp_path, dtype=torch.float32)
    assert reloaded.state_dict().keys() == model.state_dict().keys()
    for name, tensor in model.state_dict().items():
        torch.testing.assert_close(reloaded.state_dict()[name].float(), tensor.float(), msg=name)


def test_tensor_parallel_plan_shards_head_with_embedding():
    """transformers adds the vocabulary-sharded embedding to any TP plan; the (tieable) head must be in it too."""
    plan = ds.DeepseekV3ForCausalLM(ds.DeepseekV3Config(**TINY_CONFIG)).tp_plan
    assert "model.embed_tokens" in plan and plan["lm_head"] == "colwise_gather_output"
    assert ds.DeepseekV3ForCausalLM._supports_attention_backend  # packed batches: see the packed-batch test


ROOT = Path(__file__).resolve().parents[2]
OPT_IN = os.environ.get("DSV3_CONFORMANCE") or os.environ.get("DSV3_CONFORMANCE_TESTS_DIR")


@pytest.mark.conformance
@pytest.mark.skipif(
    not OPT_IN,
    reason="opt-in: DSV3_CONFORMANCE=1 (fetches transformers' tests) or "
    "DSV3_CONFORMANCE_TESTS_DIR=<transformers checkout>",
)
def test_transformers_model_suite(tmp_path):
    """transformers' own DeepSeek-V3 model tests: ours passes every test the native classes pass, except those
    benchmarks/conformance.py lists as assuming transformers' internals (or needing a head we do not have)."""
    out = tmp_path / "conformance.json"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "conformance.py"), "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=4 * 3600,
    )
    if proc.returncode == 2:
        pytest.skip("transformers' tests unavailable: " + " ".join(proc.stderr.split())[:300])
    assert out.exists(), proc.stderr[-3000:]
    result = json.loads(out.read_text())
    assert result["counts"]["native"]["passed"] > 50, result["counts"]  # the suite really ran
    unlisted = [f"{d['test']}: {d['ours']}: {d['reason']}" for d in result["native_passes_ours_not"] if not d["listed"]]
    assert not unlisted, "\n".join(unlisted)
    assert proc.returncode == 0, proc.stdout[-3000:]
