"""LoRA with PEFT: every target kind wraps (routed experts included), trains, saves and reloads; LoRA over
FP8 (gradients, merging back into FP8); kv_b_proj LoRA under the absorbed path; QLoRA from BF16 and FP8."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

from helpers import input_ids, load

pytest.importorskip("peft")
import peft
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer

import modeling_deepseekv3 as ds
from modeling_deepseekv3.integrations.peft import FP8LoraLinear, load_lora, lora_config, lora_target_modules

ALL = ["q_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def lora_modules(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]


def train_adapters(peft_model, batch, steps: int, lr: float = 1e-2) -> list[float]:
    """AdamW on the trainable (adapter) parameters, the batch as its own labels; the loss per step."""
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=lr)
    peft_model.train()
    losses = []
    for _ in range(steps):
        loss = peft_model(input_ids=batch, labels=batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return losses


@pytest.mark.slow  # a training run
def test_plain_get_peft_model_wraps_every_target_and_trains(tiny_bf16_direct_q, tmp_path):
    """Plain PEFT usage, no helper: PEFT's "deepseek_v3" target rewrite must not drop the expert targets."""
    model = load(tiny_bf16_direct_q)
    config = model.config
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=ALL))
    wrapped = lora_modules(peft_model)
    layers, moe_layers = config.num_hidden_layers, config.num_hidden_layers - config.first_k_dense_replace
    expected = layers * 4 + (layers - moe_layers) * 3 + moe_layers * 3 * (config.n_routed_experts + 1)
    assert len(wrapped) == expected
    assert sum(".mlp.experts." in n for n in wrapped) == moe_layers * 3 * config.n_routed_experts
    base = {n: p.detach().clone() for n, p in peft_model.named_parameters() if "lora_" not in n}
    batch = input_ids(4, 24, seed=5)
    losses = train_adapters(peft_model, batch, steps=40)
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    for n, p in peft_model.named_parameters():  # only adapters changed
        if "lora_" not in n:
            assert torch.equal(p, base[n]), n
    assert all(p.grad is None for n, p in peft_model.named_parameters() if "lora_" not in n)
    # adapters save and reload with every target
    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(input_ids=batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load(tiny_bf16_direct_q), tmp_path / "adapter")
    assert len(lora_modules(reloaded)) == expected
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch).logits, trained)
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["r"] == 8


def test_scopes(tiny_fp8):
    config = load(tiny_fp8).config
    assert lora_target_modules(config, "attention") == [
        "q_a_proj",
        "q_b_proj",
        "kv_a_proj_with_mqa",
        "kv_b_proj",
        "o_proj",
    ]
    model = get_peft_model(load(tiny_fp8), lora_config(config, "experts"))
    wrapped = lora_modules(model)
    assert wrapped and all(".mlp.experts." in n for n in wrapped)
    assert len(wrapped) == 3 * 16 * 3  # 2 MoE layers + the MTP block, 16 experts, 3 projections
    with pytest.raises(ValueError, match="scope"):
        lora_target_modules(config, "everything")


def test_fp8_lora_gradients_match_a_dequantized_base(tiny_fp8):
    def grads(model):
        torch.manual_seed(0)
        peft_model = get_peft_model(model, lora_config(model, "all", init_lora_weights=False))
        peft_model.train()
        ids = input_ids(2, 12)
        peft_model(input_ids=ids, labels=ids).loss.backward()
        return {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.grad is not None}

    fp8 = grads(load(tiny_fp8))
    dense = grads(load(tiny_fp8, dequantize_fp8=True))
    assert fp8.keys() == dense.keys() and all("lora_" in n for n in fp8)
    assert len(fp8) > 300
    for n in fp8:
        rel = (fp8[n] - dense[n]).norm() / dense[n].norm().clamp(min=1e-12)
        assert rel < 1e-2, (n, rel.item())
    model = load(tiny_fp8)
    peft_model = get_peft_model(model, lora_config(model, "all"))
    layer = peft_model.base_model.model.model.layers[1].mlp.experts[0].up_proj
    assert isinstance(layer, FP8LoraLinear) and layer.lora_A["default"].weight.dtype == torch.float32
    assert layer.base_layer.weight.dtype == torch.float8_e4m3fn and not layer.base_layer.weight.requires_grad


