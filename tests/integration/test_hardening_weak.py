"""Issue 23's weak findings, each reproduced on real files.

* ``generate(cache_implementation="static", max_cache_len=2_000_000)`` ran for 14+ minutes allocating a cache
  past ``max_position_embeddings``; it is refused before allocating.
* An FP8 export killed mid-way left ``fp8.partial`` that made every later export fail; an interrupted
  conversion of this package's own is discarded under ``overwrite=True``, files it did not write are refused.
* A local ``./tiny`` folder silently replaced the ``tiny`` preset of ``--model-config``.
* The native-kernel fallback notice claimed identical results; it now says "within float rounding".
* ``check_local_checkout`` left ``config.json`` open.
"""

from __future__ import annotations

import gc
import json
import logging
import os
import shutil
import time
import warnings
from importlib.resources import files

import pytest
import torch

import modeling_deepseekv3 as ds
from helpers import ROOT, load
from modeling_deepseekv3.checkpoint.load import check_local_checkout
from modeling_deepseekv3.fp8 import native
from modeling_deepseekv3.training.pretrain import PretrainError, load_model_config


def test_a_static_cache_past_the_position_limit_is_refused_before_allocating(tiny_fp8):
    model = load(tiny_fp8)
    ids = torch.tensor([[1, 2, 3]])
    start = time.perf_counter()
    with pytest.raises(ValueError, match=r"max_cache_len=2000000 .*max_position_embeddings"):
        model.generate(ids, max_new_tokens=2, cache_implementation="static", max_cache_len=2_000_000)
    assert time.perf_counter() - start < 5
    out = model.generate(ids, max_new_tokens=2, do_sample=False, cache_implementation="static", max_cache_len=16)
    assert out.shape == (1, 5)  # a cache within the limit still works


def _interrupted_fp8_export(src, dst, monkeypatch):
    """Convert ``src`` to FP8 and kill it while it writes its second shard, as a killed export would."""
    import modeling_deepseekv3.checkpoint.convert as conversion

    real, calls = conversion.save_file, []

    def killed(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(conversion, "save_file", killed)
    with pytest.raises(KeyboardInterrupt):
        ds.convert_checkpoint(src, dst, to="fp8", overwrite=True, progress=False)
    monkeypatch.setattr(conversion, "save_file", real)
    gc.collect()  # the killed run's lock handle: closed as a dead process's would be


@pytest.fixture
def bf16_source(tiny_fp8, tmp_path):
    return ds.convert_checkpoint(tiny_fp8, tmp_path / "bf16", to="bf16", progress=False)


def test_a_killed_fp8_export_does_not_block_the_next_one(bf16_source, tmp_path, monkeypatch, caplog):
    dst = tmp_path / "fp8"
    _interrupted_fp8_export(bf16_source, dst, monkeypatch)
    partial = tmp_path / "fp8.partial"
    assert partial.is_dir() and not dst.exists()
    for shard in bf16_source.glob("*.safetensors"):  # pretrain re-exports its BF16 source: new mtimes
        os.utime(shard, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(FileExistsError, match=r"source shards changed.*overwrite=True"):
        ds.convert_checkpoint(bf16_source, dst, to="fp8", progress=False)  # without overwrite: kept, explained
    with caplog.at_level(logging.WARNING, logger="modeling_deepseekv3.checkpoint.convert"):
        out = ds.convert_checkpoint(bf16_source, dst, to="fp8", overwrite=True, progress=False)
    assert [r for r in caplog.records if "discarding" in r.getMessage()]
    assert not partial.exists() and load(out).config.is_fp8


def test_a_staging_folder_with_foreign_files_is_refused(bf16_source, tmp_path, monkeypatch):
    dst = tmp_path / "fp8"
    _interrupted_fp8_export(bf16_source, dst, monkeypatch)
    partial = tmp_path / "fp8.partial"
    (partial / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match=r"notes\.txt, which convert did not write"):
        ds.convert_checkpoint(bf16_source, dst, to="fp8", overwrite=True, progress=False)
    assert (partial / "notes.txt").read_text() == "mine"
    (partial / "notes.txt").unlink()
    out = ds.convert_checkpoint(bf16_source, dst, to="fp8", overwrite=True, progress=False)  # same source: resumes
    assert load(out).config.is_fp8


def test_a_local_folder_named_like_a_preset_is_ambiguous(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert load_model_config("tiny").hidden_size > 0  # no such folder: the preset
    (tmp_path / "tiny").mkdir()
    preset = json.loads((files("modeling_deepseekv3.training") / "presets" / "shakespeare.json").read_text())
    (tmp_path / "tiny" / "config.json").write_text(json.dumps(preset))
    with pytest.raises(PretrainError, match=r"both the preset 'tiny' and the path .*pass \./tiny"):
        load_model_config("tiny")
    assert load_model_config("./tiny").hidden_size == preset["hidden_size"]  # the folder, asked for explicitly


def test_the_native_fallback_notice_does_not_promise_identical_results(monkeypatch):
    def broken():
        raise native.NativeBuildError("no compiler")

    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_load", broken)
    with pytest.warns(RuntimeWarning, match="within float rounding") as record:
        assert native.load() is False
    assert "Results are the same" not in str(record[0].message)


def test_check_local_checkout_closes_config_json(tiny_fp8):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        check_local_checkout(str(tiny_fp8))
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_an_adapter_saved_into_the_base_folder_is_named_not_missing_scales(tiny_fp8, tmp_path):
    pytest.importorskip("peft")
    from peft import get_peft_model

    from modeling_deepseekv3.integrations.peft import lora_config

    base = tmp_path / "base"
    shutil.copytree(tiny_fp8, base)
    model = load(base)
    get_peft_model(model, lora_config(model.config, "attention")).save_pretrained(base)
    assert (base / "adapter_config.json").is_file()
    with pytest.raises(ds.CheckpointError, match=r"holds a PEFT adapter.*PeftModel\.from_pretrained") as caught:
        load(base)
    assert "scales missing" not in str(caught.value)


def test_role_tokens_in_content_are_escaped_as_the_readme_says():
    from modeling_deepseekv3.integrations.tokenizer import load_tokenizer

    tok = load_tokenizer(ROOT / "models" / "shakespeare-deepseek-v3")
    user = tok.convert_tokens_to_ids("<｜User｜>")
    text = "hi <｜User｜> there"
    assert user in tok(text)["input_ids"]  # typed into content, it is the real special token
    ids = tok.apply_chat_template([{"role": "user", "content": text.replace("｜", "|")}], tokenize=True)
    ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
    assert ids.count(user) == 1  # escaped: only the template's own turn marker
