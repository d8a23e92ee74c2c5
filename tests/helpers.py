"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import random
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


WORDS = ("the king queen lord lady sword crown night day love death fair foul heart blood hand eye soul speak "
         "come go tell know see hear thou thee thy my our what why when where shall will must doth hath art").split()


def corpus(path, n_lines: int, seed: int):
    """A small text file of random sentences over :data:`WORDS` (pretraining tests: learnable, reproducible)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):  # sentences with a little structure: "WORD WORD, WORD." repeated patterns
        k = rng.randint(4, 9)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + rng.choice([".", "!", "?", ","]))
    path.write_text("\n".join(lines) + "\n")
    return path
