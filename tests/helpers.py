"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

from pathlib import Path

import torch
import transformers

import modeling_deepseekv3 as ds
from modeling_deepseekv3.checkpoint import TINY_CONFIG

ROOT = Path(__file__).resolve().parents[1]


def load(path, **kwargs) -> ds.DeepseekV3ForCausalLM:
    """``from_pretrained`` in float32 unless told otherwise (tests compare numerics in fp32)."""
    kwargs.setdefault("dtype", torch.float32)
    return ds.DeepseekV3ForCausalLM.from_pretrained(path, **kwargs)


def input_ids(batch=2, seq=12, vocab=TINY_CONFIG["vocab_size"], seed=0):
    """Random token ids (never 0/1, the BOS/EOS ids), reproducible by ``seed``."""
    return torch.randint(2, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def native_from(model: ds.DeepseekV3ForCausalLM, tmp_path) -> transformers.DeepseekV3ForCausalLM:
    """transformers-native on our weights: dequantized by our code (fp32, exact), written by our
    save_pretrained in the official per-expert layout, loaded by native's own from_pretrained."""
    dense = ds.DeepseekV3ForCausalLM.from_pretrained(model.config.name_or_path, dtype=torch.float32, dequantize_fp8=True)
    dense.save_pretrained(tmp_path / "dense-fp32", storage_dtype=torch.float32)
    return transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "dense-fp32", dtype=torch.float32).eval()
