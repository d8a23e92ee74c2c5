"""The model end to end: parity with transformers-native on the same weights, HF conventions, MTP, knobs."""

from __future__ import annotations

import pytest
import torch

import modeling_deepseekv3 as ds
from helpers import input_ids, load
from modeling_deepseekv3.checkpoint import checkpoint_layout
from modeling_deepseekv3.core.mtp import DeepseekV3MTPLayer
from modeling_deepseekv3.fp8 import FP8Linear


def test_state_dict_is_the_official_layout(tiny_fp8):
    model = load(tiny_fp8)
    layout = checkpoint_layout(model.config)
    sd = model.state_dict()
    assert list(sd) == list(layout)  # same names, in the official file order
    for key, spec in layout.items():
        assert tuple(sd[key].shape) == spec.shape, key
    # structural anchors (a rename must fail loudly)
    for anchor in [
        "model.layers.0.mlp.gate_proj.weight_scale_inv",
        "model.layers.1.self_attn.kv_a_proj_with_mqa.weight",
        "model.layers.1.mlp.experts.15.down_proj.weight_scale_inv",
        "model.layers.2.mlp.gate.e_score_correction_bias",
        "model.layers.3.eh_proj.weight",
        "model.layers.3.shared_head.head.weight",
    ]:
        assert anchor in sd


def test_fp8_stays_fp8_whatever_dtype(tiny_fp8):
    for dtype in (torch.float32, torch.bfloat16, "auto"):
        model = ds.DeepseekV3ForCausalLM.from_pretrained(tiny_fp8, dtype=dtype)
        fp8 = model.fp8_modules()
        assert len(fp8) > 100
        for module in fp8.values():
            assert module.weight.dtype == torch.float8_e4m3fn and not module.weight.requires_grad
            assert module.weight_scale_inv.dtype == torch.float32
        gate = model.model.layers[1].mlp.gate
        assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
        expected = torch.bfloat16 if dtype == "auto" else dtype
        assert model.model.embed_tokens.weight.dtype == expected


def test_load_is_zero_copy_for_fp8_weights(tiny_fp8):
    """FP8 parameters are views into the mmapped shards (nothing copied at load)."""
    from safetensors import safe_open

    model = load(tiny_fp8, dtype=torch.bfloat16)
    w = model.model.layers[1].mlp.experts[3].up_proj.weight
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    index = __import__("json").loads((tiny_fp8 / "model.safetensors.index.json").read_text())
    with safe_open(str(tiny_fp8 / index["weight_map"][key]), "pt") as f:
        assert torch.equal(f.get_tensor(key).view(torch.uint8), w.view(torch.uint8))
    maps = open("/proc/self/maps").read()
    addr = w.untyped_storage().data_ptr()
    in_file = any(
        int(line.split()[0].split("-")[0], 16) <= addr < int(line.split()[0].split("-")[1], 16)
        for line in maps.splitlines()
        if index["weight_map"][key] in line
    )
    assert in_file


