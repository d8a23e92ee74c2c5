"""Reliability round 3: each case reproduced on real files and, for the CLI, in a real subprocess.

* A config.json whose layer / expert / MTP count the checkpoint cannot fill fails in milliseconds, before the
  model skeleton is built (it took minutes and gigabytes, then a MemoryError).
* NaN / Infinity in a YaRN parameter or a scale, or a rope_scaling that is not an object, is refused naming the
  field (it gave NaN logits, or an AttributeError).
* make-tiny never deletes a folder it did not write: a non-empty folder needs --overwrite, and even then only a
  folder holding nothing but a tiny checkpoint is replaced.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time

import pytest

import modeling_deepseekv3 as ds
from helpers import ROOT, load
from modeling_deepseekv3.cli import main as cli

# Generous next to the milliseconds the check takes, tiny next to the minutes the skeleton took.
FAST_S = 3.0


def edited_copy(src, dst, **changes):
    """A copy of a checkpoint written by make_tiny_checkpoint, with config.json fields changed."""
    shutil.copytree(src, dst)
    config = json.loads((dst / "config.json").read_text())
    config.update(changes)
    (dst / "config.json").write_text(json.dumps(config))
    return dst


def make_tiny_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "modeling_deepseekv3", "make-tiny", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )


def user_folder(path):
    """A folder of someone's own files, one of them in a subfolder."""
    (path / "data").mkdir(parents=True)
    (path / "notes.txt").write_text("my notes")
    (path / "data" / "results.csv").write_text("a,b\n1,2\n")
    return path


def assert_user_files_intact(path):
    assert (path / "notes.txt").read_text() == "my notes"
    assert (path / "data" / "results.csv").read_text() == "a,b\n1,2\n"


# ---- case 9: sizes the checkpoint cannot fill fail before anything is built -------------------------------


@pytest.mark.parametrize(
    "changes,field,stored",
    [
        ({"num_hidden_layers": 100_000}, "num_hidden_layers=100000", "3 decoder layers"),
        ({"n_routed_experts": 1_000_000}, "`n_routed_experts` is 1000000", "16 routed experts per MoE layer"),
        ({"num_nextn_predict_layers": 100_000}, "`num_nextn_predict_layers` is 100000", "1 MTP layer"),
    ],
    ids=["layers", "experts", "mtp_layers"],
)
def test_absurd_sizes_fail_before_the_skeleton_is_built(tiny_fp8, tmp_path, changes, field, stored):
    ckpt = edited_copy(tiny_fp8, tmp_path / "ckpt", **changes)
    start = time.perf_counter()
    with pytest.raises(ds.CheckpointError) as info:
        load(ckpt)
    elapsed = time.perf_counter() - start
    message = str(info.value)
    assert field in message and stored in message and "restore the checkpoint's own config.json" in message
    assert str(ckpt) in message and "Refused before building the model" in message
    assert elapsed < FAST_S, f"took {elapsed:.1f} s: the skeleton was built before the check"


def test_size_given_to_from_pretrained_is_checked_too(tiny_fp8):
    start = time.perf_counter()
    with pytest.raises(ds.CheckpointError, match="num_hidden_layers=100000"):
        load(tiny_fp8, num_hidden_layers=100_000)
    assert time.perf_counter() - start < FAST_S


# ---- case 10: non-finite floats and a rope_scaling of the wrong type name the field ----------------------


@pytest.mark.parametrize(
    "change,field",
    [
        ({"mscale": float("nan")}, "rope_scaling.mscale"),
        ({"mscale_all_dim": float("inf")}, "rope_scaling.mscale_all_dim"),
        ({"factor": float("nan")}, "rope_scaling.factor"),
    ],
)
def test_non_finite_yarn_value_in_config_json_is_refused(tiny_fp8, tmp_path, change, field):
    rope = {**json.loads((tiny_fp8 / "config.json").read_text())["rope_scaling"], **change}
    ckpt = edited_copy(tiny_fp8, tmp_path / "ckpt", rope_scaling=rope)
    assert "NaN" in (ckpt / "config.json").read_text() or "Infinity" in (ckpt / "config.json").read_text()
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        load(ckpt)


