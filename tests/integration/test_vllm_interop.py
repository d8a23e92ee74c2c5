"""Opt-in: our exports served by vLLM's CPU build give our greedy tokens (issue: exports that serve).

Needs the separate vLLM environment (``bash scripts/setup_vllm.sh`` -> ``.venv-vllm``, or ``DSV3_VLLM_PYTHON``
pointing at a python that imports vllm); skipped without it, so CI never pays the 3.4 GB install. vLLM runs in
its own process through ``scripts/vllm_greedy.py``, reading the checkpoint directory as a server would; prompts
go in as token ids, so tokenizers play no part in the comparison.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch

import modeling_deepseekv3 as ds
from helpers import input_ids, load
from modeling_deepseekv3.checkpoint.tiny import SERVABLE_DIMS

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = Path(os.environ.get("DSV3_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
SHIPPED = ROOT / "models" / "shakespeare-deepseek-v3"
NEW = 16

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason="no vLLM environment (bash scripts/setup_vllm.sh)"),
]


def has_amx() -> bool:
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    return "amx_tile" in flags


def vllm_greedy(model_dir: Path, prompts: list[list[int]], tmp_path: Path, mtp: int = 0, dtype="float32") -> list[list[int]]:
    spec = tmp_path / "prompts.json"
    spec.write_text(json.dumps(prompts))
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"))
    proc = subprocess.run([str(VLLM_PYTHON), str(ROOT / "scripts" / "vllm_greedy.py"), str(model_dir), "--prompts",
                           str(spec), "--max-new-tokens", str(NEW), "--mtp", str(mtp), "--dtype", dtype],
                          capture_output=True, text=True, timeout=900, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])["tokens"]


def ours_greedy(model_dir: Path, prompts: list[list[int]]) -> list[list[int]]:
    model = load(model_dir)
    out = []
    for p in prompts:  # one by one: no padding on either side
        ids = torch.tensor([p])
        out.append(model.generate(ids, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False)[0, len(p):].tolist())
    return out


def prompts_for(vocab: int) -> list[list[int]]:
    return [input_ids(1, n, vocab=vocab, seed=s)[0].tolist() for s, n in ((0, 5), (1, 12), (2, 9))]


@pytest.fixture(scope="module")
def servable(tmp_path_factory):
    root = tmp_path_factory.mktemp("servable")
    bf16 = ds.make_tiny_checkpoint(root / "bf16", fp8=False, overrides=SERVABLE_DIMS)
    fp8 = ds.make_tiny_checkpoint(root / "fp8", fp8=True, scale_fmt="ue8m0", overrides=SERVABLE_DIMS)
    fp8_as_bf16 = ds.convert_checkpoint(fp8, root / "fp8-as-bf16", to="bf16")
    return {"bf16": Path(bf16), "fp8": Path(fp8), "fp8_as_bf16": Path(fp8_as_bf16)}


def test_bf16_export_serves_with_our_tokens(servable, tmp_path):
    prompts = prompts_for(1024)
    assert vllm_greedy(servable["bf16"], prompts, tmp_path) == ours_greedy(servable["bf16"], prompts)


def test_fp8_converted_to_bf16_serves_with_our_fp8_tokens(servable, tmp_path):
    """ue8m0 scales: the BF16 conversion of FP8 is exact, so vLLM on it must reproduce ours on the FP8 original."""
    prompts = prompts_for(1024)
    assert vllm_greedy(servable["fp8_as_bf16"], prompts, tmp_path) == ours_greedy(servable["fp8"], prompts)


def test_mtp_speculative_decoding_serves(servable, tmp_path):
    prompts = prompts_for(1024)
    assert vllm_greedy(servable["bf16"], prompts, tmp_path, mtp=1) == ours_greedy(servable["bf16"], prompts)


@pytest.mark.skipif(not (SHIPPED / "config.json").exists(), reason="no shipped model in this checkout")
def test_shipped_model_serves(tmp_path):
    """The trained model's FP8 checkpoint, converted to BF16 for vLLM: our greedy tokens on the FP8 original."""
    bf16 = ds.convert_checkpoint(SHIPPED, tmp_path / "shipped-bf16", to="bf16")
    tok = ds.load_tokenizer(SHIPPED)
    text = ["KING HENRY.\nNow, lords, to France;", "LADY MACBETH.\nOut, damned spot!", "HAMLET.\nTo be, or not"]
    prompts = [tok(t, add_special_tokens=False).input_ids for t in text]
    assert vllm_greedy(Path(bf16), prompts, tmp_path) == ours_greedy(SHIPPED, prompts)


@pytest.mark.skipif(not has_amx(), reason="vLLM's CPU FP8 block-scaled kernel needs AMX")
def test_fp8_export_serves_directly_on_amx(tmp_path):
    """vLLM's FP8 path quantizes activations per 1x128 tile (W8A8) where ours keeps them in the compute dtype, so
    tokens may part after a while on a random model; on the trained model the first tokens must agree."""
    model = SHIPPED if (SHIPPED / "config.json").exists() else None
    if model is None:
        pytest.skip("needs the shipped model (a random tiny model's greedy choice is too close to call)")
    tok = ds.load_tokenizer(model)
    prompts = [tok("KING HENRY.\nNow, lords, to France;", add_special_tokens=False).input_ids]
    theirs, ours = vllm_greedy(model, prompts, tmp_path, dtype="bfloat16"), ours_greedy(model, prompts)
    agree = next((i for i, (a, b) in enumerate(zip(theirs[0], ours[0])) if a != b), NEW)
    assert agree >= 4, (theirs, ours)
