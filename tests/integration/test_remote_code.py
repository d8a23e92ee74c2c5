"""Self-describing checkpoints: every directory this package writes carries the official ``auto_map`` and the two
``trust_remote_code`` shims, so a process that never imports the package reaches it by path; ``install-hub-files``
adds them elsewhere or refuses with one line and changes nothing."""

from __future__ import annotations

import ast
import json
import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import modeling_deepseekv3 as ds
from helpers import ROOT, load
from modeling_deepseekv3.checkpoint.remote_code import AUTO_MAP, SHIM_FILES, shim_source, stamp_remote_code
from modeling_deepseekv3.cli import main as cli

SHIPPED = ROOT / "models" / "shakespeare-deepseek-v3"
HUB_FILES = ROOT / "modeling_deepseekv3" / "hub_files"


def assert_self_describing(path: Path) -> None:
    config = json.loads((path / "config.json").read_text())
    assert config["auto_map"] == AUTO_MAP, path
    for name in SHIM_FILES:
        assert (path / name).read_bytes() == (HUB_FILES / name).read_bytes(), path / name
    assert not [p.name for p in path.iterdir() if p.name.startswith(".")], "staging leftovers"


def files_of(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir()) if p.is_file()}


# ------------------------------------------------------------------------------------------ the shims


