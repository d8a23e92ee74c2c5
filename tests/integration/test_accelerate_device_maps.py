"""Accelerate's own device maps (``device_map="auto" | "balanced" | "sequential"`` with ``max_memory`` and
``offload_folder``) on the FP8 checkpoints: CPU-only here, so a small ``"cpu"`` budget sends the rest to disk.

The load-time value checks must work on offloaded tensors (meta on the model, read from the shard by Accelerate's
hook): this used to fail with ``Tensor.item() cannot be called on meta tensors`` as soon as a router weight was
offloaded while its bias (a buffer) stayed resident. test_placement.py covers the plugin's own ``plan_device_map``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoTokenizer

import modeling_deepseekv3 as ds
from helpers import ROOT, input_ids, load
from modeling_deepseekv3.checkpoint import load as checkpoint_load
from modeling_deepseekv3.core.moe import TopkRouter
from modeling_deepseekv3.placement import placement_units

STRINGS = ("auto", "balanced", "sequential")
SHIPPED = ROOT / "models" / "shakespeare-deepseek-v3"


def offloaded(model) -> dict[str, list[str]]:
    """Names of the model's tensors that sit on the meta device (offloaded), split by kind."""
    names = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]
    return {
        "scales": [n for n in names if n.endswith("weight_scale_inv")],
        "router_weights": [n for n in names if n.endswith("mlp.gate.weight")],
        "router_biases": [n for n in names if n.endswith("e_score_correction_bias")],
        "all": names,
    }


def greedy(model, ids, n=12):
    return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False)


@pytest.fixture(scope="module")
def resident(tiny_fp8):
    return load(tiny_fp8)


@pytest.mark.parametrize("device_map", STRINGS)
def test_accelerate_strings_offload_and_match_the_resident_model(tiny_fp8, resident, device_map, tmp_path):
    """A budget of 40% of the weights: part stays in CPU RAM, the rest (router weights and FP8 scales among it)
    goes to disk; logits and greedy tokens are exactly the resident model's, in fp32."""
    budget = int(sum(placement_units(resident.config, torch.float32).values()) * 0.4)
    model = load(tiny_fp8, device_map=device_map, max_memory={"cpu": budget}, offload_folder=tmp_path / "offload")
    assert set(model.hf_device_map.values()) == {"cpu", "disk"}, model.hf_device_map
    meta = offloaded(model)
    # the case that failed: a router whose weight is offloaded while its bias (a buffer) stays resident
    routers = {n for n, m in model.named_modules() if isinstance(m, TopkRouter)}
    split = [
        r
        for r in routers
        if f"{r}.weight" in meta["router_weights"] and f"{r}.e_score_correction_bias" not in meta["all"]
    ]
    assert split and meta["scales"], meta
    assert model.model.layers[-1].mlp.experts[0].down_proj.weight.dtype == torch.float8_e4m3fn  # FP8 kept
    ids = input_ids(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, resident(ids).logits, rtol=0, atol=0)
    assert torch.equal(greedy(model, ids[:1]), greedy(resident, ids[:1]))


def test_everything_on_disk_buffers_too_generate_and_mtp(tiny_fp8, resident, tmp_path):
    """A budget nothing fits in (the whole model on disk) with ``offload_buffers=True`` (router biases offloaded
    too): the load checks read every offloaded scale and bias; plain and MTP-speculative generate match."""
    model = load(
        tiny_fp8, device_map="auto", max_memory={"cpu": "1KB"}, offload_folder=tmp_path / "off", offload_buffers=True
    )
    assert set(model.hf_device_map.values()) == {"disk"}
    meta = offloaded(model)
    assert meta["router_biases"] and meta["router_weights"] and meta["scales"]
    ids = input_ids(1, 8, seed=3)
    assert torch.equal(greedy(model, ids, 6), greedy(resident, ids, 6))
    assert torch.equal(
        model.generate(ids, max_new_tokens=6, do_sample=False, use_mtp=True),
        resident.generate(ids, max_new_tokens=6, do_sample=False, use_mtp=True),
    )


