"""Unchanged ecosystem tools given only the shipped model's path (official FP8 layout) reach this package through the
``auto_map`` (``trust_remote_code=True``): lm-evaluation-harness and TRL's ``SFTTrainer``.

Each tool runs in a fresh interpreter that never imports ``modeling_deepseekv3`` itself (the shim does), offline,
with ``HF_HOME`` / ``HF_MODULES_CACHE`` in a temporary folder. lm-eval runs with ``max_length=256``, the window the
shipped model was trained on (its YaRN ``original_max_position_embeddings``); lm-eval's default takes
``max_position_embeddings`` (1024) and gives other numbers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

import modeling_deepseekv3 as ds
from helpers import ROOT
from modeling_deepseekv3.cli import main as cli

SHIPPED = ROOT / "models" / "shakespeare-deepseek-v3"
WINDOW = 256  # the shipped model's training window

# public-domain Shakespeare: a short document and one longer than WINDOW tokens (lm-eval rolls two windows over it)
DOCS = [
    "Tomorrow, and tomorrow, and tomorrow, creeps in this petty pace from day to day.",
    "To be, or not to be, that is the question: whether 'tis nobler in the mind to suffer the slings and arrows of "
    "outrageous fortune, or to take arms against a sea of troubles, and by opposing end them. To die: to sleep; no "
    "more; and by a sleep to say we end the heart-ache and the thousand natural shocks that flesh is heir to, 'tis "
    "a consummation devoutly to be wish'd. To die, to sleep; to sleep: perchance to dream: ay, there's the rub; for "
    "in that sleep of death what dreams may come when we have shuffled off this mortal coil, must give us pause: "
    "there's the respect that makes calamity of so long life; for who would bear the whips and scorns of time, the "
    "oppressor's wrong, the proud man's contumely, the pangs of despised love, the law's delay, the insolence of "
    "office and the spurns that patient merit of the unworthy takes, when he himself might his quietus make with a "
    "bare bodkin? who would fardels bear, to grunt and sweat under a weary life, but that the dread of something "
    "after death, the undiscover'd country from whose bourn no traveller returns, puzzles the will and makes us "
    "rather bear those ills we have than fly to others that we know not of?",
]


def fresh_env(tmp_path) -> dict:
    home = tmp_path / "hf-home"
    return {
        **os.environ,
        "HF_HOME": str(home),
        "HF_MODULES_CACHE": str(home / "modules"),
        "HF_DATASETS_CACHE": str(home / "datasets"),
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def run_fresh(script: str, tmp_path, *args) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", script, *map(str, args)],
        capture_output=True,
        text=True,
        env=fresh_env(tmp_path),
        timeout=900,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------ lm-eval


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    """A local lm-eval task: the documents as JSON lines, scored with loglikelihood_rolling."""
    root = tmp_path_factory.mktemp("lm-eval")
    data = root / "docs.jsonl"
    data.write_text("".join(json.dumps({"text": d}) + "\n" for d in DOCS))
    (root / "tasks").mkdir()
    (root / "tasks" / "shakespeare_rolling.yaml").write_text(
        "task: shakespeare_rolling\n"
        "dataset_path: json\n"
        "dataset_kwargs:\n"
        f"  data_files:\n    test: {data}\n"
        f"  cache_dir: {root / 'datasets-cache'}\n"
        "test_split: test\n"
        "output_type: loglikelihood_rolling\n"
        'doc_to_text: ""\n'
        'doc_to_target: "{{text}}"\n'
        "metric_list:\n  - metric: bits_per_byte\n"
    )
    return root / "tasks"


LM_EVAL_BY_PATH = r"""
import json, sys
import lm_eval
from lm_eval.api.registry import get_model
from lm_eval.tasks import TaskManager

tasks, *dirs = sys.argv[1:]
report = {"imported_before": "modeling_deepseekv3" in sys.modules}
for d in dirs:
    # what `lm_eval --model hf --model_args ...` and simple_evaluate(model="hf", model_args=...) build
    args = f"pretrained={d},trust_remote_code=True,dtype=float32,max_length=256"
    lm = get_model("hf").create_from_arg_string(args, {"batch_size": 2, "device": "cpu"})
    res = lm_eval.simple_evaluate(
        model=lm, tasks=["shakespeare_rolling"], task_manager=TaskManager(include_path=tasks), log_samples=True
    )
    proj = lm.model.model.layers[1].self_attn.q_b_proj
    report[d] = {
        "class": [c.__module__ for c in type(lm.model).__mro__[:2]],
        "weight": str(proj.weight.dtype),
        "ll": {s["doc_id"]: s["filtered_resps"][0] for s in res["samples"]["shakespeare_rolling"]},
    }