def trained_fp8_lora(path, sigma: float = 0.005):
    """LoRA on every target with small random B (as after some training; B = 0 at init would be a no-op)."""
    model = load(path)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, lora_config(model, "all"))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, sigma)
    return peft_model


# every expert always selected: routing cannot flip, so model-level errors measure the weights only
SMOOTH_ROUTING = {"num_experts_per_tok": 16, "topk_group": 4}


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
def test_merge_into_fp8_save_and_reload(tmp_path, scale_fmt):
    path = ds.make_tiny_checkpoint(tmp_path / "base", scale_fmt=scale_fmt, mtp=False, overrides=SMOOTH_ROUTING)
    peft_model = trained_fp8_lora(path)
    ids = input_ids(2, 10)
    with torch.no_grad():
        unmerged = peft_model(input_ids=ids).logits
    # weight level: the merged FP8 weight is the requantized (dequantized base + delta), within half an ulp
    layer = peft_model.base_model.model.model.layers[1].mlp.experts[5].up_proj
    target = layer.base_layer.dequantized_weight() + layer.get_delta_weight("default")
    merged = peft_model.merge_and_unload()
    assert isinstance(merged.model.layers[1].mlp.experts[0].up_proj, ds.FP8Linear)
    got = merged.model.layers[1].mlp.experts[5].up_proj
    s_full = got.weight_scale_inv.repeat_interleave(128, 0).repeat_interleave(128, 1)[
        : target.shape[0], : target.shape[1]
    ]
    bound = torch.maximum(target.abs() / 16, s_full / 1024) * (1 + 1e-5)
    assert bool(((got.dequantized_weight() - target).abs() <= bound).all())
    merged.save_pretrained(tmp_path / "merged")
    reloaded = load(tmp_path / "merged")
    w = reloaded.model.layers[1].self_attn.kv_b_proj
    assert w.weight.dtype == torch.float8_e4m3fn and w.weight_scale_inv.dtype == torch.float32
    if scale_fmt == "ue8m0":
        s = w.weight_scale_inv
        assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    with torch.no_grad():
        logits = reloaded(ids).logits
    assert ((logits - unmerged).norm() / unmerged.norm()) < 0.05


def test_unmerge_restores_the_fp8_bytes(tiny_fp8):
    peft_model = trained_fp8_lora(tiny_fp8)
    layer = peft_model.base_model.model.model.layers[1].mlp.experts[2].down_proj
    before = layer.base_layer.weight.detach().clone()
    layer.merge()
    assert not torch.equal(layer.base_layer.weight.view(torch.uint8), before.view(torch.uint8))
    layer.unmerge()
    assert torch.equal(layer.base_layer.weight.view(torch.uint8), before.view(torch.uint8))


def test_merged_fp8_loads_in_transformers_native(tmp_path):
    aligned = {
        "q_lora_rank": 128,
        "kv_lora_rank": 128,
        "qk_rope_head_dim": 128,
        "qk_nope_head_dim": 64,
        "v_head_dim": 64,
        "moe_intermediate_size": 256,
        "intermediate_size": 512,
    }
    path = ds.make_tiny_checkpoint(tmp_path / "base", mtp=False, overrides=aligned)
    merged = trained_fp8_lora(path, sigma=0.05).merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    ours = load(tmp_path / "merged")
    native = transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)
    ids = input_ids(1, 8)
    with torch.no_grad():
        assert (ours(ids).logits - native(ids).logits).abs().max() < 1e-4


