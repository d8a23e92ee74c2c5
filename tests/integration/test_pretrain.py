"""``deepseek-v3 pretrain`` on a tiny corpus built here: it learns, it is deterministic, it resumes bit for bit,
each DeepSeek term is on exactly when asked, the exports reload, and bad input stops it before damage."""

from __future__ import annotations

import json

import pytest
import torch
import transformers

import modeling_deepseekv3 as ds
from helpers import corpus, load
from modeling_deepseekv3.cli import main as cli
from modeling_deepseekv3.distributed.checkpoint import TrainingCheckpointError, latest_checkpoint
from modeling_deepseekv3.training.data import DataError
from modeling_deepseekv3.training.pretrain import PretrainArgs, PretrainError, pretrain


def run(texts, out, **kw) -> tuple[dict, list[dict]]:
    args = dict(
        model_config="tiny",
        data=[str(texts / "train")],
        eval_data=[str(texts / "eval.txt")],
        vocab_size=512,
        output=str(out),
        seq_len=32,
        global_batch_size=8,
        micro_batch_size=4,
        steps=24,
        lr=3e-3,
        warmup_steps=4,
        eval_every=12,
        log_json=str(out / "log.jsonl"),
        progress=False,
        export=False,
    )
    args.update(kw)
    summary = pretrain(PretrainArgs(**args))
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return summary, log


@pytest.mark.slow  # pretraining runs
def test_learns_logs_every_field_and_is_deterministic(texts, tmp_path):
    _, log = run(texts, tmp_path / "a")
    first, last = log[0], log[-1]
    assert last["lm_loss"] < 0.75 * first["lm_loss"], (first["lm_loss"], last["lm_loss"])
    for key in (
        "step",
        "loss",
        "lm_loss",
        "mtp_loss",
        "balance_loss",
        "lr",
        "tokens",
        "tokens_per_s",
        "expert_load_imbalance",
    ):
        assert key in first, key
    assert [r["step"] for r in log] == list(range(1, 25)) and last["tokens"] == 24 * 8 * 32
    evals = [r for r in log if "eval_loss" in r]
    assert [r["step"] for r in evals] == [12, 24] and evals[-1]["eval_bits_per_byte"] > 0
    assert evals[-1]["eval_loss"] < evals[0]["eval_loss"]
    _, again = run(texts, tmp_path / "b")
    assert [r["loss"] for r in again] == [r["loss"] for r in log]  # same command, same seed, same losses