def test_non_finite_routed_scaling_factor_in_config_json_is_refused(tiny_fp8, tmp_path):
    ckpt = edited_copy(tiny_fp8, tmp_path / "ckpt", routed_scaling_factor=float("nan"))
    with pytest.raises(ValueError, match=r"routed_scaling_factor.*finite"):
        load(ckpt)


@pytest.mark.parametrize("rope_scaling", ["yarn", ["yarn", 40]], ids=["string", "list"])
def test_rope_scaling_of_the_wrong_type_names_the_field(tiny_fp8, tmp_path, rope_scaling):
    ckpt = edited_copy(tiny_fp8, tmp_path / "ckpt", rope_scaling=rope_scaling)
    with pytest.raises(ValueError, match=r"`rope_scaling` must be a JSON object"):
        load(ckpt)


# ---- case 8: make-tiny never deletes what it did not write ----------------------------------------------


def test_cli_make_tiny_refuses_a_users_folder(tmp_path):
    target = user_folder(tmp_path / "mine")
    result = make_tiny_cli(str(target))
    assert result.returncode == 2, result.stderr
    assert "already exists and is not empty" in result.stderr and "--overwrite" in result.stderr
    assert_user_files_intact(target)


def test_cli_make_tiny_overwrite_still_refuses_a_users_folder(tmp_path):
    target = user_folder(tmp_path / "mine")
    result = make_tiny_cli(str(target), "--overwrite")
    assert result.returncode == 2, result.stderr
    assert "not files make-tiny writes: data/, notes.txt" in result.stderr
    assert_user_files_intact(target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mine"]  # no staging leftovers either


def test_cli_make_tiny_overwrite_replaces_its_own_output(tmp_path):
    target = ds.make_tiny_checkpoint(tmp_path / "tiny", fp8=False, mtp=False, num_shards=3, tokenizer=False)
    assert len(list(target.glob("*.safetensors"))) == 3
    # in-process (the two tests above run the real subprocess): writing a checkpoint there too doubles the time
    assert cli(["make-tiny", str(target), "--overwrite", "--bf16", "--no-mtp", "--shards", "1"]) == 0
    assert sorted(p.name for p in target.glob("*.safetensors")) == ["model-00001-of-000001.safetensors"]
    assert (target / "tokenizer.json").is_file()


def test_make_tiny_api_refuses_without_overwrite_and_keeps_extra_files(tmp_path):
    target = ds.make_tiny_checkpoint(tmp_path / "tiny", fp8=False, mtp=False, tokenizer=False)
    before = sorted(p.name for p in target.iterdir())
    with pytest.raises(FileExistsError, match="already exists and is not empty"):
        ds.make_tiny_checkpoint(target, fp8=False, mtp=False, tokenizer=False)
    (target / "README.md").write_text("my write-up")  # the user's file next to the tiny checkpoint
    with pytest.raises(FileExistsError, match=r"not files make-tiny writes: README\.md"):
        ds.make_tiny_checkpoint(target, fp8=False, mtp=False, tokenizer=False, overwrite=True)
    assert (target / "README.md").read_text() == "my write-up"
    assert sorted(p.name for p in target.iterdir()) == sorted([*before, "README.md"])
    (target / "README.md").unlink()
    ds.make_tiny_checkpoint(target, fp8=False, mtp=False, tokenizer=False, seed=1, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == before


def test_make_tiny_overwrite_needs_a_checkpoint_not_just_known_names(tmp_path):
    loose = tmp_path / "loose"
    loose.mkdir()
    (loose / "tokenizer.json").write_text("{}")  # a name make-tiny writes, but no checkpoint around it
    with pytest.raises(FileExistsError, match=r"lacks config\.json"):
        ds.make_tiny_checkpoint(loose, fp8=False, mtp=False, tokenizer=False, overwrite=True)
    assert (loose / "tokenizer.json").read_text() == "{}"
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(FileExistsError, match="not a directory"):
        ds.make_tiny_checkpoint(a_file, fp8=False, mtp=False, tokenizer=False, overwrite=True)
    assert a_file.read_text() == "x"


def test_make_tiny_writes_into_an_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    out = ds.make_tiny_checkpoint(tmp_path / "empty", fp8=False, mtp=False, tokenizer=False)
    assert (out / "config.json").is_file()
