"""MoE training controls: balance loss against a hand computation, bias updates toward balance, MTP loss."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import input_ids, load

import modeling_deepseekv3 as ds
from modeling_deepseekv3.conversion import TINY_CONFIG
from modeling_deepseekv3.moe import DeepseekV3MoE
from modeling_deepseekv3.training import (
    RoutingBiasCallback,
    balance_loss,
    expert_load,
    mtp_loss,
    track_expert_load,
    update_routing_bias,
)


def test_balance_loss_hand_computed():
    # one sequence, T = 2 tokens, E = 4 experts, K = 2
    logits = torch.tensor([[0.0, 0.0, 0.0, 0.0], [math.log(3.0), 0.0, 0.0, -math.log(3.0)]])
    idx = torch.tensor([[0, 1], [0, 2]])
    # sigmoid scores: token 0: 0.5 x4 -> s' = 0.25 each; token 1: 0.75, 0.5, 0.5, 0.25 -> / 2.0
    p = torch.tensor([(0.25 + 0.375) / 2, (0.25 + 0.25) / 2, (0.25 + 0.25) / 2, (0.25 + 0.125) / 2])
    f = torch.tensor([2.0, 1.0, 1.0, 0.0]) * 4 / (2 * 2)  # N_r / (K_r T) * selections
    expected = 1e-4 * (f * p).sum()
    torch.testing.assert_close(balance_loss(idx, logits, batch=1, alpha=1e-4), expected)
    # a padding token does not count: with token 1 masked, T = 1
    masked = balance_loss(idx, logits, batch=1, alpha=1.0, mask_BS=torch.tensor([[1, 0]]))
    torch.testing.assert_close(masked, torch.tensor(0.25 * (2.0 * 2)))  # f = 4/2 * [1,1,0,0], P = 0.25


def test_bias_update_moves_load_toward_balance():
    cfg = ds.DeepseekV3Config(**TINY_CONFIG)
    moe = DeepseekV3MoE(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in moe.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
        moe.gate.weight.copy_(torch.randn(moe.gate.weight.shape, generator=g) * 0.05)
        moe.gate.e_score_correction_bias.copy_(torch.linspace(0.3, -0.3, 16))  # skewed toward low experts
    moe.track_load = True
    x = torch.randn(256, 256, generator=g)
    imbalances = []
    for step in range(150):
        with torch.no_grad():
            moe(x)
        load = moe.expert_load.float()
        imbalances.append((load.max() / load.mean()).item())
        with torch.no_grad():
            moe.gate.e_score_correction_bias.add_(0.005 * torch.sign(load.mean() - load))
        moe.expert_load = None
    assert imbalances[0] > 2.0 and imbalances[-1] < 0.6 * imbalances[0]


def test_update_routing_bias_and_load_statistics(tiny_fp8):
    model = load(tiny_fp8)
    track_expert_load(model, True)
    with torch.no_grad():
        model(input_ids(2, 16))
    loads = expert_load(model)
    assert len(loads) == 2 and all(v.sum() == 2 * 16 * 4 for v in loads.values())  # T * K per layer
    before = model.model.layers[1].mlp.gate.e_score_correction_bias.clone()
    imbalance = update_routing_bias(model, gamma=0.01)
    after = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert set(imbalance) == set(loads) and all(v >= 1 for v in imbalance.values())
    delta = after - before
    assert torch.allclose(delta.abs(), torch.full_like(delta, 0.01)) or (delta == 0).any()
    heavy = loads["model.layers.1.mlp"].argmax()
    assert delta[heavy].item() == pytest.approx(-0.01) and not expert_load(model)  # counts reset


def test_balance_and_mtp_terms_in_the_training_loss(tiny_fp8):
    model = load(tiny_fp8)
    ids = input_ids(2, 12)
    model.train()
    with_both = model(ids, labels=ids)
    lm = torch.nn.functional.cross_entropy(with_both.logits[:, :-1].reshape(-1, with_both.logits.shape[-1]), ids[:, 1:].reshape(-1))
    hidden = model.model(ids).last_hidden_state
    mtp = mtp_loss(model, ids, hidden, ids, None)
    balance = with_both.aux_loss - 0.1 * mtp
    assert balance > 0 and balance < 1e-2  # alpha 1e-4 x O(n_layers)
    torch.testing.assert_close(with_both.loss, lm + with_both.aux_loss)
    model.eval()
    assert torch.allclose(model(ids, labels=ids).aux_loss, 0.1 * mtp)  # no balance loss outside training


def test_mtp_loss_matches_a_manual_computation(tiny_fp8):
    model = load(tiny_fp8)
    ids = input_ids(1, 10)
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state
        layer = model.model.mtp_layers[0]
        pe = model.model.rotary_emb(torch.arange(9)[None])
        _, logits = layer.predict(ids[:, 1:], hidden[:, :-1], pe)
        manual = torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 2:])
        torch.testing.assert_close(mtp_loss(model, ids, hidden, ids, None), manual)


def test_routing_bias_callback_in_trainer(tiny_bf16_direct_q, tmp_path):
    from transformers import Trainer, TrainingArguments

    model = load(tiny_bf16_direct_q)
    ids = input_ids(8, 16)
    data = [{"input_ids": row, "labels": row} for row in ids]
    before = model.model.layers[1].mlp.gate.e_score_correction_bias.clone()
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=4, logging_steps=1,
                             report_to=[], use_cpu=True, save_strategy="no", learning_rate=1e-4)
    trainer = Trainer(model=model, args=args, train_dataset=data, callbacks=[RoutingBiasCallback(gamma=0.001)])
    trainer.train()
    after = model.model.layers[1].mlp.gate.e_score_correction_bias
    assert not torch.equal(before, after)
    assert any("moe_load_imbalance" in entry for entry in trainer.state.log_history)
