"""``deepseek-v3 pretrain`` never damages what it did not write, and ``--resume`` loads only what it checked.

Each test replays an attack that once did damage with exit 0: a log written over the training data, a model card
and an FP8 folder written over a user's files, an earlier run's tokenizer picked up by a new run, a flipped byte
resumed silently, a crafted DCP ``.metadata`` pickle that ran code, and DCP's ``CheckpointException`` escaping as a
raw traceback."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import ROOT, corpus
from modeling_deepseekv3.cli import main as cli
from modeling_deepseekv3.distributed.checkpoint import TrainingCheckpointError, latest_checkpoint
from modeling_deepseekv3.training.pretrain import PretrainArgs, PretrainError, pretrain


@pytest.fixture(scope="module")
def texts(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    (root / "train").mkdir()
    corpus(root / "train" / "a.txt", 400, 0)
    corpus(root / "train" / "b.txt", 400, 1)
    corpus(root / "eval.txt", 100, 2)
    return root


def args(texts, out, **kw) -> PretrainArgs:
    base = dict(
        model_config="tiny",
        data=[str(texts / "train")],
        vocab_size=512,
        output=str(out),
        seq_len=32,
        global_batch_size=4,
        steps=2,
        lr=3e-3,
        warmup_steps=1,
        log_json=str(Path(out) / "log.jsonl"),
        progress=False,
        export=False,
    )
    base.update(kw)
    return PretrainArgs(**base)


def snapshot(root: Path) -> dict[str, bytes]:
    """Every file under ``root`` with its bytes (to prove nothing was touched)."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.slow  # a fresh interpreter importing torch: ~6-12 s on 2 shared cores
def test_log_json_onto_the_data_is_refused_in_a_real_process(texts, tmp_path):
    """Attack 1: ``--log-json`` naming the training file deleted it and wrote the log in its place, exit 0."""
    data = texts / "train" / "a.txt"
    before = data.read_bytes()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "modeling_deepseekv3",
            "pretrain",
            "--model-config",
            "tiny",
            "--data",
            str(data),
            "--vocab-size",
            "512",
            "--output",
            str(tmp_path / "run"),
            "--log-json",
            str(data),
            "--steps",
            "2",
            "--seq-len",
            "32",
            "--global-batch-size",
            "4",
            "--quiet",
            "--no-export",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and "--log-json" in err[0] and f"is the --data path {data.resolve()}" in err[0], err
    assert data.read_bytes() == before
    assert not (tmp_path / "run").exists()  # refused before any work


@pytest.mark.parametrize("how", ["symlink", "relative", "output-contains-data", "output-is-config", "tokenizer"])
def test_writers_never_write_into_their_inputs(texts, tmp_path, monkeypatch, how):
    before = snapshot(texts)
    if how == "symlink":  # a link to the data is the data
        link = tmp_path / "log.jsonl"
        link.symlink_to(texts / "train" / "b.txt")
        kw, match = {"log_json": str(link)}, "is the --data path"
    elif how == "relative":  # another spelling of the same file
        monkeypatch.chdir(texts / "train")
        kw, match = {"log_json": "../train/./a.txt", "output": str(tmp_path / "o")}, "is the --data path"
    elif how == "output-contains-data":  # README.md / tokenizer/ ... would land on the data
        kw, match = {"output": str(texts), "data": [str(texts / "train" / "a.txt")]}, "contains the --data path"
    elif how == "output-is-config":
        cfg = tmp_path / "cfg"
        cfg.mkdir()
        from importlib.resources import files

        (cfg / "config.json").write_text((files("modeling_deepseekv3.training") / "presets" / "tiny.json").read_text())
        kw, match = {"model_config": str(cfg), "output": str(cfg)}, "is the --model-config path"
        before_cfg = (cfg / "config.json").read_bytes()
    else:
        tok = tmp_path / "tok"
        tok.mkdir()
        (tok / "tokenizer.json").write_text("{}")
        kw, match = {"tokenizer": str(tok), "vocab_size": None, "log_json": str(tok / "tokenizer.json")}, "inside"
    with pytest.raises(PretrainError, match=match):
        pretrain(args(texts, tmp_path / "run", **kw))
    assert snapshot(texts) == before
    if how == "output-is-config":
        assert (cfg / "config.json").read_bytes() == before_cfg and sorted(os.listdir(cfg)) == ["config.json"]


