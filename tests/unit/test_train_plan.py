"""``deepseek-v3 plan --train``: parameter counts from the config equal the built model's, the real V3 config's
headline figures come out (671B main, ~37B activated), the schedules' formulas and in-flight counts are DualPipe's
table, the memory terms respond to ZeRO-1 / FP8 / recomputation, and impossible layouts are refused."""

from __future__ import annotations

from pathlib import Path

import pytest

import modeling_deepseekv3 as ds
from modeling_deepseekv3.checkpoint import TINY_CONFIG
from modeling_deepseekv3.cli import main as cli
from modeling_deepseekv3.distributed.train_plan import TrainLayout, TrainPlanError, parameter_counts, plan_training

V3 = Path(__file__).resolve().parents[2] / "hub_config" / "deepseek-v3"


def test_counts_equal_the_built_model():
    config = ds.DeepseekV3Config(**TINY_CONFIG)
    model = ds.DeepseekV3ForCausalLM(config)
    built = sum(p.numel() for p in model.parameters())
    biases = sum(b.numel() for n, b in model.named_buffers() if n.endswith("e_score_correction_bias"))
    counts = parameter_counts(config)
    # the built MTP layer holds its own embedding/head copies (training ties them to the main ones)
    copies = config.num_nextn_predict_layers * 2 * config.vocab_size * config.hidden_size
    assert counts["total"] + copies == built + biases


def test_deepseek_v3_headline_figures():
    counts = parameter_counts(ds.DeepseekV3Config.from_pretrained(V3))
    assert 670.5e9 < counts["total"] - counts["mtp"] < 671.5e9  # the report's 671B
    assert 36e9 < counts["activated"] < 38.5e9  # "37B activated for each token"
    assert 11e9 < counts["mtp"] < 12e9  # the MTP block without its tied embedding/head


@pytest.mark.parametrize(
    "schedule,stages,in_flight,bubble",
    [
        ("1f1b", 4, 4, 3 * 3),
        ("zb1p", 4, 4, 3 * 1),
        ("dualpipe", 4, 5, 1 * 2),
        ("dualpipev", 8, 9, 3 * 2),
        ("gpipe", 4, 16, 3 * 3),  # every micro-batch's forward before the first backward
        ("interleaved1f1b", 8, 11, 3 * 3),  # torch's warm-up (v-1)pp + 2(pp-1) + 1; Megatron's bubble / v
        ("zbv", 8, 8, 3 * 1),  # 1F1B's memory, ZB1P's bubble over half-size stages
    ],
)
def test_schedules_follow_dualpipes_table(schedule, stages, in_flight, bubble):
    config = ds.DeepseekV3Config(**{**TINY_CONFIG, "num_hidden_layers": 16})
    plan = plan_training(config, TrainLayout(pp=4, dp=4, ep=2, schedule=schedule, micro_batches=16, seq_len=64))
    assert (plan.stages, plan.in_flight, plan.bubble) == (stages, in_flight, bubble)
    assert sum(plan.layers_per_stage) == 16 and 0 < plan.bubble_fraction < 1


def test_dualpipe_holds_two_stage_copies():
    config = ds.DeepseekV3Config(**{**TINY_CONFIG, "num_hidden_layers": 16, "first_k_dense_replace": 0})
    one = plan_training(config, TrainLayout(pp=4, schedule="1f1b", micro_batches=8, seq_len=64))
    two = plan_training(config, TrainLayout(pp=4, schedule="dualpipe", micro_batches=8, seq_len=64))
    assert 1.7 < two.memory["weights"] / one.memory["weights"] <= 2.0  # 2x parameters (rank 0: embedding + head)