def corrupted(src: Path, dst: Path, name: str, value: float) -> Path:
    """A copy of checkpoint ``src`` with every element of tensor ``name`` set to ``value``."""
    shutil.copytree(src, dst)
    file = dst / json.loads((dst / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(file)
    tensors[name] = torch.full_like(tensors[name], value)
    save_file(tensors, file, metadata={"format": "pt"})
    return dst


def on_disk(path, tmp_path, **kwargs):
    return load(path, device_map="auto", max_memory={"cpu": "1KB"}, offload_folder=tmp_path / "off", **kwargs)


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("model.layers.3.mlp.experts.7.down_proj.weight_scale_inv", 0.0, "weight_scale_inv holds zero"),
        ("model.layers.2.self_attn.kv_b_proj.weight_scale_inv", float("inf"), "weight_scale_inv holds zero"),
        ("model.layers.2.mlp.gate.e_score_correction_bias", float("nan"), "e_score_correction_bias is not finite"),
    ],
)
def test_corrupt_offloaded_values_are_refused(tiny_fp8, tmp_path, name, value, message):
    """Offloaded tensors are checked as strictly as resident ones: the error names the tensor."""
    path = corrupted(tiny_fp8, tmp_path / "bad", name, value)
    with pytest.raises(ds.CheckpointError, match=message) as err:
        on_disk(path, tmp_path, offload_buffers=True)
    assert name.rsplit(".", 1)[0] in str(err.value)


def test_non_finite_offloaded_router_weight_is_warned(tiny_fp8, tmp_path, monkeypatch):
    path = corrupted(tiny_fp8, tmp_path / "bad", "model.layers.1.mlp.gate.weight", float("nan"))
    warned = []
    monkeypatch.setattr(checkpoint_load.logger, "warning", lambda msg, *args: warned.append(msg % args))
    model = on_disk(path, tmp_path)
    assert "model.layers.1.mlp.gate.weight" in offloaded(model)["router_weights"]
    assert any("non-finite values" in w and "model.layers.1.mlp.gate.weight" in w for w in warned), warned


def test_bad_arguments_get_clear_errors(tiny_fp8, tmp_path):
    """``dequantize_fp8`` cannot apply to weights left on disk (refused before it builds meta-weight layers);
    a mistyped map or budget is named by transformers / Accelerate."""
    with pytest.raises(ValueError, match=r"dequantize_fp8=True cannot dequantize the \d+ FP8 linears"):
        on_disk(tiny_fp8, tmp_path, dequantize_fp8=True)
    dense = load(tiny_fp8, device_map="auto", max_memory={"cpu": "1GB"}, dequantize_fp8=True)  # all resident: fine
    assert not dense.fp8_modules()
    with pytest.raises(ValueError, match=r"'auto', 'balanced'.*but found automatic"):
        load(tiny_fp8, device_map="automatic", max_memory={"cpu": "1KB"}, offload_folder=tmp_path / "off")
    with pytest.raises(ValueError, match="lots is not in a valid format"):
        load(tiny_fp8, device_map="auto", max_memory={"cpu": "lots"}, offload_folder=tmp_path / "off")


@pytest.mark.slow  # the shipped 19M-parameter model, loaded four times, generating from disk
def test_shipped_model_with_accelerate_strings(tmp_path):
    resident = load(SHIPPED)
    ids = AutoTokenizer.from_pretrained(SHIPPED)("Speak of the king.", return_tensors="pt").input_ids
    want = greedy(resident, ids, 10)
    budget = int(sum(placement_units(resident.config, torch.float32).values()) * 0.3)
    for device_map in STRINGS:
        model = load(SHIPPED, device_map=device_map, max_memory={"cpu": budget}, offload_folder=tmp_path / device_map)
        assert "disk" in model.hf_device_map.values() and offloaded(model)["router_weights"], device_map
        assert torch.equal(greedy(model, ids, 10), want), device_map