def test_kv_b_lora_is_honoured_by_the_absorbed_path(tiny_fp8):
    model = load(tiny_fp8, mla_impl="absorb")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, lora_config(model, "attention", init_lora_weights=False))
    attn = peft_model.base_model.model.model.layers[1].self_attn
    assert attn.choose_path(1, 100) == "expand"  # the LoRA-wrapped kv_b_proj cannot be absorbed as is
    ids = input_ids(1, 8)
    with torch.no_grad():
        out = peft_model(input_ids=ids).logits
        model.config.mla_impl = "expand"
        ref = peft_model(input_ids=ids).logits
        with peft_model.disable_adapter():
            plain = peft_model(input_ids=ids).logits
    torch.testing.assert_close(out, ref)
    assert (out - plain).abs().max() > 1e-3


def test_load_lora_helper_for_fp8(tiny_fp8, tmp_path):
    peft_model = trained_fp8_lora(tiny_fp8)
    ids = input_ids(1, 6)
    with torch.no_grad():
        ref = peft_model(input_ids=ids).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    restored = load_lora(load(tiny_fp8), tmp_path / "adapter")
    assert len(lora_modules(restored)) == len(lora_modules(peft_model))
    with torch.no_grad():
        torch.testing.assert_close(restored(input_ids=ids).logits, ref)


FP8_TARGETS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def assert_official_fp8(path, config):
    """A merged save in the official FP8 layout: every layout tensor present with its dtype, scales F32."""
    from safetensors import safe_open

    layout = ds.checkpoint_layout(ds.DeepseekV3Config.from_pretrained(path))
    seen = {}
    for f in path.glob("*.safetensors"):
        with safe_open(str(f), "pt") as h:
            seen.update({k: h.get_slice(k).get_dtype() for k in h.keys()})
    assert set(seen) == set(layout)
    fp8 = [k for k, spec in layout.items() if spec.dtype == torch.float8_e4m3fn]
    assert fp8 and all(seen[k] == "F8_E4M3" and seen[k.replace(".weight", ".weight_scale_inv")] == "F32" for k in fp8)
    assert json.loads((path / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"


@pytest.mark.slow  # a training run
def test_plain_peft_script_on_an_fp8_checkpoint(tiny_fp8, tmp_path):
    """A user's unchanged LoRA script: their own LoraConfig, get_peft_model, train, save, plain
    PeftModel.from_pretrained, merge_and_unload -> official FP8 layout. No plugin call anywhere."""
    model = load(tiny_fp8)
    peft_model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=FP8_TARGETS))
    wrapped = lora_modules(peft_model)
    assert sum(".mlp.experts." in n for n in wrapped) == 3 * 16 * 3  # routed experts of 2 MoE layers + MTP
    assert all(isinstance(peft_model.get_submodule(n), FP8LoraLinear) for n in wrapped)
    batch = input_ids(4, 24, seed=5)
    losses = train_adapters(peft_model, batch, steps=30)
    assert losses[-1] < 0.5 * losses[0], losses[::10]
    peft_model.eval()
    with torch.no_grad():
        trained = peft_model(input_ids=batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load(tiny_fp8), tmp_path / "adapter")
    assert lora_modules(reloaded) == wrapped
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=batch).logits, trained)
    merged = reloaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    assert_official_fp8(tmp_path / "merged", merged.config)
    with torch.no_grad():  # requantized to FP8 (routing may flip on this random model): it still knows the batch
        merged_loss = load(tmp_path / "merged")(batch, labels=batch).loss.item()
    assert merged_loss < 0.5 * losses[0], (merged_loss, losses[0], losses[-1])


def test_dispatch_covers_every_fp8_model_in_the_process(tmp_path):
    """Two FP8 configs (plain and power-of-two scales) and a BF16 one in one process: each FP8 target
    gets the FP8 layer, dense targets PEFT's own."""
    fp8 = load(ds.make_tiny_checkpoint(tmp_path / "a", mtp=False))
    ue8m0 = load(ds.make_tiny_checkpoint(tmp_path / "b", mtp=False, scale_fmt="ue8m0", overrides={"hidden_size": 384}))
    dense = load(ds.make_tiny_checkpoint(tmp_path / "c", mtp=False, fp8=False))
    for model, fp8_expected in ((fp8, True), (ue8m0, True), (dense, False)):
        peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["o_proj", "down_proj"]))
        kinds = {type(peft_model.get_submodule(n)) for n in lora_modules(peft_model)}
        assert kinds == ({FP8LoraLinear} if fp8_expected else {peft.tuners.lora.Linear})


