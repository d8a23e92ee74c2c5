"""RoPE: YaRN frequencies and softmax scale per the spec, interleaved pairs vs transformers' layout."""

from __future__ import annotations

import math

import pytest
import torch
import transformers
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

import modeling_deepseekv3 as ds
from modeling_deepseekv3.core.rope import apply_rope, rope_inv_freq, softmax_scale

V3_ROPE = {
    "type": "yarn",
    "factor": 40,
    "original_max_position_embeddings": 4096,
    "beta_fast": 32,
    "beta_slow": 1,
    "mscale": 1.0,
    "mscale_all_dim": 1.0,
}


def test_v3_yarn_frequencies_follow_the_spec():
    cfg = ds.DeepseekV3Config(rope_scaling=dict(V3_ROPE), rope_theta=10000)
    inv_freq, cos_sin_scale = rope_inv_freq(cfg)
    base = 1.0 / (10000 ** (torch.arange(0, 64, 2, dtype=torch.float64) / 64))
    # spec §5.4: low = 10, high = 23; slots <= 10 keep the base frequency, slots >= 23 are divided by 40
    torch.testing.assert_close(inv_freq[:11].double(), base[:11], rtol=1e-6, atol=0)
    torch.testing.assert_close(inv_freq[23:].double(), base[23:] / 40, rtol=1e-6, atol=0)
    ramp = (16 - 10) / 13
    assert inv_freq[16].item() == pytest.approx(base[16].item() * (1 - ramp) + base[16].item() / 40 * ramp, rel=1e-6)
    assert cos_sin_scale == 1.0
    assert softmax_scale(cfg) == pytest.approx(192**-0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert softmax_scale(cfg) == pytest.approx(0.1352338, abs=1e-7)


@pytest.mark.parametrize(
    "rope", [V3_ROPE, {**V3_ROPE, "factor": 32, "beta_fast": 1, "beta_slow": 1}], ids=["v3", "kimi"]
)
def test_yarn_matches_transformers(rope):
    ours = ds.DeepseekV3Config(rope_scaling=dict(rope), rope_theta=50000)
    native = transformers.DeepseekV3Config(rope_scaling=dict(rope), rope_theta=50000)
    theirs, attention_factor = ROPE_INIT_FUNCTIONS["yarn"](native)
    inv_freq, scale = rope_inv_freq(ours)
    torch.testing.assert_close(inv_freq, theirs.float(), rtol=1e-6, atol=0)
    assert scale == pytest.approx(attention_factor)


def test_interleaved_rotation_is_complex_multiplication():
    x = torch.randn(2, 3, 5, 16)
    angles = torch.rand(2, 1, 5, 8) * 10
    out = apply_rope(x, angles.cos(), angles.sin(), interleaved=True)
    ref = torch.view_as_real(
        torch.view_as_complex(x.reshape(2, 3, 5, 8, 2)) * torch.polar(torch.ones_like(angles), angles)
    )
    torch.testing.assert_close(out, ref.flatten(-2))


def test_interleaved_equals_transformers_layout_up_to_permutation():
    """transformers de-interleaves then applies rotate_half: same values, permuted; same dot products."""
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

    q, k = torch.randn(1, 2, 6, 16), torch.randn(1, 1, 6, 16)
    angles = torch.rand(1, 6, 8) * 5
    cos, sin = angles.cos(), angles.sin()
    ours_q = apply_rope(q, cos[:, None], sin[:, None])
    ours_k = apply_rope(k, cos[:, None], sin[:, None])
    hf_q, hf_k = apply_rotary_pos_emb_interleave(q, k, torch.cat((cos, cos), -1), torch.cat((sin, sin), -1))
    perm = torch.cat((torch.arange(0, 16, 2), torch.arange(1, 16, 2)))
    torch.testing.assert_close(ours_q[..., perm], hf_q)
    torch.testing.assert_close(ours_q @ ours_k.transpose(-1, -2), hf_q @ hf_k.transpose(-1, -2))


def test_half_rotation_for_prepermuted_weights():
    x = torch.randn(1, 1, 4, 8)
    angles = torch.rand(1, 1, 4, 4)
    perm = torch.cat((torch.arange(0, 8, 2), torch.arange(1, 8, 2)))
    torch.testing.assert_close(
        apply_rope(x[..., perm], angles.cos(), angles.sin(), interleaved=False),
        apply_rope(x, angles.cos(), angles.sin(), interleaved=True)[..., perm],
    )


def test_rope_not_cast_by_model_dtype(tiny_fp8):
    from helpers import load

    model = load(tiny_fp8, dtype=torch.bfloat16)
    cos, _ = model.model.rotary_emb(torch.arange(8)[None])
    assert cos.dtype == torch.float32