def _user_folder(root: Path) -> dict[str, bytes]:
    root.mkdir()
    (root / "README.md").write_text("# my project\n\nnotes I keep here\n")
    (root / "fp8").mkdir()
    (root / "fp8" / "my_weights.txt").write_text("keep me\n")
    (root / "notes.txt").write_text("mine\n")
    return snapshot(root)


def test_output_with_user_files_is_refused_and_kept(texts, tmp_path):
    """Attack 2: a used --output had its README.md overwritten and its fp8/ (holding a user file) replaced."""
    out = tmp_path / "mine"
    before = _user_folder(out)
    with pytest.raises(PretrainError, match=r"not empty: it holds files this command did not write \(notes\.txt"):
        pretrain(args(texts, out, export=True))
    assert snapshot(out) == before
    # --overwrite replaces only this command's own outputs; README.md and fp8/ hold the user's, so: refused
    with pytest.raises(PretrainError, match=r"replaces its own README\.md, fp8 whole.*README\.md, fp8/my_weights\.txt"):
        pretrain(args(texts, out, export=True, overwrite=True))
    assert snapshot(out) == before


def test_overwrite_writes_beside_user_files_and_keeps_them(texts, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    (out / "data").mkdir()
    (out / "data" / "x.bin").write_bytes(b"\x00\x01")
    before = snapshot(out)
    summary = pretrain(args(texts, out, export=True, overwrite=True))
    assert summary["steps"] == 2 and (out / "fp8" / "config.json").is_file() and (out / "README.md").is_file()
    after = snapshot(out)
    assert {k: after[k] for k in before} == before
    # a second --overwrite replaces the first run's outputs (its own), still keeping the user's files
    pretrain(args(texts, out, overwrite=True, steps=3))
    assert not (out / "fp8").exists() and sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-0000003"]
    assert json.loads((out / "summary.json").read_text())["steps"] == 3
    assert {k: snapshot(out)[k] for k in before} == before
    with pytest.raises(PretrainError, match="pass one of them"):
        pretrain(args(texts, out, overwrite=True, resume=True))


def test_resume_refuses_to_rewrite_a_user_readme(texts, tmp_path):
    out = tmp_path / "run"
    pretrain(args(texts, out, export=True))
    (out / "README.md").write_text("# my own notes on this run\n")
    before = snapshot(out)
    with pytest.raises(PretrainError, match=r"replaces its own README\.md whole"):
        pretrain(args(texts, out, export=True, resume=True, steps=3))
    assert snapshot(out) == before


def test_a_new_run_never_reuses_an_earlier_runs_tokenizer(texts, tmp_path):
    """Attack 7: a new run into an earlier run's folder silently took its tokenizer and ignored --vocab-size."""
    out = tmp_path / "run"
    pretrain(args(texts, out, vocab_size=512))
    old = (out / "tokenizer" / "tokenizer.json").read_bytes()
    with pytest.raises(PretrainError, match=r"holds an earlier run \(checkpoints, log\.jsonl.*--resume.*--overwrite"):
        pretrain(args(texts, out, vocab_size=300))
    assert (out / "tokenizer" / "tokenizer.json").read_bytes() == old
    pretrain(args(texts, out, vocab_size=300, overwrite=True))
    new = json.loads((out / "tokenizer" / "tokenizer.json").read_text())
    assert len(new["model"]["vocab"]) <= 300 < len(json.loads(old)["model"]["vocab"])  # retrained per the new flags
    # --resume continues with the run's own tokenizer (the one it trained on)
    summary = pretrain(args(texts, out, vocab_size=300, resume=True, steps=3))
    assert summary["steps"] == 3 and json.loads((out / "tokenizer" / "tokenizer.json").read_text()) == new


def test_foreign_log_json_is_not_replaced(texts, tmp_path):
    diary = tmp_path / "diary.jsonl"
    diary.write_text('"not a training log"\n')
    with pytest.raises(PretrainError, match="is not a log written by this command"):
        pretrain(args(texts, tmp_path / "run", log_json=str(diary)))
    assert diary.read_text() == '"not a training log"\n'


@pytest.fixture
def two_checkpoints(texts, tmp_path):
    out = tmp_path / "run"
    pretrain(args(texts, out, steps=4, save_every=2))
    root = out / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-0000002", "step-0000004"]
    return out


def test_a_changed_byte_is_refused_naming_the_file_and_the_intact_step(texts, two_checkpoints):
    """Attack 6: bytes changed in a training checkpoint resumed silently with other weights."""
    out = two_checkpoints
    shard = out / "checkpoints" / "step-0000004" / "__0_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    with pytest.raises(
        TrainingCheckpointError,
        match=r"step-0000004/__0_0\.distcp changed since it was written.*"
        r"newest intact checkpoint is \S+step-0000002 \(step 2\)",
    ):
        pretrain(args(texts, out, steps=6, save_every=2, resume=True))
    # the suggestion works: with the damaged step moved aside, the run resumes from step 2
    (out / "checkpoints" / "step-0000004").rename(out / "damaged-step-4")
    assert pretrain(args(texts, out, steps=5, resume=True))["steps"] == 5