@pytest.mark.slow  # TRL: a 40-step training run
def test_trl_sft_trainer_with_plain_lora_config(tiny_fp8, tmp_path):
    """TRL's SFTTrainer with a plain LoraConfig on the FP8 tiny checkpoint: loss falls by more than half,
    routed experts carry adapters, the adapter reloads, merges, and saves in the official FP8 layout."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    tok = ds.load_tokenizer(tiny_fp8)
    rows = [
        {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}
        for q, a in [
            ("What is two plus two?", "Two plus two is four."),
            ("What does the cache keep?", "A small latent vector per token."),
        ]
    ] * 8
    model = load(tiny_fp8)
    args = trl.SFTConfig(
        output_dir=str(tmp_path / "out"),
        max_steps=40,
        per_device_train_batch_size=8,
        learning_rate=3e-3,
        lr_scheduler_type="constant",
        logging_steps=5,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        max_length=64,
        bf16=False,
    )
    lora = LoraConfig(r=8, lora_alpha=16, target_modules=FP8_TARGETS, task_type="CAUSAL_LM")
    trainer = trl.SFTTrainer(
        model=model, args=args, train_dataset=datasets.Dataset.from_list(rows), processing_class=tok, peft_config=lora
    )
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses[-1] < 0.5 * losses[0], losses
    wrapped = lora_modules(trainer.model)
    assert sum(".mlp.experts." in n for n in wrapped) == 3 * 16 * 3
    trainer.model.save_pretrained(tmp_path / "adapter")
    reloaded = PeftModel.from_pretrained(load(tiny_fp8), tmp_path / "adapter")
    assert len(lora_modules(reloaded)) == len(wrapped)
    merged = reloaded.merge_and_unload()
    merged.save_pretrained(tmp_path / "merged")
    assert_official_fp8(tmp_path / "merged", merged.config)


@pytest.mark.parametrize("fp8", [False, True], ids=["from_bf16", "from_fp8"])
def test_qlora_training_step_on_cpu(tmp_path, fp8):
    bnb = pytest.importorskip("bitsandbytes")
    aligned = {"q_lora_rank": 128, "kv_lora_rank": 192, "qk_rope_head_dim": 64}  # bitsandbytes' CPU blocks
    path = ds.make_tiny_checkpoint(tmp_path / "ckpt", fp8=fp8, mtp=False, overrides=aligned)
    q = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    model = load(path, quantization_config=q)
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts[0].up_proj, bnb.nn.Linear4bit) and not model.fp8_modules()
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["gate_proj", "up_proj", "down_proj", "o_proj"]))
    assert sum(".mlp.experts." in n for n in lora_modules(peft_model)) == 2 * 16 * 3
    peft_model.train()
    ids = input_ids(2, 8)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    first = peft_model(input_ids=ids, labels=ids).loss
    first.backward()
    optimizer.step()
    assert torch.isfinite(first) and peft_model(input_ids=ids, labels=ids).loss < first


def test_gradient_checkpointing_with_lora(tiny_fp8):
    model = load(tiny_fp8)
    peft_model = get_peft_model(model, lora_config(model, "all", init_lora_weights=False))
    peft_model.base_model.model.activation_checkpointing_enable({"use_reentrant": False})
    peft_model.train()
    ids = input_ids(2, 8)
    peft_model(input_ids=ids, labels=ids, use_cache=True).loss.backward()
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    assert trainable and all("lora" in n for n, p in peft_model.named_parameters() if p.requires_grad)
    assert peft_model.base_model.model.model.layers[1].mlp.gate.weight.grad is None  # router frozen
    assert sum(p.grad is not None for p in trainable) > 100
