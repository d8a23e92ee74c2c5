"""``LoraConfig(target_modules="all-linear")`` on FP8 models: the same targets as on the BF16 export (attention,
dense MLPs, shared and routed experts, the MTP block's projections), both output heads left alone, training only
the adapters, and the same LoRA outputs as a dense model holding the same weights.

PEFT resolves "all-linear" in a private function; the patch wraps it (``integrations/peft_hook.py``), and
:func:`test_the_patched_peft_seam_is_still_there` fails, naming the PEFT version, when PEFT moves it."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest
import torch
from torch import nn

from helpers import ROOT, input_ids, load

pytest.importorskip("peft")
import peft
from peft import LoHaConfig, LoraConfig, get_peft_model
from peft.tuners import tuners_utils
from peft.tuners.lora import LoraLayer

import modeling_deepseekv3 as ds
from modeling_deepseekv3.fp8 import FP8Linear, block_dequantize
from modeling_deepseekv3.integrations.peft import FP8LoraLinear
from modeling_deepseekv3.integrations.peft_hook import ALL_LINEAR_RESOLVER

PREFIX = "base_model.model."


def all_linear(r: int = 4) -> LoraConfig:
    return LoraConfig(r=r, lora_alpha=2 * r, target_modules="all-linear")


def wrapped(peft_model) -> set[str]:
    """Names (in the base model) of the modules that carry LoRA."""
    return {n.removeprefix(PREFIX) for n, m in peft_model.named_modules() if isinstance(m, LoraLayer)}


def heads(model) -> set[str]:
    """Both output heads: ``lm_head`` and each MTP layer's ``shared_head.head``."""
    return {"lm_head"} | {n for n, _ in model.named_modules() if n.endswith("shared_head.head")}


@pytest.fixture(scope="module")
def bf16_export(tiny_fp8, tmp_path_factory):
    return ds.convert_checkpoint(tiny_fp8, tmp_path_factory.mktemp("export") / "bf16", to="bf16", progress=False)


def test_all_linear_wraps_the_same_modules_on_fp8_and_on_the_bf16_export(tiny_fp8, bf16_export):
    fp8_model, bf16_model = load(tiny_fp8), load(bf16_export)
    config = fp8_model.config
    # what a BF16 model has as linears, read from the FP8 model itself: every FP8Linear and nn.Linear but the heads
    expected = {n for n, m in fp8_model.named_modules() if isinstance(m, (FP8Linear, nn.Linear))} - heads(fp8_model)
    fp8_names = {n for n, m in fp8_model.named_modules() if isinstance(m, FP8Linear)}
    fp8_peft = get_peft_model(fp8_model, all_linear())  # wraps in place
    on_fp8 = wrapped(fp8_peft)
    on_bf16 = wrapped(get_peft_model(bf16_model, all_linear()))
    assert on_fp8 and on_fp8 == on_bf16 == expected, sorted(on_fp8 ^ on_bf16)[:10]
    assert not on_fp8 & heads(fp8_model)
    mtp = config.num_hidden_layers  # the MTP layer's index
    moe_layers = config.num_hidden_layers + config.num_mtp_modules - config.first_k_dense_replace
    routed = {n for n in on_fp8 if ".mlp.experts." in n}
    assert len(routed) == moe_layers * config.n_routed_experts * 3
    for layer in range(mtp + 1):
        assert {f"model.layers.{layer}.self_attn.{p}" for p in ("q_a_proj", "kv_b_proj", "o_proj")} <= on_fp8
    assert {"model.layers.0.mlp.down_proj", f"model.layers.{mtp}.eh_proj"} <= on_fp8
    assert "model.layers.1.mlp.shared_experts.up_proj" in on_fp8
    # every FP8 projection carries the FP8 LoRA layer (the dispatcher), the dense ones PEFT's own
    assert fp8_names and fp8_names <= on_fp8
    assert all(isinstance(fp8_peft.get_submodule(PREFIX + n), FP8LoraLinear) for n in fp8_names)
    # a second adapter with "all-linear": the same modules, nothing inside an adapter layer (no base_layer targets)
    fp8_peft.add_adapter("second", all_linear())
    second = {
        n.removeprefix(PREFIX) for n, m in fp8_peft.named_modules() if isinstance(m, LoraLayer) and "second" in m.lora_A
    }
    assert second == on_fp8


def test_all_linear_training_changes_only_the_adapters(tiny_fp8):
    peft_model = get_peft_model(load(tiny_fp8), all_linear(r=8))
    frozen = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    frozen.update({n: b.detach().clone() for n, b in peft_model.named_buffers()})
    before = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_B" in n}
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    batch = input_ids(4, 24, seed=5)
    peft_model.train()
    losses = []
    for _ in range(6):
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert losses[-1] < losses[0] and losses[-1] == min(losses), losses
    for n, p in [*peft_model.named_parameters(), *peft_model.named_buffers()]:
        if "lora_" not in n:
            assert torch.equal(p, frozen[n]), n  # FP8 codes, scales, norms, routers, heads: untouched
    changed = {n for n, p in peft_model.named_parameters() if "lora_B" in n and not torch.equal(p, before[n])}
    assert any(".self_attn.kv_b_proj." in n for n in changed) and any(".mlp.experts." in n for n in changed)
    assert not any("shared_head" in n or "lm_head" in n for n in before)


