"""Training runs on the tiny model (slow: many whole-model forwards and backwards): aux-loss-free bias updates move
expert load toward balance, the routing-bias callback inside a real ``transformers.Trainer``, and the FP8 training
recipe learns about as well as fp32. The rules themselves, tested directly: tests/unit/test_training.py,
tests/unit/test_fp8_training.py.
"""

from __future__ import annotations

import pytest
import torch

import modeling_deepseekv3 as ds
from helpers import input_ids, load
from modeling_deepseekv3.checkpoint import TINY_CONFIG
from modeling_deepseekv3.fp8.training import convert_to_fp8_training
from modeling_deepseekv3.training import RoutingBiasCallback, track_expert_load, update_routing_bias

pytestmark = pytest.mark.slow


def test_bias_update_moves_load_toward_balance():
    """``update_routing_bias`` itself, step after step, on a whole model whose biases start skewed (150 forwards; the
    rule on known loads and the loop at the routers alone: tests/unit/test_training.py)."""
    model = ds.DeepseekV3ForCausalLM(ds.DeepseekV3Config(**TINY_CONFIG, load_mtp=False)).eval()
    moes = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, ds.core.moe.DeepseekV3MoE)]
    with torch.no_grad():
        for moe in moes:
            moe.gate.e_score_correction_bias.copy_(torch.linspace(0.3, -0.3, 16))  # skewed toward low experts
    track_expert_load(model, True)
    ids = input_ids(2, 64)
    imbalances = []
    for _ in range(150):
        with torch.no_grad():
            model(ids)
        step = update_routing_bias(model, gamma=0.005)
        assert set(step) == {f"model.layers.{i}.mlp" for i in (1, 2)}
        imbalances.append(sum(step.values()) / len(step))
    assert imbalances[0] > 2.0 and imbalances[-1] < 0.6 * imbalances[0], imbalances[::30]


def test_routing_bias_callback_in_trainer(tiny_bf16_direct_q, tmp_path):
    """Three optimizer steps of a real ``Trainer`` with the callback (its hooks alone: tests/unit/test_training.py)."""
    from transformers import Trainer, TrainingArguments

    model = load(tiny_bf16_direct_q)
    ids = input_ids(8, 16)
    data = [{"input_ids": row, "labels": row} for row in ids]
    before = model.model.layers[1].mlp.gate.e_score_correction_bias.clone()
    args = TrainingArguments(
        output_dir=str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        learning_rate=1e-4,
    )
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[RoutingBiasCallback(gamma=0.001)])
    trainer.train()
    after = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert not torch.equal(before, after)
    assert (after - before).abs().max() <= 3 * 0.001 + 1e-7  # one step of gamma per optimizer step
    assert any("moe_load_imbalance" in entry for entry in trainer.state.log_history)


def test_training_with_the_recipe_learns_and_matches_fp32_closely():
    """15 AdamW steps of the tiny model, in fp32 and with the FP8 recipe (each GEMM against its reference:
    tests/unit/test_fp8_training.py)."""
    ids = input_ids(4, 32)
    losses = {}
    for fp8 in (False, True):
        torch.manual_seed(0)
        model = ds.DeepseekV3ForCausalLM(ds.DeepseekV3Config(**TINY_CONFIG)).float().train()
        if fp8:
            convert_to_fp8_training(model)
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        curve = []
        for _ in range(15):
            loss = model(ids, labels=ids).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            curve.append(loss.item())
        losses[fp8] = curve
    assert losses[True][-1] < 0.7 * losses[True][0]
    # 15 steps on the steep part of the curve: close, not equal (benchmarks/fp8_training.py runs 300+ steps)
    assert abs(losses[True][-1] - losses[False][-1]) / losses[False][-1] < 0.15