def test_auto_map_names_classes_the_shims_define():
    """Each auto_map value is ``<module file>.<class>``: the file must be one we ship and define that name, and the
    config shim's class must not be named like transformers' built-in config (Auto mappings match by __name__)."""
    defined = {}
    for name in SHIM_FILES:
        tree = ast.parse((HUB_FILES / name).read_text())
        names = {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
        names |= {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets if isinstance(t, ast.Name)}
        defined[name.removesuffix(".py")] = names
    for auto_class, ref in AUTO_MAP.items():
        module, cls = ref.split(".")
        assert cls in defined[module], f"{auto_class} -> {ref}: {module}.py defines {sorted(defined[module])}"
    assert json.loads((ROOT / "hub_config" / "deepseek-v3" / "config.json").read_text())["auto_map"] == AUTO_MAP
    config_shim = ast.parse((HUB_FILES / "configuration_deepseek.py").read_text())
    classes = [n.name for n in config_shim.body if isinstance(n, ast.ClassDef)]
    assert classes == ["DeepseekV3RemoteConfig"]


def test_the_shims_import_only_public_names():
    """Copies of the shims outlive upgrades of the package: they may use only its public names and the routing
    hook (both kept stable), never internal modules."""
    for name in SHIM_FILES:
        tree = ast.parse((HUB_FILES / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert [a.name for a in node.names] == ["modeling_deepseekv3"], ast.unparse(node)
            elif isinstance(node, ast.ImportFrom) and not node.level:
                assert node.module == "modeling_deepseekv3.hub_files", ast.unparse(node)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "_plugin":
                assert node.attr in ds.__all__, ast.unparse(node)


# ------------------------------------------------------------------------------------------ every writer


def test_make_tiny_and_save_pretrained_write_self_describing_checkpoints(tiny_fp8, tmp_path):
    assert_self_describing(tiny_fp8)
    model = load(tiny_fp8)
    model.save_pretrained(tmp_path / "saved")
    assert_self_describing(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert list(saved) == sorted(saved)  # save_pretrained's sorted keys kept
    model.save_pretrained(tmp_path / "saved")  # again over itself: still one auto_map, no .orig of our own shim
    assert_self_describing(tmp_path / "saved")
    assert not list((tmp_path / "saved").glob("*.orig"))


def test_convert_both_ways_writes_self_describing_checkpoints(tiny_fp8, tmp_path):
    bf16 = ds.convert_checkpoint(tiny_fp8, tmp_path / "bf16", to="bf16", progress=False)
    fp8 = ds.convert_checkpoint(bf16, tmp_path / "fp8", to="fp8", progress=False)
    for path in (bf16, fp8):
        assert_self_describing(path)
    assert json.loads((fp8 / "config.json").read_text())["quantization_config"]["quant_method"] == "fp8"


def test_convert_of_an_official_checkout_keeps_deepseeks_code_as_orig(tiny_fp8, tmp_path):
    src = Path(shutil.copytree(tiny_fp8, tmp_path / "official"))
    for name in SHIM_FILES:
        (src / name).write_text(f"# DeepSeek's own {name}\n")
    dst = ds.convert_checkpoint(src, tmp_path / "bf16", to="bf16", progress=False)
    assert_self_describing(dst)
    for name in SHIM_FILES:
        assert (dst / (name + ".orig")).read_text() == f"# DeepSeek's own {name}\n"


def test_a_merged_lora_model_saves_self_describing(tiny_fp8, tmp_path):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(load(tiny_fp8), LoraConfig(r=2, target_modules=["q_b_proj", "o_proj"]))
    peft_model.merge_and_unload().save_pretrained(tmp_path / "merged")
    assert_self_describing(tmp_path / "merged")


def test_pretrain_exports_are_self_describing(tiny_bf16_direct_q, tmp_path):
    from modeling_deepseekv3.training.pretrain import export

    model = load(tiny_bf16_direct_q)
    out = export(model, ds.load_tokenizer(tiny_bf16_direct_q), tmp_path / "run", model.config)
    assert sorted(out) == ["bf16", "fp8"]
    for path in out.values():
        assert_self_describing(Path(path))


def test_a_foreign_auto_map_in_a_writers_output_is_replaced_with_a_warning(tiny_fp8, tmp_path, caplog):
    src = Path(shutil.copytree(tiny_fp8, tmp_path / "src"))
    cfg = json.loads((src / "config.json").read_text())
    cfg["auto_map"]["AutoModelForCausalLM"] = "someone/other-repo--modeling_x.OtherForCausalLM"
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    import transformers

    transformers.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            dst = ds.convert_checkpoint(src, tmp_path / "dst", to="bf16", progress=False)
    finally:
        transformers.logging.disable_propagation()
    assert_self_describing(dst)
    assert "someone/other-repo--modeling_x.OtherForCausalLM" in caplog.text
    assert "other-repo" in (dst / "config.json.orig").read_text()


def test_the_shipped_model_is_self_describing():
    assert_self_describing(SHIPPED)
    config = json.loads((SHIPPED / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "fp8" and config["architectures"] == [
        "DeepseekV3ForCausalLM"
    ]


# ------------------------------------------------------------------------------------------ a fresh process

FRESH_PROCESS = r"""
import json, sys
import torch, transformers
from transformers import AutoConfig, AutoModelForCausalLM

fp8_dir, bf16_dir = sys.argv[1], sys.argv[2]
report = {"imported_before": "modeling_deepseekv3" in sys.modules}
config = AutoConfig.from_pretrained(fp8_dir, trust_remote_code=True)
report["config"] = [type(config).__module__, type(config).__name__]
model = AutoModelForCausalLM.from_pretrained(fp8_dir, trust_remote_code=True, dtype=torch.float32)
report["model"] = [c.__module__ for c in type(model).__mro__[:2]]
proj = model.model.layers[1].self_attn.q_b_proj
report["fp8"] = [str(proj.weight.dtype), str(proj.weight_scale_inv.dtype)]
# TRL and transformers serve: AutoConfig(trust_remote_code=True), then transformers' class of that name
by_name = getattr(transformers, config.architectures[0]).from_pretrained(fp8_dir, trust_remote_code=True, dtype=torch.float32)
report["by_name"] = type(by_name).__mro__[1].__module__
# ... while the built-in class without trust_remote_code stays built-in
report["untrusted"] = type(transformers.DeepseekV3ForCausalLM.from_pretrained(bf16_dir)).__module__
import modeling_deepseekv3 as ds

ids = torch.tensor([[5, 17, 300, 41, 9, 77]])
ours = ds.DeepseekV3ForCausalLM.from_pretrained(fp8_dir, dtype=torch.float32)
with torch.no_grad():
    report["max_diff"] = max(
        (m(ids).logits - ours(ids).logits).abs().max().item() for m in (model, by_name)
    )
print(json.dumps(report))
"""


@pytest.mark.slow  # a fresh interpreter importing transformers and torch: ~15 s here
def test_a_process_that_never_imports_the_package_reaches_it_by_path(tiny_fp8, tiny_bf16_direct_q, tmp_path):
    """``python -c`` with only transformers imported, offline, with empty HF_HOME / HF_MODULES_CACHE: the auto_map
    leads to our classes (FP8 kept, same logits as ours), transformers copies the shims into its module cache, and
    TRL's / serve's load-by-architecture-name with trust_remote_code=True gets ours too."""
    saved = tmp_path / "saved-by-us"
    load(tiny_fp8).save_pretrained(saved)
    modules = tmp_path / "modules"
    env = {
        **os.environ,
        "HF_HOME": str(tmp_path / "hf-home"),
        "HF_MODULES_CACHE": str(modules),
        "HF_HUB_OFFLINE": "1",
    }
    proc = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS, str(saved), str(tiny_bf16_direct_q)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["imported_before"] is False
    assert report["config"][0].startswith("transformers_modules.") and report["config"][1] == "DeepseekV3RemoteConfig"
    assert report["model"][0].startswith("transformers_modules.") and report["model"][0].endswith(".modeling_deepseek")
    assert report["model"][1] == "modeling_deepseekv3.modeling"  # the class the shim subclasses: the plugin's
    assert report["fp8"] == ["torch.float8_e4m3fn", "torch.float32"]
    assert report["by_name"] == "modeling_deepseekv3.modeling"
    assert report["untrusted"].startswith("transformers.models.deepseek_v3")
    assert report["max_diff"] == 0.0
    # transformers copied both shims into its dynamic-module cache (under the folder's name and a content hash)
    for name in SHIM_FILES:
        copies = list((modules / "transformers_modules").rglob(name))
        assert copies and all(c.read_bytes() == shim_source(name) for c in copies), name


# ------------------------------------------------------------------------------------------ install-hub-files


def test_install_hub_files_adds_a_missing_auto_map_and_says_so(tiny_fp8, tmp_path, capsys):
    path = Path(shutil.copytree(tiny_fp8, tmp_path / "ckpt"))
    config = json.loads((path / "config.json").read_text())
    del config["auto_map"]
    (path / "config.json").write_text(json.dumps(config, indent=2))
    for name in SHIM_FILES:
        (path / name).unlink()
    assert cli(["install-hub-files", str(path)]) == 0
    out = capsys.readouterr().out
    assert f"added the auto_map in {path / 'config.json'}" in out
    assert all(f"wrote {path / name}" in out for name in SHIM_FILES)
    after = json.loads((path / "config.json").read_text())
    assert {k: v for k, v in after.items() if k != "auto_map"} == config
    assert_self_describing(path)
    assert cli(["install-hub-files", str(path)]) == 0  # idempotent, and says there was nothing to do
    assert "nothing to change" in capsys.readouterr().out
    assert not list(path.glob("*.orig"))


def _foreign_repo(config):
    config["auto_map"]["AutoModelForCausalLM"] = "someone/other-repo--modeling_x.OtherForCausalLM"


def _foreign_class(config):
    config["auto_map"]["AutoConfig"] = "configuration_deepseek.SomethingElseConfig"


def _not_deepseek(config):
    config["model_type"] = "llama"
    config["architectures"] = ["LlamaForCausalLM"]
    del config["auto_map"]


@pytest.mark.parametrize(
    ("edit", "reason"),
    [
        (None, "has no config.json, so it is not a checkpoint"),
        (_not_deepseek, "has model_type 'llama'"),
        (_foreign_repo, "auto_map that points at other code: AutoModelForCausalLM -> 'someone/other-repo--"),
        (_foreign_class, "AutoConfig -> 'configuration_deepseek.SomethingElseConfig'"),
    ],
    ids=["no-config", "other-architecture", "other-repo", "other-class"],
)
def test_install_hub_files_refuses_with_one_line_and_changes_nothing(tiny_fp8, tmp_path, capsys, edit, reason):
    path = Path(shutil.copytree(tiny_fp8, tmp_path / "ckpt"))
    for name in SHIM_FILES:
        (path / name).write_text(f"# DeepSeek's own {name}\n")
    if edit is None:
        (path / "config.json").unlink()
    else:
        config = json.loads((path / "config.json").read_text())
        edit(config)
        (path / "config.json").write_text(json.dumps(config, indent=2))
    before = files_of(path)
    assert cli(["install-hub-files", str(path)]) == 2
    captured = capsys.readouterr()
    assert captured.out == "" and len(captured.err.strip().splitlines()) == 1, captured
    assert captured.err.startswith("deepseek-v3 install-hub-files: error: ") and reason in captured.err
    assert files_of(path) == before


def test_install_hub_files_overwrite_replaces_a_foreign_auto_map_keeping_the_original(tiny_fp8, tmp_path, capsys):
    path = Path(shutil.copytree(tiny_fp8, tmp_path / "ckpt"))
    config = json.loads((path / "config.json").read_text())
    _foreign_repo(config)
    config["auto_map"]["AutoTokenizer"] = ["tokenization_x.XTokenizer", None]  # not ours to judge: kept
    (path / "config.json").write_text(json.dumps(config, indent=2))
    original = (path / "config.json").read_bytes()
    assert cli(["install-hub-files", str(path), "--overwrite"]) == 0
    out = capsys.readouterr().out
    assert "replaced the auto_map entries AutoModelForCausalLM -> 'someone/other-repo--" in out
    assert (path / "config.json.orig").read_bytes() == original
    assert json.loads((path / "config.json").read_text())["auto_map"] == {
        "AutoTokenizer": ["tokenization_x.XTokenizer", None],
        **AUTO_MAP,
    }


def test_install_hub_files_replaces_a_symlinked_config_never_its_blob(tiny_fp8, tmp_path):
    """A Hugging Face cache snapshot: config.json links into blobs/, shared with other snapshots."""
    path = Path(shutil.copytree(tiny_fp8, tmp_path / "snapshot"))
    config = json.loads((path / "config.json").read_text())
    del config["auto_map"]
    blob = tmp_path / "blob-config"
    blob.write_text(json.dumps(config))
    (path / "config.json").unlink()
    (path / "config.json").symlink_to(blob)
    assert cli(["install-hub-files", str(path)]) == 0
    assert json.loads(blob.read_text()) == config  # the blob untouched
    assert not (path / "config.json").is_symlink()
    assert_self_describing(path)


def test_stamp_refuses_a_conflict_unless_told_and_never_keeps_our_own_shim(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "deepseek_v3", "auto_map": {"AutoModel": "x.Y"}}))
    before = files_of(tmp_path)
    with pytest.raises(ValueError, match=r"AutoModel -> 'x\.Y'.*nothing was changed.*overwrite=True"):
        stamp_remote_code(tmp_path, overwrite=False)
    assert files_of(tmp_path) == before
    (tmp_path / "modeling_deepseek.py").write_text("import modeling_deepseekv3  # an older shim of ours\n")
    changes = stamp_remote_code(tmp_path, overwrite=True)
    assert (
        not (tmp_path / "modeling_deepseek.py.orig").exists()
        and f"wrote {tmp_path / 'modeling_deepseek.py'}" in changes
    )
    assert (tmp_path / "modeling_deepseek.py").read_bytes() == shim_source("modeling_deepseek.py")
    assert stamp_remote_code(tmp_path) == []  # nothing left to change