def dense_twin(kind: str, tmp_path):
    """An FP8 checkpoint and a dense model holding exactly its dequantized weights (checked by the test).

    ``bf16-export``: power-of-two (ue8m0) scales, so code x scale fits BF16 and ``convert --to bf16`` is exact.
    ``fp32``: the default float32 scales, whose products need up to 28 significant bits: the BF16 export rounds
    them (by up to ~1e-3 here), so the exact dense twin is the same checkpoint loaded with ``dequantize_fp8=True``."""
    if kind == "bf16-export":
        path = ds.make_tiny_checkpoint(tmp_path / "fp8", scale_fmt="ue8m0", seed=3)
        return path, load(ds.convert_checkpoint(path, tmp_path / "bf16", to="bf16", progress=False))
    path = ds.make_tiny_checkpoint(tmp_path / "fp8", seed=3)
    return path, load(path, dequantize_fp8=True)


@pytest.mark.parametrize("kind", ["bf16-export", "fp32"])
def test_all_linear_lora_output_matches_a_dense_model(kind, tmp_path):
    path, dense = dense_twin(kind, tmp_path)
    fp8_model = load(path)
    dense_modules = dict(dense.named_modules())
    for name, module in fp8_model.fp8_modules().items():  # the premise: the same base weights, exactly
        weight = block_dequantize(module.weight, module.weight_scale_inv, module.block_size, torch.float32)
        assert torch.equal(weight, dense_modules[name].weight), name
    ids = input_ids(2, 12, seed=1)
    with torch.no_grad():
        base = fp8_model(ids).logits
    fp8_peft, dense_peft = get_peft_model(fp8_model, all_linear()), get_peft_model(dense, all_linear())
    fp8_params, dense_params = dict(fp8_peft.named_parameters()), dict(dense_peft.named_parameters())
    lora = [n for n in fp8_params if "lora_" in n]
    assert lora and set(lora) == {n for n in dense_params if "lora_" in n}
    with torch.no_grad():
        for n in lora:  # the same A (PEFT draws it at random per model); B is zero at init
            dense_params[n].copy_(fp8_params[n])
    fp8_peft.eval(), dense_peft.eval()
    with torch.no_grad():
        at_init = fp8_peft(ids).logits
        assert torch.equal(at_init, base)  # B = 0: exactly the base model
        torch.testing.assert_close(at_init, dense_peft(ids).logits, rtol=1e-5, atol=5e-5)
        g = torch.Generator().manual_seed(2)
        for n in lora:
            if "lora_B" in n:
                fp8_params[n].copy_(torch.randn(fp8_params[n].shape, generator=g) * 0.05)
                dense_params[n].copy_(fp8_params[n])
        adapted = fp8_peft(ids).logits
        assert (adapted - base).abs().max() > 0.1  # the adapters act
        torch.testing.assert_close(adapted, dense_peft(ids).logits, rtol=1e-5, atol=5e-5)


def test_the_patched_peft_seam_is_still_there(tiny_fp8):
    """PEFT's private pieces the patch relies on; a failure here names the PEFT version that moved them."""
    load(tiny_fp8)  # building a model installs the patch
    where = f"PEFT {peft.__version__} (the patch targets 0.21.x)"
    resolver = getattr(tuners_utils, ALL_LINEAR_RESOLVER, None)
    assert resolver is not None, f"{where}: peft.tuners.tuners_utils.{ALL_LINEAR_RESOLVER} is gone"
    assert getattr(resolver, "__wrapped__", None) is not None, f"{where}: {ALL_LINEAR_RESOLVER} is not patched"
    params = list(inspect.signature(resolver.__wrapped__).parameters)
    assert params == ["peft_config", "model"], f"{where}: {ALL_LINEAR_RESOLVER}{params} changed its signature"
    caller = inspect.getsource(tuners_utils.BaseTuner.inject_adapter)
    assert f"{ALL_LINEAR_RESOLVER}(peft_config, model)" in caller, (
        f"{where}: BaseTuner.inject_adapter no longer calls {ALL_LINEAR_RESOLVER}(peft_config, model)"
    )


def test_other_peft_methods_are_told_what_all_linear_leaves_out(tiny_fp8):
    """LoHa has no FP8 layer: "all-linear" keeps PEFT's dense targets, warns about the FP8 ones, skips the heads."""
    model = load(tiny_fp8)
    with pytest.warns(UserWarning, match=r"with LOHA: \d+ FP8 linears .* are left out"):
        peft_model = get_peft_model(model, LoHaConfig(r=4, target_modules="all-linear"))
    from peft.tuners.loha import LoHaLayer

    assert {n.removeprefix(PREFIX) for n, m in peft_model.named_modules() if isinstance(m, LoHaLayer)} == {
        f"model.layers.{model.config.num_hidden_layers}.eh_proj"
    }


@pytest.mark.slow  # a fresh interpreter importing torch, transformers and PEFT: ~10 s
def test_peft_imported_before_the_plugin(tiny_fp8):
    """The patch applies whether PEFT or the plugin is imported first (no import hook on this path)."""
    code = (
        "import sys, torch, peft\n"
        "from peft import LoraConfig, get_peft_model\n"
        "import modeling_deepseekv3 as ds\n"
        "m = ds.DeepseekV3ForCausalLM.from_pretrained(sys.argv[1], dtype=torch.float32)\n"
        "p = get_peft_model(m, LoraConfig(r=2, target_modules='all-linear'))\n"
        "names = [n for n, _ in p.named_modules() if n.endswith('lora_A')]\n"
        "print(len(names), sum('.mlp.experts.' in n for n in names), sum('head' in n for n in names))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(tiny_fp8)], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    total, experts, head = map(int, out.stdout.split()[-3:])
    assert total > experts > 0 and head == 0, out.stdout