@pytest.mark.slow  # pretraining runs
@pytest.mark.parametrize("save_every,killed_at", [(8, 13), (12, 15)])
def test_interrupt_and_resume_equals_an_uninterrupted_run(texts, tmp_path, monkeypatch, save_every, killed_at):
    """Killed between two checkpoints; (12, 15) resumes from a step that also evaluated (step 12), so the
    resumed process trains on before any evaluation has run in it: evaluation must leave no trace."""
    _, straight = run(texts, tmp_path / "straight", save_every=save_every)
    import modeling_deepseekv3.training.pretrain as module

    real, calls = module.update_routing_bias, {"n": 0}

    def killed(*a, **k):
        calls["n"] += 1
        if calls["n"] == killed_at:
            raise KeyboardInterrupt  # like a kill between two checkpoints
        return real(*a, **k)

    monkeypatch.setattr(module, "update_routing_bias", killed)
    with pytest.raises(KeyboardInterrupt):
        run(texts, tmp_path / "resumed", save_every=save_every)
    last = save_every * ((killed_at - 1) // save_every)
    assert latest_checkpoint(tmp_path / "resumed" / "checkpoints").name == f"step-{last:07d}"
    monkeypatch.setattr(module, "update_routing_bias", real)
    _, resumed = run(texts, tmp_path / "resumed", save_every=save_every, resume=True)
    assert [r["loss"] for r in resumed] == [r["loss"] for r in straight]
    a = _weights(tmp_path / "straight")
    b = _weights(tmp_path / "resumed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # bit for bit


def _weights(out):
    """The final model of a run, read back from its last DCP checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    path = latest_checkpoint(out / "checkpoints")
    dcp_to_torch_save(path, out / "final.pt")
    return torch.load(out / "final.pt", weights_only=False)["model"]


@pytest.mark.parametrize("term", ["mtp", "balance", "bias"])
def test_each_deepseek_term_is_on_exactly_when_asked(texts, tmp_path, term):
    off = {"mtp": {"mtp_weight": 0.0}, "balance": {"balance_alpha": 0.0}, "bias": {"bias_update_rate": 0.0}}[term]
    _, on_log = run(texts, tmp_path / "on", steps=4, eval_data=[])
    _, off_log = run(texts, tmp_path / "off", steps=4, eval_data=[], **off)
    on_w, off_w = _weights(tmp_path / "on"), _weights(tmp_path / "off")
    bias = "model.layers.1.mlp.gate.e_score_correction_bias"
    if term == "mtp":
        assert all(r["mtp_loss"] > 0 for r in on_log) and all(r["mtp_loss"] == 0 for r in off_log)
        assert all(abs(r["loss"] - r["lm_loss"] - r["balance_loss"]) < 1e-5 for r in off_log)
    elif term == "balance":
        assert all(r["balance_loss"] > 0 for r in on_log) and all(r["balance_loss"] == 0 for r in off_log)
    else:
        assert on_w[bias].abs().sum() > 0 and torch.count_nonzero(off_w[bias]) == 0
        # gamma per step, in steps of +-gamma (or 0 for an expert exactly at the mean load)
        assert on_w[bias].abs().max() <= 4 * 1e-3 + 1e-7


def test_exports_reload_in_the_official_layout(texts, tmp_path):
    out = tmp_path / "run"
    (texts / "SOURCE.json").write_text(json.dumps({"package": "words==1.0", "license": "CC0 (test corpus)"}))
    try:
        summary, _ = run(texts, out, steps=6, export=True)
    finally:
        (texts / "SOURCE.json").unlink()
    card = (out / "README.md").read_text()
    assert "package: words==1.0" in card and "license: CC0 (test corpus)" in card  # attribution from SOURCE.json
    assert (out / "loss_curve.png").is_file()
    bf16, fp8 = load(out / "bf16", dtype=torch.bfloat16), load(out / "fp8", dtype=torch.bfloat16)
    assert bf16.config.num_nextn_predict_layers == 1 and len(bf16.model.mtp_layers) == 1
    assert fp8.config.is_fp8 and fp8.model.layers[1].mlp.experts[0].up_proj.weight.dtype == torch.float8_e4m3fn
    assert fp8.generation_config.use_cache is True  # training ran without a cache; generation needs one
    cfg = json.loads((out / "fp8" / "config.json").read_text())
    assert cfg["topk_method"] == "noaux_tc" and cfg["quantization_config"]["weight_block_size"] == [128, 128]
    # the MTP layer's embedding and head are written as copies of the main ones
    layer = bf16.model.mtp_layers[0]
    assert torch.equal(layer.embed_tokens.weight, bf16.model.embed_tokens.weight)
    assert torch.equal(layer.shared_head.head.weight, bf16.lm_head.weight)
    trained = _weights(out)
    ids = torch.randint(3, 500, (2, 16))
    with torch.no_grad():
        ref = ds.DeepseekV3ForCausalLM(bf16.config)
        ref.load_state_dict({k: v for k, v in trained.items()}, strict=False)
        ref = ref.to(torch.bfloat16).eval()
        for module in ref.modules():  # the official layout stores the (fp32-computed) router weight in BF16
            if isinstance(module, ds.core.moe.TopkRouter):
                module.weight.copy_(module.weight.bfloat16().float())
        a, b, c = ref(ids).logits.float(), bf16(ids).logits.float(), fp8(ids).logits.float()
        native = transformers.DeepseekV3ForCausalLM.from_pretrained(out / "bf16", dtype=torch.bfloat16)(ids).logits
    assert torch.equal(a, b)  # BF16 export: identical logits
    assert ((c - b).norm() / b.norm()) < 0.05  # FP8 export: within FP8 error
    assert ((native.float() - b).norm() / b.norm()) < 0.02
    assert summary["exports"]["fp8"].endswith("fp8")


def test_cli_pretrain(texts, tmp_path, capsys):
    rc = cli(
        [
            "pretrain",
            "--model-config",
            "tiny",
            "--data",
            str(texts / "train"),
            "--vocab-size",
            "512",
            "--output",
            str(tmp_path / "cli"),
            "--seq-len",
            "32",
            "--global-batch-size",
            "4",
            "--steps",
            "3",
            "--quiet",
            "--no-export",
        ]
    )
    assert rc == 0 and "trained 3 steps" in capsys.readouterr().out


def test_bad_input_is_refused_before_damage(texts, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "nothing.txt").write_text("   \n")
    with pytest.raises(DataError, match="hold no text"):
        run(texts, tmp_path / "o1", data=[str(empty)], vocab_size=None, tokenizer=str(_tok(texts, tmp_path)))
    short = tmp_path / "short.txt"
    short.write_text("Thou art.")
    with pytest.raises(DataError, match="fewer than one sequence"):
        run(texts, tmp_path / "o2", data=[str(short)], vocab_size=None, tokenizer=str(_tok(texts, tmp_path)))
    with pytest.raises(DataError, match="no such file"):
        run(texts, tmp_path / "o3", data=[str(tmp_path / "missing")])
    with pytest.raises(PretrainError, match="not divisible"):
        run(texts, tmp_path / "o4", global_batch_size=6, micro_batch_size=4)
    with pytest.raises(PretrainError, match="vocab_size"):
        run(texts, tmp_path / "o5", vocab_size=None, tokenizer=str(_tok(texts, tmp_path, size=600)))
    with pytest.raises(DataError, match="both"):
        run(texts, tmp_path / "o6", eval_data=[str(texts / "train" / "a.txt")])


def _tok(texts, tmp_path, size=512):
    from modeling_deepseekv3.integrations.tokenizer import train_bpe_tokenizer

    path = tmp_path / f"tok{size}"
    if not path.exists():
        tok = train_bpe_tokenizer([(texts / "train" / "a.txt").read_text()], 512)
        tok.add_tokens([f"<extra_{i}>" for i in range(size - len(tok))])  # the corpus is too small for more merges
        assert len(tok) == max(size, len(tok))
        tok.save_pretrained(path)
    return path


def test_resume_refuses_another_config_or_data(texts, tmp_path):
    out = tmp_path / "run"
    run(texts, out, steps=2, eval_data=[])
    with pytest.raises(TrainingCheckpointError, match="different args"):
        run(texts, out, steps=4, eval_data=[], resume=True, lr=1e-3)
    other = tmp_path / "other"
    other.mkdir()
    corpus(other / "c.txt", 600, 7)
    with pytest.raises(TrainingCheckpointError, match="different data"):
        run(texts, out, steps=4, eval_data=[], resume=True, data=[str(other)])
    with pytest.raises(PretrainError, match="no complete checkpoint"):
        run(texts, tmp_path / "fresh", resume=True)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_checkpoint(texts, tmp_path, monkeypatch):
    import modeling_deepseekv3.modeling as modeling

    out = tmp_path / "run"
    real = modeling.DeepseekV3ForCausalLM.forward
    state = {"n": 0}

    def nan_after_5(self, *a, **k):
        result = real(self, *a, **k)
        state["n"] += 1
        if state["n"] > 10 and result.loss is not None:  # 2 micro-batches per step: step 6 goes NaN
            result.loss = result.loss * float("nan")
        return result

    monkeypatch.setattr(modeling.DeepseekV3ForCausalLM, "forward", nan_after_5)
    with pytest.raises(PretrainError, match=r"step 5: the loss is nan.*step-0000004"):
        run(texts, out, steps=12, save_every=4, eval_data=[])
    assert latest_checkpoint(out / "checkpoints").name == "step-0000004"


def test_full_disk_while_checkpointing_keeps_the_previous_checkpoint(texts, tmp_path, monkeypatch):
    import torch.distributed.checkpoint as dcp

    out = tmp_path / "run"
    real = dcp.save
    state = {"n": 0}

    def full_disk(*a, **k):
        state["n"] += 1
        if state["n"] == 2:
            raise OSError(28, "No space left on device")
        return real(*a, **k)

    monkeypatch.setattr(dcp, "save", full_disk)
    with pytest.raises(OSError, match="No space left"):
        run(texts, out, steps=12, save_every=4, eval_data=[])
    root = out / "checkpoints"
    assert latest_checkpoint(root).name == "step-0000004"
    assert sorted(p.name for p in root.iterdir()) == ["step-0000004"]  # no half-written step-0000008
