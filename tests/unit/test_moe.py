"""Router against an independent per-token oracle; sorted dispatch against the per-expert reference loop."""

from __future__ import annotations

import pytest
import torch

import modeling_deepseekv3 as ds
from modeling_deepseekv3.checkpoint import TINY_CONFIG
from modeling_deepseekv3.core.moe import DeepseekV3MoE, moe_reference, route_tokens


def oracle_route(logits, bias, top_k, n_group, topk_group, scale):
    """Spec §6, one token at a time, plain Python sorting."""
    idx_out, w_out = [], []
    for (row,) in zip(logits):
        s = row.sigmoid().tolist()
        sel = [a + b for a, b in zip(s, bias.tolist())]
        size = len(s) // n_group
        groups = [sum(sorted(sel[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        kept = sorted(range(n_group), key=lambda g: -groups[g])[:topk_group]
        cand = [e for e in range(len(s)) if e // size in kept]
        chosen = sorted(cand, key=lambda e: -sel[e])[:top_k]
        total = sum(s[e] for e in chosen)
        idx_out.append(sorted(chosen))
        w_out.append([s[e] / total * scale for e in sorted(chosen)])
    return torch.tensor(idx_out), torch.tensor(w_out)


@pytest.mark.parametrize("bias_shift", [0.0, -2.0], ids=["mixed_bias", "negative_bias"])
def test_router_matches_oracle(bias_shift):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(64, 16, generator=g) * 2
    bias = (torch.rand(16, generator=g) - 0.5) + bias_shift
    idx, w = route_tokens(
        logits, bias, top_k=4, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5
    )
    order = idx.argsort(-1)
    ref_idx, ref_w = oracle_route(logits, bias, 4, 4, 2, 2.5)
    assert torch.equal(idx.gather(1, order), ref_idx)
    torch.testing.assert_close(w.gather(1, order), ref_w)
    torch.testing.assert_close(w.sum(-1), torch.full((64,), 2.5))


def test_dropped_groups_masked_with_minus_inf_not_zero():
    """With negative biased scores, 0.0-filling dropped groups would let them win (transformers #45440)."""
    logits = torch.full((1, 8), -4.0)
    bias = torch.tensor([-0.9, -0.9, -1.0, -1.0, -0.1, -0.1, -3.0, -3.0])
    # groups of 2: [0,1] [2,3] [4,5] [6,7]; keep the 2 best groups: {4,5} and {0,1}
    idx, _ = route_tokens(
        logits, bias, top_k=3, n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=1.0
    )
    chosen = set(idx[0].tolist())
    assert chosen <= {0, 1, 4, 5}, chosen


def test_weights_use_unbiased_scores():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]])
    bias = torch.tensor([10.0, 10.0, 0.0, 0.0])  # bias makes experts 0, 1 win selection
    idx, w = route_tokens(
        logits, bias, top_k=2, n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.0
    )
    assert set(idx[0].tolist()) == {0, 1}
    torch.testing.assert_close(w[0].sort().values, torch.tensor([0.0, 1.0]).sigmoid())


@pytest.fixture
def moe():
    cfg = ds.DeepseekV3Config(**TINY_CONFIG)
    layer = DeepseekV3MoE(cfg)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5)
        layer.gate.e_score_correction_bias.copy_(torch.rand(16, generator=g) - 0.5)
    return layer


def test_dispatch_equals_reference_loop(moe):
    x = torch.randn(2, 9, 256)
    torch.testing.assert_close(moe(x), moe_reference(moe, x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("case", ["all_to_one_expert", "empty_experts", "single_token"])
def test_dispatch_adversarial_routings(moe, case):
    x = torch.randn(1 if case == "single_token" else 20, 256)
    with torch.no_grad():
        if case == "all_to_one_expert":
            moe.gate.e_score_correction_bias.fill_(-5.0)
            moe.gate.e_score_correction_bias[[0, 1, 2, 3]] = 5.0  # everyone picks experts 0-3 of group 0
        elif case == "empty_experts":
            moe.gate.e_score_correction_bias.fill_(-5.0)
            moe.gate.e_score_correction_bias[[4, 5, 8, 9]] = 5.0
    out = moe(x)
    torch.testing.assert_close(out, moe_reference(moe, x), rtol=1e-5, atol=1e-5)
    idx, _, _ = moe.gate(x)
    if case != "single_token":
        assert len(set(idx.flatten().tolist())) == 4


def test_router_tensors_stay_fp32_under_model_casts(moe):
    moe.to(torch.bfloat16)
    assert moe.gate.weight.dtype == torch.float32 and moe.gate.e_score_correction_bias.dtype == torch.float32
    assert moe.experts[0].up_proj.weight.dtype == torch.bfloat16
    moe.half()
    assert moe.gate.e_score_correction_bias.dtype == torch.float32


def test_router_computes_in_fp32_for_bf16_inputs(moe):
    x = torch.randn(4, 256).bfloat16()
    _, w, logits = moe.gate(x)
    assert w.dtype == torch.float32 and logits.dtype == torch.float32
    torch.testing.assert_close(logits, x.float() @ moe.gate.weight.T)


@pytest.mark.parametrize("path", ["stacked", "plain_loop", "modules"])
def test_every_dispatch_path_equals_the_reference(moe, path):
    """Inference picks the grouped matmul on stacked weights; without stacking, per-expert matmuls on
    plain weights; with hooks or autograd, the expert modules themselves. All equal the reference."""
    x = torch.randn(3, 7, 256)
    with torch.no_grad():
        ref = moe_reference(moe, x)
    moe.experts.grouped = path == "stacked"
    calls = []
    if path == "modules":
        moe.experts[0].register_forward_hook(lambda *a: calls.append(1))
        moe.gate.e_score_correction_bias[0] = 5.0  # make sure expert 0 is used
        with torch.no_grad():
            ref = moe_reference(moe, x)
        calls.clear()
    before = {k: v.clone() for k, v in moe.state_dict().items()}
    with torch.no_grad():
        out = moe(x)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (moe.experts._stack is not None) == (path == "stacked")
    assert (len(calls) > 0) == (path == "modules")
    after = moe.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_stacking_ends_when_weights_change(moe):
    x = torch.randn(5, 256)
    with torch.no_grad():
        moe(x)
        gate_up = moe.experts._stack[0]
        assert moe.experts[3].gate_proj.weight.data_ptr() == gate_up[3].data_ptr()
        moe.to(torch.float64)  # every parameter replaced
        out = moe(x.double())
    assert moe.experts._stack is None  # grouped matmul has no float64: per-expert matmuls
    torch.testing.assert_close(out, moe_reference(moe, x.double()))
