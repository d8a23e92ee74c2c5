"""MoE training controls: balance loss against a hand computation, bias updates toward balance, the MTP loss,
and how the loss parts add up in training and in eval."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import modeling_deepseekv3 as ds
from helpers import input_ids, load
from modeling_deepseekv3.checkpoint import TINY_CONFIG
from modeling_deepseekv3.training import (
    RoutingBiasCallback,
    balance_loss,
    expert_load,
    mtp_loss,
    next_token_labels,
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
    """``update_routing_bias`` itself, step after step, on a model whose biases start skewed."""
    model = ds.DeepseekV3ForCausalLM(ds.DeepseekV3Config(**TINY_CONFIG, load_mtp=False)).eval()
    moes = [layer.mlp for layer in model.model.layers if isinstance(layer.mlp, ds.moe.DeepseekV3MoE)]
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
    load1 = loads["model.layers.1.mlp"].float()
    # exactly gamma * sign(mean - load) per expert (0 where an expert's load equals the mean)
    torch.testing.assert_close(after - before, 0.01 * torch.sign(load1.mean() - load1), rtol=0, atol=1e-7)
    assert not expert_load(model)  # counts reset
    track_expert_load(model, False)
    with torch.no_grad():
        model(input_ids(1, 4))
    assert not expert_load(model) and update_routing_bias(model) == {}


def test_training_only_tracking_ignores_evaluation(tiny_bf16_direct_q):
    """An evaluation between two optimizer steps (pretrain's --eval-every, Trainer's eval) must not steer the
    next bias update: with ``training_only`` eval-mode forwards are not counted; by default they are."""
    model = load(tiny_bf16_direct_q)
    ids = input_ids(2, 8)
    track_expert_load(model, True, training_only=True)
    with torch.no_grad():
        model.eval()(ids)
    assert not expert_load(model)
    model.train()(ids)
    assert all(v.sum() == 2 * 8 * model.config.num_experts_per_tok for v in expert_load(model).values())
    track_expert_load(model, True)  # back to counting everything (statistics at inference)
    with torch.no_grad():
        model.eval()(ids)
    assert all(v.sum() == 2 * 2 * 8 * model.config.num_experts_per_tok for v in expert_load(model).values())


def test_load_counted_once_under_gradient_checkpointing(tiny_bf16_direct_q):
    """The backward recomputation of a checkpointed layer re-runs its router; it must not count twice."""
    counts = []
    for checkpointing in (False, True):
        model = load(tiny_bf16_direct_q)
        model.train()
        if checkpointing:
            model.activation_checkpointing_enable({"use_reentrant": False})
        track_expert_load(model, True)
        ids = input_ids(2, 8)
        model(ids, labels=ids).loss.backward()
        counts.append(expert_load(model))
    assert counts[0].keys() == counts[1].keys() and counts[0]
    for name in counts[0]:
        assert torch.equal(counts[0][name], counts[1][name]), name


def test_loss_parts_in_training_and_eval(tiny_fp8):
    """Training: loss = lm + mtp_loss_weight * mtp + balance. Eval: loss is the plain next-token
    cross-entropy (perplexity is the language model's); the parts are reported separately in both."""
    model = load(tiny_fp8)
    ids = input_ids(2, 12)
    model.train()
    out = model(ids, labels=ids)
    lm = F.cross_entropy(out.logits[:, :-1].reshape(-1, out.logits.shape[-1]), ids[:, 1:].reshape(-1))
    torch.testing.assert_close(out.lm_loss, lm)
    hidden = model.model(ids).last_hidden_state
    torch.testing.assert_close(out.mtp_loss, mtp_loss(model, ids, hidden, next_token_labels(ids, None), None))
    assert 0 < out.aux_loss < 1e-2  # alpha 1e-4 x O(n_layers)
    torch.testing.assert_close(out.loss, lm + 0.1 * out.mtp_loss + out.aux_loss)
    model.eval()
    with torch.no_grad():
        ev = model(ids, labels=ids)
    torch.testing.assert_close(ev.loss, lm)
    assert ev.aux_loss is None and ev.mtp_loss is not None and ev.mtp_loss > 0
    torch.testing.assert_close(ev.mtp_loss, out.mtp_loss)
    # each part can be switched off
    model.train()
    plain = load(tiny_fp8, mtp_loss_weight=0.0, balance_loss_alpha=0.0).train()(ids, labels=ids)
    assert plain.mtp_loss is None and plain.aux_loss is None
    torch.testing.assert_close(plain.loss, plain.lm_loss)


def test_mtp_loss_matches_an_independent_computation(tiny_fp8):
    """Embedding half first: x = eh_proj([enorm(emb(t_{i+1})) ; hnorm(h_i)]), then the block, then the head;
    the target of position i is token i+2."""
    model = load(tiny_fp8)
    ids = input_ids(1, 10)
    layer = model.model.mtp_layers[0]
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state  # post-norm
        e = layer.enorm(model.model.embed_tokens(ids[:, 1:]))
        h = layer.hnorm(hidden[:, :-1])
        x = torch.cat((e, h), -1) @ layer.eh_proj.weight.T
        x = layer.block(x, model.model.rotary_emb(torch.arange(9)[None]))
        logits = layer.shared_head.norm(x) @ model.lm_head.weight.T  # the head copy equals lm_head
        manual = F.cross_entropy(logits[0, :-1], ids[0, 2:])
        got = mtp_loss(model, ids, hidden, next_token_labels(ids, None), None)
    torch.testing.assert_close(got, manual)
    swapped = torch.cat((h, e), -1) @ layer.eh_proj.weight.T  # the paper's [h ; emb] order is a different model
    assert (swapped - torch.cat((e, h), -1) @ layer.eh_proj.weight.T).abs().max() > 1e-2


def test_shift_labels_reach_the_mtp_term(tiny_fp8):
    """Context-parallel training passes pre-shifted labels; both loss terms must use them."""
    model = load(tiny_fp8).eval()
    ids = input_ids(2, 12)
    with torch.no_grad():
        ref = model(ids, labels=ids)
        shifted = F.pad(ids[:, 1:], (0, 1), value=-100)
        got = model(ids, shift_labels=shifted)
    torch.testing.assert_close(got.lm_loss, ref.lm_loss)
    torch.testing.assert_close(got.mtp_loss, ref.mtp_loss)
    with torch.no_grad():
        masked = shifted.clone()
        masked[:, 5:] = -100  # only the first positions count
        part = model(ids, shift_labels=masked)
    assert not torch.allclose(part.mtp_loss, ref.mtp_loss)


def test_mtp_block_is_recomputed_under_gradient_checkpointing(tiny_fp8):
    """Counted: with checkpointing, each decoder layer and the MTP layer run their attention twice per
    forward + backward (forward, then the recomputation)."""
    model = load(tiny_fp8)
    model.train()
    model.activation_checkpointing_enable({"use_reentrant": False})
    calls: dict[str, int] = {}
    for name, module in model.named_modules():
        if name.endswith("self_attn"):
            module.register_forward_hook(lambda m, a, o, name=name: calls.__setitem__(name, calls.get(name, 0) + 1))
    ids = input_ids(2, 8)
    out = model(ids, labels=ids)
    assert out.mtp_loss is not None
    out.loss.backward()
    assert calls == {f"model.layers.{i}.self_attn": 2 for i in range(4)}, calls


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
    assert (after - before).abs().max() <= 3 * 0.001 + 1e-7  # one step of gamma per optimizer step
    assert any("moe_load_imbalance" in entry for entry in trainer.state.log_history)


@pytest.mark.parametrize("alpha", [0.0, 1e-3])
def test_balance_term_only_when_asked(tiny_bf16_direct_q, alpha):
    model = load(tiny_bf16_direct_q, balance_loss_alpha=alpha).train()
    ids = input_ids(2, 8)
    out = model(ids, labels=ids)
    assert (out.aux_loss is not None) == (alpha > 0)
    assert out.router_logits is None  # recorded for the loss, not returned unless asked
    with torch.no_grad():
        asked = model(ids, output_router_logits=True)
    assert len(asked.router_logits) == 2 and asked.router_logits[0].shape == (16, 16)
