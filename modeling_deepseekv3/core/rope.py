"""Rotary position embedding for the 64 rope dims of MLA: YaRN frequencies and interleaved pairs.

docs/deepseek_v3.md §5.4–5.5. Only ``qk_rope_head_dim`` dims are rotated. The released weights expect *adjacent-pair*
rotation: elements ``(2j, 2j+1)`` form complex number ``j`` rotated by ``theta_{p,j}``, and the output
stays interleaved. (transformers instead de-interleaves to ``[x0, x2, ...; x1, x3, ...]`` and applies
``rotate_half``; dot products are identical, the rotated vectors are permuted.) Configs with
``rope_interleave=False`` hold weights pre-permuted for ``rotate_half`` and get that formula.

YaRN: frequency slots below ``low`` keep the base frequency, slots above ``high`` are divided by
``factor``, a linear ramp blends in between. The attention-magnitude correction ``mscale(factor,
mscale_all_dim)**2`` belongs to the *softmax scale* (it multiplies the whole 192-d logit), which is why
:func:`softmax_scale` and not the cos/sin carries it; cos/sin carry ``mscale(f, mscale) / mscale(f,
mscale_all_dim)``, which is 1.0 for every released config. Angles are computed in float32.

Also, for context-extension experiments on top of the released models (transformers' own rope types, same
meaning): ``linear`` divides every frequency by ``factor`` (position interpolation); ``dynamic`` (NTK-aware)
keeps the base frequencies up to ``max_position_embeddings`` and beyond that raises the base to
``base * (factor * L / max_pos - (factor - 1)) ** (D / (D - 2))`` for the longest position L of the call. As
in transformers, keys already in a cache keep the rotation they were written with.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from .configuration import ROPE_TYPES, check_rope_type, rope_type, yarn_get_mscale

__all__ = ["ROPE_TYPES", "RotaryEmbedding", "apply_rope", "dynamic_inv_freq", "rope_inv_freq", "softmax_scale"]


def _yarn_correction_dim(num_rotations: float, dim: int, base: float, max_pos: int) -> float:
    return (dim * math.log(max_pos / (num_rotations * 2 * math.pi))) / (2 * math.log(base))


def _base_inv_freq(dim: int, base: float) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float64) / dim))  # (D/2,) float64


def dynamic_inv_freq(config, seq_len: int) -> torch.Tensor:
    """``dynamic`` (NTK-aware) inverse frequencies for a call whose longest position is ``seq_len`` (module
    docstring); the base ones up to ``max_position_embeddings``. float32, CPU."""
    dim, base, max_pos = config.qk_rope_head_dim, config.rope_theta, config.max_position_embeddings
    if seq_len > max_pos:
        factor = float(config.rope_parameters["factor"])
        base = base * ((factor * seq_len / max_pos) - (factor - 1)) ** (dim / (dim - 2))
    return _base_inv_freq(dim, base).to(torch.float32)


def rope_inv_freq(config) -> tuple[torch.Tensor, float]:
    """Inverse frequencies ``[qk_rope_head_dim // 2]`` (float32, CPU) and the cos/sin multiplier (for
    ``dynamic``: those of positions within ``max_position_embeddings``)."""
    check_rope_type(config)
    dim = config.qk_rope_head_dim
    base = config.rope_theta
    inv_freq = _base_inv_freq(dim, base)
    kind = rope_type(config)
    if kind == "linear":
        return (inv_freq / float(config.rope_parameters["factor"])).to(torch.float32), 1.0
    yarn = config.yarn_parameters
    if yarn is None:
        return inv_freq.to(torch.float32), 1.0
    factor = float(yarn["factor"])
    beta_fast = float(yarn.get("beta_fast") or 32)
    beta_slow = float(yarn.get("beta_slow") or 1)
    orig = int(yarn["original_max_position_embeddings"])
    low = math.floor(_yarn_correction_dim(beta_fast, dim, base, orig))
    high = math.ceil(_yarn_correction_dim(beta_slow, dim, base, orig))
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # degenerate ramp (e.g. beta_fast == beta_slow)
    ramp = ((torch.arange(dim // 2, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)
    inv_freq = inv_freq * (1 - ramp) + (inv_freq / factor) * ramp
    mscale = yarn.get("mscale")
    mscale_all_dim = yarn.get("mscale_all_dim")
    if mscale is not None and mscale_all_dim is not None:
        cos_sin_scale = yarn_get_mscale(factor, mscale) / yarn_get_mscale(factor, mscale_all_dim)
    else:
        cos_sin_scale = yarn.get("attention_factor") or yarn_get_mscale(factor)
    return inv_freq.to(torch.float32), float(cos_sin_scale)


def softmax_scale(config) -> float:
    """``qk_head_dim ** -0.5``, times ``mscale(factor, mscale_all_dim) ** 2`` under YaRN.

    For V3: ``192 ** -0.5 * 1.3688879 ** 2 = 0.1352338`` (not 0.0722)."""
    scale = (config.qk_nope_head_dim + config.qk_rope_head_dim) ** -0.5
    yarn = config.yarn_parameters
    if yarn is not None and yarn.get("mscale_all_dim"):
        m = yarn_get_mscale(float(yarn["factor"]), float(yarn["mscale_all_dim"]))
        scale = scale * m * m
    return scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleaved: bool = True) -> torch.Tensor:
    """Rotate the last dim of ``x [..., S, D]`` by per-position angles; ``cos/sin [..., S, D/2]``.

    Computed in float32 and cast back to ``x.dtype`` (spec trap 2). ``interleaved`` rotates pairs
    ``(2j, 2j+1)`` and keeps them in place; otherwise the two halves ``(j, j + D/2)`` (rotate_half)."""
    dtype = x.dtype
    x = x.float()
    if interleaved:
        x1, x2 = x[..., 0::2], x[..., 1::2]  # (..., S, D/2) each
        out = torch.stack((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1)  # (..., S, D/2, 2)
        return out.flatten(-2).to(dtype)
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(dtype)


class RotaryEmbedding(nn.Module):
    """Computes ``cos, sin [B, S, D/2]`` (float32) for position ids.

    Holds no buffers: the 32 inverse frequencies are recomputed from the config per device and cached
    in a plain dict. That keeps them out of ``from_pretrained``'s meta-device materialization (which
    leaves non-persistent buffers as garbage) and out of ``model.to(bfloat16)`` (spec trap 2)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.interleaved = bool(config.rope_interleave)
        self._cache: dict[torch.device, tuple[torch.Tensor, float]] = {}
        check_rope_type(config)  # now, not at the first forward
        self.dynamic = rope_type(config) == "dynamic"

    def inv_freq(self, device: torch.device) -> tuple[torch.Tensor, float]:
        if device not in self._cache:
            inv_freq, attention_scale = rope_inv_freq(self.config)
            self._cache[device] = (inv_freq.to(device), attention_scale)
        return self._cache[device]

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq, attention_scale = self.inv_freq(position_ids.device)
        if self.dynamic and position_ids.numel():
            longest = int(position_ids.max()) + 1  # (a host sync, for dynamic scaling only)
            if longest > self.config.max_position_embeddings:
                inv_freq = dynamic_inv_freq(self.config, longest).to(position_ids.device)
        angles = position_ids[..., None].float() * inv_freq  # (B, S, D/2)
        cos, sin = angles.cos(), angles.sin()
        if attention_scale != 1.0:
            cos, sin = cos * attention_scale, sin * attention_scale
        return cos, sin
