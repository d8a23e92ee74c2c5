"""Shared fixtures: tiny official-layout checkpoints written once per session, deterministic seeds."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import modeling_deepseekv3 as ds
from helpers import corpus
from modeling_deepseekv3.checkpoint import TINY_CONFIG


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_and_dtype():
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    yield
    torch.set_default_dtype(default)


@pytest.fixture(scope="session")
def tiny_fp8(tmp_path_factory):
    """FP8, 3 shards, MTP layer, partial 128-blocks, YaRN, n_group 4 / topk_group 2, dense + MoE layers."""
    return ds.make_tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-fp8", num_shards=3, seed=0)


@pytest.fixture(scope="session")
def tiny_bf16_direct_q(tmp_path_factory):
    """Moonlight-style: BF16 weights, q_lora_rank null (direct q_proj), no MTP, no YaRN, eps 1e-5."""
    overrides = {
        "q_lora_rank": None,
        "rope_scaling": None,
        "rope_theta": 50000,
        "rms_norm_eps": 1e-5,
        "n_group": 1,
        "topk_group": 1,
        "n_shared_experts": 2,
    }
    return ds.make_tiny_checkpoint(
        tmp_path_factory.mktemp("ckpt") / "tiny-bf16", fp8=False, mtp=False, num_shards=2, seed=1, overrides=overrides
    )


@pytest.fixture(scope="session")
def tiny_config():
    return ds.DeepseekV3Config(**{k: v for k, v in TINY_CONFIG.items()})


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    """A tiny pretraining corpus (``train/a.txt``, ``train/b.txt``, ``eval.txt``), built once per module: tests
    may add files to it (and must remove them)."""
    root = tmp_path_factory.mktemp("corpus")
    (root / "train").mkdir()
    corpus(root / "train" / "a.txt", 600, 0)
    corpus(root / "train" / "b.txt", 600, 1)
    corpus(root / "eval.txt", 150, 2)
    return root