def test_mtp_layer_loaded_into_its_own_module_and_not_run(tiny_fp8):
    model = load(tiny_fp8)
    n = model.config.num_hidden_layers
    assert len(model.model.layers) == n + 1 and isinstance(model.model.layers[n], DeepseekV3MTPLayer)
    assert len(model.model.mtp_layers) == 1
    torch.testing.assert_close(model.model.layers[n].embed_tokens.weight, model.model.embed_tokens.weight)
    calls = []
    model.model.layers[n].register_forward_hook(lambda *a: calls.append(1))
    ids = input_ids()
    with torch.no_grad():
        out = model(ids, output_hidden_states=True)
    assert not calls and len(out.hidden_states) == n + 1
    skipped = load(tiny_fp8, load_mtp=False)
    assert len(skipped.model.layers) == n and not any(".layers.3." in k for k in skipped.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(skipped(ids).logits, out.logits, rtol=0, atol=0)
        # the MTP module predicts t_{i+2} from (t_{i+1}, h_i)
        cos_sin = model.model.rotary_emb(torch.arange(ids.shape[1] - 1)[None])
        _, logits = model.model.layers[n](ids[:, 1:], out.hidden_states[-1][:, :-1], cos_sin)
    assert logits.shape == (2, ids.shape[1] - 1, model.config.vocab_size) and torch.isfinite(logits).all()


def test_checkpoint_without_mtp_loads_without_it(tiny_bf16_direct_q, tmp_path):
    import json
    import shutil

    path = tmp_path / "ckpt"
    shutil.copytree(tiny_bf16_direct_q, path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_nextn_predict_layers"] = 1  # config announces MTP, shards do not hold it
    (path / "config.json").write_text(json.dumps(cfg))
    model = load(path)
    assert len(model.model.layers) == model.config.num_hidden_layers and model.config.load_mtp is False
    with pytest.raises(ds.CheckpointError, match="load_mtp=False"):
        load(path, load_mtp=True)


def test_dequantize_fp8_knob(tiny_fp8):
    fp8 = load(tiny_fp8)
    dense = load(tiny_fp8, dequantize_fp8=True)
    assert not dense.fp8_modules() and not dense.config.is_fp8
    assert isinstance(dense.model.layers[1].self_attn.kv_b_proj, torch.nn.Linear)
    assert dense.model.layers[1].self_attn.kv_b_proj.weight.dtype == torch.float32
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(dense(ids).logits, fp8(ids).logits, rtol=1e-5, atol=1e-5)


def test_cached_decoding_equals_full_forward(tiny_fp8):
    model = load(tiny_fp8)
    ids = input_ids(batch=2, seq=14)
    with torch.no_grad():
        full = model(ids, use_cache=False).logits
        out = model(ids[:, :9], use_cache=True)
        steps = [out.logits]
        cache = out.cache
        for t in range(9, 14):
            out = model(ids[:, t : t + 1], cache=cache, use_cache=True)
            cache = out.cache
            steps.append(out.logits)
        chunked = model(ids[:, :5], use_cache=True)
        rest = model(ids[:, 5:], cache=chunked.cache, use_cache=True)  # multi-token chunk on a cache
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(torch.cat((chunked.logits, rest.logits), 1), full, rtol=1e-4, atol=1e-4)


def test_generate_with_cache_equals_without(tiny_fp8):
    model = load(tiny_fp8)
    ids = input_ids(batch=1, seq=6)
    a = model.generate(ids, max_new_tokens=12, do_sample=False)
    b = model.generate(ids, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(a, b)


def test_past_key_values_keyword_still_works(tiny_fp8):
    model = load(tiny_fp8)
    ids = input_ids(batch=1, seq=7)
    with torch.no_grad():
        first = model(ids[:, :6], use_cache=True)
        with pytest.warns(Warning):
            old = model(ids[:, 6:], past_key_values=first.cache, use_cache=True).logits
        first = model(ids[:, :6], use_cache=True)
        new = model(ids[:, 6:], cache=first.cache, use_cache=True).logits
    torch.testing.assert_close(old, new)


def test_labels_loss_logits_to_keep_hidden_states(tiny_fp8):
    model = load(tiny_fp8)
    ids = input_ids(batch=2, seq=10)
    out = model(ids, labels=ids, output_hidden_states=True)
    ref = torch.nn.functional.cross_entropy(
        out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
    # eval mode (from_pretrained's default): the loss is the plain LM loss although the MTP layer is loaded
    assert not model.training and out.mtp_loss is not None and out.aux_loss is None
    torch.testing.assert_close(out.loss, ref)
    assert len(out.hidden_states) == model.config.num_hidden_layers + 1
    last = model(ids, logits_to_keep=1).logits
    assert last.shape == (2, 1, model.config.vocab_size)
    torch.testing.assert_close(last[:, 0], out.logits[:, -1])
    assert len(model(ids, output_attentions=True).attentions) == model.config.num_hidden_layers
    with pytest.raises(ValueError, match="exactly one"):
        model()


def test_gradient_checkpointing_gives_the_same_gradients(tiny_bf16_direct_q):
    ids = input_ids(batch=2, seq=8)
    grads = []
    for checkpointing in (False, True):
        model = load(tiny_bf16_direct_q)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable()
        model(ids, labels=ids, use_cache=True).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 20
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], rtol=1e-4, atol=1e-6)


def test_fp8_model_trains_without_touching_fp8_weights(tiny_fp8):
    model = load(tiny_fp8)
    model.train()
    ids = input_ids(batch=1, seq=8)
    model(ids, labels=ids).loss.backward()
    for module in model.fp8_modules().values():
        assert module.weight.grad is None and module.weight_scale_inv.grad is None
    assert model.model.embed_tokens.weight.grad is not None


def test_random_init_from_config(tiny_config):
    import copy

    cfg = copy.deepcopy(tiny_config)
    cfg.fp8_quantization_config = {
        "quant_method": "fp8",
        "fmt": "e4m3",
        "weight_block_size": [128, 128],
        "activation_scheme": "dynamic",
    }
    model = ds.DeepseekV3ForCausalLM(cfg)
    lin = model.model.layers[1].self_attn.kv_a_proj_with_mqa
    assert isinstance(lin, FP8Linear) and torch.isfinite(lin.dequantized_weight()).all()
    assert lin.dequantized_weight().std() == pytest.approx(cfg.initializer_range, rel=0.2)
    logits = model(input_ids()).logits
    assert torch.isfinite(logits).all()


def test_nothing_for_hub_kernels_to_swap(tiny_fp8, monkeypatch):
    """transformers 5.25 kernelizes every model at ``from_pretrained`` when ``kernels`` is installed; on CUDA it
    downloaded ``kernels-community/activation`` for transformers' SiLU module (failing offline: seen on an H200).
    The core uses torch's own activation modules, so no module carries a Hub-kernel name and an offline load
    with ``use_kernels=True`` succeeds with the numerics unchanged."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = load(tiny_fp8, use_kernels=True)
    assert [n for n, m in model.named_modules() if getattr(m, "kernel_layer_name", None)] == []
    ids = input_ids()
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, load(tiny_fp8)(ids).logits, rtol=0, atol=0)