def test_memory_terms_respond_to_their_knobs():
    config = ds.DeepseekV3Config.from_pretrained(V3)
    base = TrainLayout(pp=16, dp=128, ep=64, schedule="dualpipe", micro_batches=32, seq_len=4096)
    plan = plan_training(config, base)
    no_zero = plan_training(config, TrainLayout(**{**base.__dict__, "zero1": False}))
    dense, experts = plan.rank_params["non_expert"], plan.rank_params["experts"]
    # ZeRO-1: non-expert states sharded over their 128 replicas, expert states over their 128 / 64 = 2
    expected = (dense + experts) / (dense / 128 + experts / 2)
    assert no_zero.memory["optimizer"] / plan.memory["optimizer"] == pytest.approx(expected, rel=1e-6)
    assert no_zero.memory["optimizer"] == pytest.approx((4 + 4) * (dense + experts), rel=1e-6)  # master + BF16 moments
    assert (
        plan_training(config, TrainLayout(**{**base.__dict__, "fp8": False})).memory["activations"]
        > plan.memory["activations"]
    )
    assert (
        plan_training(config, TrainLayout(**{**base.__dict__, "recompute": False})).memory["activations"]
        > plan.memory["activations"]
    )
    assert plan.memory["total"] == pytest.approx(sum(v for k, v in plan.memory.items() if k != "total"))


@pytest.mark.parametrize(
    "change,match",
    [
        ({"dp": 100}, "must divide --dp"),
        ({"ep": 3, "dp": 3}, "n_routed_experts 256"),
        ({"pp": 3, "dp": 64}, "even --pp"),
        ({"micro_batches": 8}, "fewer than the 16 stages"),
        ({"pp": 64, "schedule": "1f1b", "micro_batches": 64}, "cannot fill 64 pipeline stages"),
        ({"schedule": "pipedream"}, "--pp-schedule must be one of"),
    ],
)
def test_impossible_layouts_are_refused(change, match):
    layout = {"pp": 16, "dp": 128, "ep": 64, "schedule": "dualpipe", "micro_batches": 32}
    with pytest.raises(TrainPlanError, match=match):
        plan_training(ds.DeepseekV3Config.from_pretrained(V3), TrainLayout(**{**layout, **change}))


def test_one_schedule_vocabulary_for_pretrain_and_plan(tmp_path, capsys):
    """plan --train plans every schedule pretrain runs (with the same stage placement) and the two torch has no
    class for; pretrain refuses those two by name, pointing at plan --train."""
    from modeling_deepseekv3.distributed.pipeline import torch_schedule
    from modeling_deepseekv3.distributed.schedules import RUNNABLE, SCHEDULES

    assert set(RUNNABLE) < set(SCHEDULES) and {"zb1p", "dualpipe"} == set(SCHEDULES) - set(RUNNABLE)
    for name in RUNNABLE:
        assert isinstance(torch_schedule(name), type)
    config = ds.DeepseekV3Config(**{**TINY_CONFIG, "num_hidden_layers": 16})
    for name, schedule in SCHEDULES.items():
        plan = plan_training(config, TrainLayout(pp=4, schedule=name, micro_batches=16, seq_len=64))
        assert plan.stages == schedule.num_stages(4) and schedule.bubble_formula in plan.bubble_formula
    (tmp_path / "data.txt").write_text("some text " * 100)
    argv = ["pretrain", "--model-config", "tiny", "--data", str(tmp_path / "data.txt"), "--output", str(tmp_path / "o")]
    argv += ["--pp", "2"]
    assert cli([*argv, "--pp-schedule", "dualpipe"]) == 2
    err = capsys.readouterr().err
    assert "planned on paper only" in err and "plan --train" in err and "dualpipev" in err


def test_cli_plan_train(capsys):
    argv = ["plan", str(V3), "--train", "--pp", "16", "--pp-schedule", "dualpipe", "--ep", "64", "--dp", "128"]
    assert cli([*argv, "--gpus", "80GiB"]) in (0, 1)
    out = capsys.readouterr().out
    assert "671.0B main" in out and "bubble: (PP/2-1)(F&B+B-3W) with PP=16" in out and "in 80 GiB" in out
    assert cli([*argv, "--gpus", "8GiB"]) == 1 and "DOES NOT FIT" in capsys.readouterr().out
