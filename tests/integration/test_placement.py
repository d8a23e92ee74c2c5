"""Expert-granular placement: the planner on the real 671B config, offload to disk/CPU with FP8 kept,
device_map="auto" splitting MoE layers, and (with CUDA) experts computing where they are placed."""

from __future__ import annotations

import itertools
import json
import re

import pytest
import torch

import modeling_deepseekv3 as ds
from helpers import ROOT, input_ids, load
from modeling_deepseekv3.cli import main as cli
from modeling_deepseekv3.placement import placement_units, plan_placement

HUB = ROOT / "hub_config"
EXPERT = re.compile(r"\.mlp\.experts\.\d+$")


@pytest.fixture(scope="module")
def v3_meta():
    from transformers.initialization import no_init_weights

    config = ds.DeepseekV3Config.from_dict(json.loads((HUB / "deepseek-v3" / "config.json").read_text()))
    with torch.device("meta"), no_init_weights():
        model = ds.DeepseekV3ForCausalLM(config)
    return config, model


def owners(name: str, device_map: dict) -> list[str]:
    """Map entries that cover parameter ``name`` (the entry itself or any of its parent modules)."""
    parts = name.split(".")
    return [p for p in (".".join(parts[:i]) for i in range(1, len(parts) + 1)) if p in device_map]


BUDGETS = {
    "8x80GB": {**{i: "80GB" for i in range(8)}, "cpu": "200GB"},
    "8x141GB": {i: "141GB" for i in range(8)},
    "4x141GB+1.5TB cpu": {**{i: "141GB" for i in range(4)}, "cpu": "1.5TB"},
    "cpu+disk": {"cpu": "400GiB", "disk": "2TiB"},
}


@pytest.mark.parametrize("budget", list(BUDGETS), ids=list(BUDGETS))
@pytest.mark.parametrize("strategy", ["experts", "layers", "cpu-experts"])
def test_plan_for_the_real_671b_model(v3_meta, budget, strategy):
    config, model = v3_meta
    plan = plan_placement(config, BUDGETS[budget], strategy=strategy, context_tokens=16384)
    if strategy == "cpu-experts" and budget in ("8x80GB", "8x141GB"):
        # ~620 GB of routed experts cannot live in 200 GB of CPU RAM (or none): the report must say so
        assert not plan.fits and "DOES NOT FIT" in plan.report()
        return
    assert plan.fits, plan.report()
    device_map = plan.device_map
    # every parameter placed exactly once; every map entry is a real module
    for name, _ in model.named_parameters():
        assert len(owners(name, device_map)) == 1, name
    modules = dict(model.named_modules())
    assert all(unit in modules for unit in device_map)
    # no entry is a parent of another (flat map)
    units = sorted(device_map)
    assert not any(b.startswith(a + ".") for a, b in itertools.pairwise(units))
    # budgets hold (weights + latent cache), FP8 counted as 1 byte + scales
    for dev, limit in plan.budget.items():
        assert plan.weights[dev] + plan.cache[dev] <= limit
    total = sum(placement_units(config).values())
    assert 640 * 2**30 < total < 700 * 2**30  # 671B params, FP8 with BF16 embeddings: ~0.65 TB
    if strategy == "experts" and budget == "8x141GB":
        per_gpu = {}
        for unit, dev in device_map.items():
            if EXPERT.search(unit):
                per_gpu[dev] = per_gpu.get(dev, 0) + 1
        assert set(per_gpu) == set(range(8)) and max(per_gpu.values()) - min(per_gpu.values()) < 100
    if strategy == "cpu-experts":  # routed experts in CPU RAM, overflow (only) to disk
        assert {dev for unit, dev in device_map.items() if EXPERT.search(unit)} <= {"cpu", "disk"}
        assert (
            not any(dev in ("cpu", "disk") for unit, dev in device_map.items() if not EXPERT.search(unit))
            or budget == "cpu+disk"
        )


def test_report_says_when_it_does_not_fit(capsys):
    plan = plan_placement(HUB / "deepseek-v3", {0: "80GB", "cpu": "100GB"})
    assert not plan.fits and "DOES NOT FIT" in plan.report() and "add 'disk'" in plan.report()
    with pytest.raises(ValueError, match="does not fit"):
        ds.plan_device_map(HUB / "deepseek-v3", {0: "80GB", "cpu": "100GB"})
    assert cli(["plan", str(HUB / "deepseek-v3"), "--gpus", "8x141GB", "--context", "32768"]) == 0
    assert "FITS." in capsys.readouterr().out
    assert cli(["plan", str(HUB / "deepseek-v3"), "--gpus", "2x80GB"]) == 1


def test_latent_cache_budget_is_charged():
    base = plan_placement(HUB / "deepseek-v3", {i: "141GB" for i in range(8)})
    long = plan_placement(HUB / "deepseek-v3", {i: "141GB" for i in range(8)}, context_tokens=131072, batch_size=4)
    assert sum(base.cache.values()) == 0
    assert sum(long.cache.values()) == 131072 * 4 * 1152 * 62  # 61 layers + MTP, BF16 latent


def split_experts_map(model, placement):
    """A flat map: every leaf unit on cpu except the given experts."""
    device_map = {}
    for unit in placement_units(model.config, torch.float32):
        device_map[unit] = placement.get(unit, "cpu")
    return device_map