print(json.dumps(report))
"""


def lm_eval_in_process(lm, task_dir) -> dict[int, float]:
    import lm_eval
    from lm_eval.tasks import TaskManager

    res = lm_eval.simple_evaluate(
        model=lm, tasks=["shakespeare_rolling"], task_manager=TaskManager(include_path=str(task_dir)), log_samples=True
    )
    return {s["doc_id"]: s["filtered_resps"][0] for s in res["samples"]["shakespeare_rolling"]}


@pytest.mark.slow  # lm-eval in a fresh process on two checkpoints, two more in-process runs, one conversion
def test_lm_eval_by_path_equals_the_plugin_object_and_native(task_dir, tmp_path):
    """``pretrained=DIR,trust_remote_code=True`` on the shipped FP8 model gives our class (FP8 kept) and the same
    log-likelihoods as ``HFLM(pretrained=<our model object>)``; on the BF16 export (``deepseek-v3 convert --to
    bf16``) it gives the same as transformers' native class. FP8 and its BF16 export differ by the export's
    rounding of each dequantized weight to BF16 (the scales are not powers of two), so those two agree less
    closely."""
    pytest.importorskip("lm_eval", reason="needs lm-eval: pip install 'lm-eval==0.4.13'")
    from lm_eval.models.huggingface import HFLM

    bf16 = tmp_path / "bf16"
    assert cli(["convert", str(SHIPPED), str(bf16), "--to", "bf16", "--quiet"]) == 0
    by_path = run_fresh(LM_EVAL_BY_PATH, tmp_path, task_dir, SHIPPED, bf16)
    fp8_path, bf16_path = by_path[str(SHIPPED)], by_path[str(bf16)]
    assert by_path["imported_before"] is False
    for report in (fp8_path, bf16_path):
        assert (
            report["class"][0].startswith("transformers_modules.")
            and report["class"][1] == "modeling_deepseekv3.modeling"
        )
    assert fp8_path["weight"] == "torch.float8_e4m3fn" and bf16_path["weight"] == "torch.float32"

    ours = ds.DeepseekV3ForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32)
    obj = HFLM(pretrained=ours, tokenizer=ds.load_tokenizer(SHIPPED), max_length=WINDOW, batch_size=2, device="cpu")
    native = HFLM(pretrained=str(bf16), dtype="float32", max_length=WINDOW, batch_size=2, device="cpu")
    assert type(native.model).__module__.startswith("transformers.models.deepseek_v3")  # no trust: native
    from_object, from_native = lm_eval_in_process(obj, task_dir), lm_eval_in_process(native, task_dir)

    assert sorted(from_object) == list(range(len(DOCS)))
    for doc in range(len(DOCS)):
        fp8_by_path, bf16_by_path = fp8_path["ll"][str(doc)], bf16_path["ll"][str(doc)]
        assert fp8_by_path < 0
        assert fp8_by_path == pytest.approx(from_object[doc], rel=1e-5, abs=1e-5)
        assert bf16_by_path == pytest.approx(from_native[doc], rel=1e-5, abs=1e-5)
        assert fp8_by_path == pytest.approx(bf16_by_path, rel=1e-3)  # BF16 rounding of the weights (docstring)


# ------------------------------------------------------------------------------------------ TRL

TRL_SFT_BY_PATH = r"""
import json, sys
import torch
from datasets import Dataset
from peft import LoraConfig
from trl import SFTConfig, SFTTrainer

model_dir, out = sys.argv[1:]
report = {"imported_before": "modeling_deepseekv3" in sys.modules}
rows = [{"text": "To be, or not to be, that is the question."}, {"text": "Now is the winter of our discontent."}] * 4
args = SFTConfig(
    output_dir=out, max_steps=3, per_device_train_batch_size=2, learning_rate=1e-2, max_length=32, logging_steps=1,
    report_to=[], save_strategy="no", use_cpu=True, dataloader_num_workers=0, seed=0,
    model_init_kwargs={"trust_remote_code": True, "dtype": "float32"},
)
lora = LoraConfig(r=4, target_modules=["q_b_proj", "o_proj", "gate_proj", "down_proj"])
trainer = SFTTrainer(model=model_dir, args=args, train_dataset=Dataset.from_list(rows), peft_config=lora)
base = trainer.model.get_base_model()
report["class"] = [c.__module__ for c in type(base).__mro__[:2]]
wrapped = {n: m for n, m in base.named_modules() if hasattr(m, "lora_B") and hasattr(m, "base_layer")}
report["lora_layers"] = sorted({type(m).__name__ for m in wrapped.values()})
report["expert_layers"] = sum(".experts." in n for n in wrapped)
report["base_dtypes"] = sorted({str(m.base_layer.weight.dtype) for m in wrapped.values()})
frozen = {n: m.base_layer.weight.detach().clone() for n, m in wrapped.items()}
trainer.train()
report["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
report["base_unchanged"] = all(torch.equal(m.base_layer.weight, frozen[n]) for n, m in wrapped.items())
trained = [n for n, m in wrapped.items() if m.lora_B["default"].weight.abs().sum() > 0]
main_layers = tuple(f"model.layers.{i}.self_attn." for i in range(base.config.num_hidden_layers))
report["untrained_attention"] = [n for n in wrapped if n.startswith(main_layers) and n not in trained]
report["trained_experts"] = sum(".experts." in n for n in trained)
print(json.dumps(report))
"""


@pytest.mark.slow  # TRL trains three LoRA steps on the shipped model in a fresh process
def test_sft_trainer_by_path_trains_lora_on_the_fp8_model(tmp_path):
    """``SFTTrainer(model=DIR, args=SFTConfig(model_init_kwargs={"trust_remote_code": True}), peft_config=...)``:
    TRL resolves the class from ``config.architectures`` (transformers' built-in name); the shim routes that
    trusted load to our class, so the FP8 weights stay FP8 and frozen while the LoRA adapters, experts included,
    train."""
    report = run_fresh(TRL_SFT_BY_PATH, tmp_path, SHIPPED, tmp_path / "sft")
    assert report["imported_before"] is False
    assert (
        report["class"][0].startswith("transformers_modules.") and report["class"][1] == "modeling_deepseekv3.modeling"
    )
    assert report["lora_layers"] == ["FP8LoraLinear"] and report["base_dtypes"] == ["torch.float8_e4m3fn"]
    assert report["expert_layers"] > 0 and report["base_unchanged"]
    # every attention adapter of the main model learns; an expert's only if the router sent it tokens in these three
    # steps. (TRL 1.16 computes its own next-token loss from the backbone, so the MTP layer's adapters get no gradient.)
    assert report["untrained_attention"] == [] and report["trained_experts"] > 0
    losses = report["losses"]
    assert len(losses) == 3 and all(0 < x < 20 for x in losses) and losses[-1] < losses[0]
