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


def tiny_moe_model(**over):
    """The tiny model built from its config (random weights; no checkpoint), eval mode; its MoE layers."""
    model = ds.DeepseekV3ForCausalLM(ds.DeepseekV3Config(**{**TINY_CONFIG, "load_mtp": False, **over})).eval()
    return model, {
        f"model.layers.{i}.mlp": layer.mlp
        for i, layer in enumerate(model.model.layers)
        if isinstance(layer.mlp, ds.core.moe.DeepseekV3MoE)
    }


def test_bias_update_rule_on_known_loads():
    """``b_i += gamma * sign(mean - load_i)`` on hand-set counts: +gamma below the mean, -gamma above, 0 at it; added
    to the bias there (not overwriting it), weights untouched; layers that routed nothing are skipped; the
    returned imbalance is max / mean; the counts are reset; ``gamma=None`` takes the config's rate."""
    model, moes = tiny_moe_model(routing_bias_update_rate=0.02)
    assert list(moes) == ["model.layers.1.mlp", "model.layers.2.mlp"]
    assert update_routing_bias(model, gamma=0.1) == {}  # nothing tracked: nothing to do
    tracker = track_expert_load(model, True)
    start = torch.linspace(-0.5, 0.5, 16)
    with torch.no_grad():
        for moe in moes.values():
            moe.gate.e_score_correction_bias.copy_(start)
    weight = moes["model.layers.1.mlp"].gate.weight.clone()
    load = torch.tensor([0, 1, 2, 3, 4, 4, 4, 4, 4, 4, 4, 4, 5, 6, 7, 8])  # sum 64, mean 4
    tracker.counts = {"model.layers.1.mlp": load.clone(), "model.layers.2.mlp": torch.zeros(16, dtype=torch.long)}
    imbalance = update_routing_bias(model, gamma=0.01)
    assert imbalance == {"model.layers.1.mlp": 8 / 4}  # layer 2 routed no token: not updated, not reported
    step = torch.tensor([1.0] * 4 + [0.0] * 8 + [-1.0] * 4)  # below the mean: up; at it: unchanged; above: down
    bias = moes["model.layers.1.mlp"].gate.e_score_correction_bias
    assert bias.dtype == torch.float32
    torch.testing.assert_close(bias - start, 0.01 * step, rtol=0, atol=1e-7)
    assert torch.equal(moes["model.layers.2.mlp"].gate.e_score_correction_bias, start)
    assert torch.equal(moes["model.layers.1.mlp"].gate.weight, weight)  # selection only: the router weight stays
    assert tracker.counts == {} and not expert_load(model)  # reset for the next step
    # the config's rate when gamma is not given; gamma 0 only reports
    tracker.counts = {"model.layers.2.mlp": load.flip(0).clone()}
    assert update_routing_bias(model) == {"model.layers.2.mlp": 2.0}
    torch.testing.assert_close(
        moes["model.layers.2.mlp"].gate.e_score_correction_bias - start, 0.02 * step.flip(0), rtol=0, atol=1e-7
    )
    tracker.counts = {"model.layers.1.mlp": load.clone()}
    before = bias.clone()
    assert update_routing_bias(model, gamma=0.0) == {"model.layers.1.mlp": 2.0}
    assert torch.equal(bias, before)


def test_bias_updates_move_router_load_toward_balance():
    """The closed loop at the routers: skewed biases, the same tokens routed step after step (the routers called
    directly, counted by the tracker's hooks), one update per step: the imbalance falls. The whole-model version
    is tests/integration/test_training_runs.py."""
    model, moes = tiny_moe_model()
    with torch.no_grad():
        for moe in moes.values():
            moe.gate.e_score_correction_bias.copy_(torch.linspace(0.3, -0.3, 16))  # skewed toward low experts
    track_expert_load(model, True)
    x = torch.randn(128, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    imbalances = []
    for _ in range(60):
        with torch.no_grad():
            for moe in moes.values():
                moe.gate(x)
        step = update_routing_bias(model, gamma=0.01)
        assert set(step) == set(moes)
        imbalances.append(sum(step.values()) / len(step))
    assert imbalances[0] > 2.0 and imbalances[-1] < 0.6 * imbalances[0], imbalances[::10]
    for moe in moes.values():  # the favoured low experts were pushed down, the starved high ones up
        bias = moe.gate.e_score_correction_bias
        assert bias[:4].mean() < 0.3 - 0.1 and bias[-4:].mean() > -0.3 + 0.1


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


def test_routing_bias_callback_hooks():
    """The callback's three hooks called as ``Trainer`` calls them: train begin starts training-only counting
    (an eval forward is not counted), each step end updates the biases by one step of gamma, a log gets the
    mean imbalance (in the logs and in the log history Trainer already appended to). The run inside a real
    Trainer is tests/integration/test_training_runs.py."""
    from types import SimpleNamespace

    model, moes = tiny_moe_model()
    callback = RoutingBiasCallback(gamma=0.001)
    logs = {"loss": 1.0}
    callback.on_log(None, SimpleNamespace(log_history=[]), None, logs=logs)
    assert logs == {"loss": 1.0}  # before any step: nothing to report
    callback.on_train_begin(None, None, None, model=model)
    ids = input_ids(2, 8)
    with torch.no_grad():
        model.eval()(ids)  # an evaluation: not counted
        assert not expert_load(model)
        model.train()(ids)
    loads = expert_load(model)
    assert set(loads) == set(moes)
    before = {name: moe.gate.e_score_correction_bias.clone() for name, moe in moes.items()}
    callback.on_step_end(None, None, None, model=model)
    for name, moe in moes.items():
        load = loads[name].float()
        torch.testing.assert_close(
            moe.gate.e_score_correction_bias - before[name], 0.001 * torch.sign(load.mean() - load), rtol=0, atol=1e-7
        )
    state = SimpleNamespace(log_history=[{"loss": 1.0}])
    logs = {"loss": 1.0}
    callback.on_log(None, state, None, logs=logs)
    expected = sum((loads[n].max() / loads[n].float().mean()).item() for n in moes) / len(moes)
    assert logs["moe_load_imbalance"] == pytest.approx(expected) and expected > 1
    assert state.log_history[-1]["moe_load_imbalance"] == logs["moe_load_imbalance"]


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