def test_a_missing_file_and_no_intact_checkpoint(texts, two_checkpoints):
    out = two_checkpoints
    (out / "checkpoints" / "step-0000004" / ".metadata").unlink()
    shard = out / "checkpoints" / "step-0000002" / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-1])
    with pytest.raises(TrainingCheckpointError, match=r"step-0000004/\.metadata is missing.*no older .* is intact"):
        pretrain(args(texts, out, steps=6, resume=True))


class _Marker:
    """Unpickling this object would create ``path`` -- the stand-in for arbitrary code."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (exec, (f"open({self.path!r}, 'w').write('pwned')",))


def test_a_crafted_metadata_pickle_never_runs(texts, two_checkpoints, tmp_path):
    """Attack 5: DCP's ``.metadata`` is a pickle; a crafted one ran code on --resume. Here the attacker also
    rewrites meta.json's sha256 (they control the folder), so only the restricted unpickler stands in the way."""
    out, marker = two_checkpoints, tmp_path / "marker"
    step = out / "checkpoints" / "step-0000004"
    real = pickle.loads((step / ".metadata").read_bytes())  # (our own file: trusted here)
    real.planner_data["evil"] = _Marker(str(marker))  # hidden deep inside a genuine metadata record
    (step / ".metadata").write_bytes(pickle.dumps(real))
    meta = json.loads((step / "meta.json").read_text())
    meta["files"][".metadata"] = hashlib.sha256((step / ".metadata").read_bytes()).hexdigest()
    (step / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(
        TrainingCheckpointError,
        match=r"holds objects no checkpoint of this command contains.*"
        r"builtins\.exec is not part of a DCP checkpoint's metadata",
    ):
        pretrain(args(texts, out, steps=6, resume=True))
    assert not marker.exists()


def test_non_tensor_values_load_weights_only(tmp_path):
    """DCP's planner loads byte items (optimizer hyper-parameters, the loop state) with weights_only=False."""
    from modeling_deepseekv3.distributed.checkpoint import _WeightsOnlyPlanner

    marker = tmp_path / "marker"
    crafted = io.BytesIO()
    torch.save(_Marker(str(marker)), crafted)
    crafted.seek(0)
    with pytest.raises(pickle.UnpicklingError):
        _WeightsOnlyPlanner().load_bytes(None, crafted)
    assert not marker.exists()


def _common(texts, out):
    return [
        "pretrain",
        "--model-config",
        "tiny",
        "--data",
        str(texts / "train"),
        "--vocab-size",
        "512",
        "--seq-len",
        "32",
        "--global-batch-size",
        "4",
        "--quiet",
        "--no-export",
        "--save-every",
        "2",
        "--output",
        str(out),
    ]


def test_dcp_failures_are_one_line_errors_naming_the_intact_step(texts, tmp_path, monkeypatch, capsys):
    """WEAK: a real DCP failure raises CheckpointException (a BaseException), which escaped as a traceback."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader, FileSystemWriter

    out = tmp_path / "run"
    real_write, calls = FileSystemWriter.write_data, {"n": 0}

    def disk_full_at_second_save(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_write(self, *a, **k)

    monkeypatch.setattr(FileSystemWriter, "write_data", disk_full_at_second_save)
    capsys.readouterr()
    assert cli([*_common(texts, out), "--steps", "6"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "checkpoint of step 4" in err[0] and "No space left on device" in err[0] and "step-0000002" in err[0]
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-0000002"]
    monkeypatch.setattr(FileSystemWriter, "write_data", real_write)

    def unreadable(self, *a, **k):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(FileSystemReader, "read_data", unreadable)
    assert cli([*_common(texts, out), "--steps", "6", "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Input/output error" in err[0] and "step-0000002" in err[0], err
    assert latest_checkpoint(out / "checkpoints").name == "step-0000002"