def test_half_the_experts_on_disk_fp8_kept(tiny_fp8, tmp_path):
    reference = load(tiny_fp8)
    config = reference.config
    on_disk = {
        f"model.layers.{layer}.mlp.experts.{e}": "disk"
        for layer in range(config.first_k_dense_replace, config.num_hidden_layers + config.num_mtp_modules)
        for e in range(0, config.n_routed_experts, 2)
    }
    device_map = split_experts_map(reference, on_disk)
    model = load(tiny_fp8, device_map=device_map)
    expert = model.model.layers[1].mlp.experts[0]
    assert expert.up_proj.weight.device.type == "meta"  # offloaded: materialized only inside its forward
    hook = expert.up_proj._hf_hook
    assert hook.offload and hook.weights_map["weight"].dtype == torch.float8_e4m3fn
    assert hook.weights_map.dataset.index["model.layers.1.mlp.experts.0.up_proj.weight"]["safetensors_file"].startswith(
        str(tiny_fp8)
    )
    assert model.model.layers[1].mlp.experts[1].up_proj.weight.dtype == torch.float8_e4m3fn
    ids = input_ids(2, 10)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)
    a = model.generate(ids[:1], max_new_tokens=10, min_new_tokens=10, do_sample=False)
    b = reference.generate(ids[:1], max_new_tokens=10, min_new_tokens=10, do_sample=False)
    assert torch.equal(a, b)
    assert not list(tmp_path.iterdir())  # nothing re-saved to an offload folder


def test_planner_map_loads_cpu_plus_disk(tiny_fp8):
    reference = load(tiny_fp8)
    units = placement_units(reference.config, torch.float32)
    budget = int(sum(units.values()) * 0.6)
    device_map = ds.plan_device_map(tiny_fp8, {"cpu": budget, "disk": "1GiB"}, dtype=torch.float32)
    assert "disk" in device_map.values() and "cpu" in device_map.values()
    model = load(tiny_fp8, device_map=device_map)
    ids = input_ids(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


def test_device_map_auto_splits_moe_layers_by_expert(tiny_fp8):
    reference = load(tiny_fp8)
    units = placement_units(reference.config, torch.float32)
    model = load(tiny_fp8, device_map="auto", max_memory={"cpu": int(sum(units.values()) * 0.7)})
    expert_entries = [k for k in model.hf_device_map if EXPERT.search(k)]
    assert expert_entries and set(model.hf_device_map.values()) == {"cpu", "disk"}
    ids = input_ids(1, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, reference(ids).logits, rtol=0, atol=0)


# ------------------------------------------------------------------------------------------- CUDA


@pytest.mark.gpu
def test_cpu_experts_compute_on_cpu_with_gpu_attention(tiny_fp8):
    reference = load(tiny_fp8)
    device_map = ds.plan_device_map(tiny_fp8, {0: "10GiB", "cpu": "10GiB"}, strategy="cpu-experts", dtype=torch.float32)
    model = load(tiny_fp8, device_map=device_map, fp8_compute="dequant")  # weight-only, as the CPU reference
    expert = model.model.layers[1].mlp.experts[0]
    assert expert.up_proj.weight.device.type == "cpu" and expert.up_proj.weight.dtype == torch.float8_e4m3fn
    assert expert._hf_hook.execution_device == torch.device("cpu")
    assert model.model.layers[1].self_attn.kv_b_proj.weight.device.type == "cuda"
    ids = input_ids(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids.cuda()).logits.cpu(), reference(ids).logits, rtol=1e-3, atol=1e-3)


@pytest.mark.gpu
def test_experts_compute_on_their_own_gpu(tiny_fp8):
    reference = load(tiny_fp8)
    gpus = {i: "10GiB" for i in range(torch.cuda.device_count())}
    device_map = ds.plan_device_map(tiny_fp8, gpus, strategy="experts", dtype=torch.float32)
    model = load(tiny_fp8, device_map=device_map, fp8_compute="dequant")  # weight-only, as the CPU reference
    for unit, dev in device_map.items():
        if EXPERT.search(unit):
            assert model.get_submodule(unit).up_proj.weight.device == torch.device("cuda", dev)
    ids = input_ids(1, 8)
    with torch.no_grad():
        torch.testing.assert_close(model(ids.cuda()).logits.cpu(), reference(ids).logits, rtol=1e-3, atol=1e-3)


def test_plan_report_units_headroom_and_advice():
    """One unit family (GiB, MiB below one GiB), the GPU headroom stated, and no advice to convert to FP8 a
    checkpoint that is FP8 already."""
    plan = ds.plan_placement(HUB / "deepseek-v3", {0: "80GiB", 1: "80GiB"}, strategy="experts")
    report = plan.report()
    assert not plan.fits and " G " not in report and "GiB" in report
    assert "less 5% kept free for activations" in report
    assert "keep the checkpoint in FP8" not in report  # hub_config/deepseek-v3 is the FP8 release
    small = ds.plan_placement(ROOT / "models" / "shakespeare-deepseek-v3", {"cpu": "1GiB"}).report()
    assert "MiB" in small and "0.0 G" not in small and "kept free" not in small  # no GPU, no headroom line
