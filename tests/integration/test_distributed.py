"""``deepseek-v3 pretrain --dp 2`` / ``--ep 2`` / ``--pp 2`` (every schedule) / ``--pp 2 --ep 2`` under real
``torchrun`` (gloo, CPU) against the single-process run: same per-step losses, gradient norms, expert loads (bias
updates) and evaluation; the final weights and the exports agree; checkpoints resume across layouts (2 ranks -> 1
process and back); bad layouts are refused on every rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import load
from modeling_deepseekv3.distributed.checkpoint import latest_checkpoint

COMMON = [
    "--model-config",
    "tiny",
    "--vocab-size",
    "512",
    "--seq-len",
    "32",
    "--global-batch-size",
    "8",
    "--steps",
    "6",
    "--lr",
    "3e-3",
    "--warmup-steps",
    "2",
    "--eval-every",
    "3",
    "--save-every",
    "3",
    "--quiet",
    "--threads",
    "1",
]


def pretrain(texts, out, *extra, ranks: int = 1, check=True):
    data = [
        "--data",
        str(texts / "train"),
        "--eval-data",
        str(texts / "eval.txt"),
        "--output",
        str(out),
        "--log-json",
        str(out / "log.jsonl"),
    ]
    cmd = [sys.executable, "-m", "modeling_deepseekv3", "pretrain", *COMMON, *data, *extra]
    if ranks > 1:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            str(ranks),
            *cmd[1:],
        ]  # torchrun runs `-m modeling_deepseekv3 ...` in each rank
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    if check:
        assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def weights(out):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    dcp_to_torch_save(latest_checkpoint(out / "checkpoints"), out / "final.pt")
    return torch.load(out / "final.pt", weights_only=False)["model"]


def assert_same_run(a: list[dict], b: list[dict], rel=1e-5):
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for x, y in zip(a, b):
        for key in ("loss", "lm_loss", "mtp_loss", "balance_loss", "grad_norm", "eval_loss"):
            if key in x:
                assert y[key] == pytest.approx(x[key], rel=rel), (x["step"], key, x[key], y[key])
        assert x["expert_load_imbalance"] == y["expert_load_imbalance"], x["step"]  # the same counts


@pytest.fixture(scope="module")
def runs(texts, tmp_path_factory):
    root = tmp_path_factory.mktemp("dp")
    pretrain(texts, root / "single", "--micro-batch-size", "4")
    pretrain(texts, root / "dp2", "--dp", "2", "--micro-batch-size", "2", ranks=2)
    pretrain(texts, root / "ep2", "--ep", "2", "--micro-batch-size", "2", ranks=2)
    return root


@pytest.mark.slow  # torchrun
def test_dp2_equals_the_single_process_run(runs):
    single, dp2 = log(runs / "single"), log(runs / "dp2")
    assert len(single) == 6 and [r["step"] for r in single if "eval_loss" in r] == [3, 6]
    assert_same_run(single, dp2)
    a, b = weights(runs / "single"), weights(runs / "dp2")
    assert a.keys() == b.keys()
    for k in a:  # router biases moved identically (global counts); weights within float rounding
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    summary = json.loads((runs / "dp2" / "summary.json").read_text())
    assert summary["data_parallel"] == 2


@pytest.mark.slow  # torchrun
def test_dp2_exports_the_same_model(runs):
    """Rank 0 gathers the sharded model and writes the official BF16 and FP8 exports, as a single process does."""
    single, dp2 = load(runs / "single" / "bf16"), load(runs / "dp2" / "bf16")
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(dp2(ids).logits, single(ids).logits, rtol=1e-2, atol=2e-2)  # BF16 storage
    assert load(runs / "dp2" / "fp8").config.is_fp8


@pytest.mark.slow  # torchrun
def test_ep2_equals_the_single_process_run(runs):
    """Expert parallelism: each rank holds 4 of the 8 routed experts of every MoE layer (MTP layer included) and half
    of every batch; rows travel by all-to-all. Same losses, gradient norms, expert loads and evaluation as one
    process; the checkpoint holds every expert once, under the single-process names; the export is the same model."""
    single, ep2 = log(runs / "single"), log(runs / "ep2")
    assert_same_run(single, ep2)
    a, b = weights(runs / "single"), weights(runs / "ep2")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-6, msg=k)
    assert json.loads((runs / "ep2" / "summary.json").read_text())["expert_parallel"] == 2
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(
            load(runs / "ep2" / "bf16")(ids).logits, load(runs / "single" / "bf16")(ids).logits, rtol=1e-2, atol=2e-2
        )


@pytest.mark.slow  # torchrun
@pytest.mark.parametrize("first,then", [("ep2", 1), (1, "ep2")])
def test_ep_resumes_across_layouts(runs, texts, tmp_path, first, then):
    import shutil

    src = runs / ("ep2" if first == "ep2" else "single")
    out = tmp_path / "resumed"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("step-0000006", "bf16", "fp8", "final.pt"))
    extra = ["--ep", "2", "--micro-batch-size", "2"] if then == "ep2" else ["--micro-batch-size", "4"]
    pretrain(texts, out, "--resume", "--no-export", *extra, ranks=2 if then == "ep2" else 1)
    assert_same_run(log(runs / "single"), log(out))


@pytest.mark.slow  # torchrun
def test_ep2_inside_dp4_equals_the_single_process_run(runs, texts, tmp_path):
    """DeepSeek's arrangement, expert parallelism inside data parallelism: 4 data ranks in 2 expert-parallel groups
    of 2, each group holding a copy of the experts (their gradients summed over the copies)."""
    pretrain(texts, tmp_path / "ep2dp4", "--ep", "2", "--dp", "4", "--micro-batch-size", "2", "--no-export", ranks=4)
    assert_same_run(log(runs / "single"), log(tmp_path / "ep2dp4"))


@pytest.mark.slow  # torchrun
def test_ep_composes_with_fp8_training(texts, tmp_path):
    """FP8 training (emulated recipe) under --ep 2 follows the single-process FP8 run. Not to 1e-5: the weight
    gradient's 128x1 tiles run over an expert's rows, which the all-to-all groups differently."""
    pretrain(texts, tmp_path / "single", "--fp8", "--micro-batch-size", "2", "--no-export")
    pretrain(texts, tmp_path / "ep2", "--fp8", "--ep", "2", "--micro-batch-size", "2", "--no-export", ranks=2)
    for x, y in zip(log(tmp_path / "single"), log(tmp_path / "ep2"), strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=1e-3), x["step"]


def test_expert_counts_that_do_not_divide_are_refused():
    import modeling_deepseekv3 as ds
    from modeling_deepseekv3.checkpoint import TINY_CONFIG
    from modeling_deepseekv3.distributed.expert_parallel import ExpertParallelError, apply_expert_parallel
    from modeling_deepseekv3.distributed.layout import Layout

    model = ds.DeepseekV3ForCausalLM(ds.DeepseekV3Config(**TINY_CONFIG))
    n = model.config.n_routed_experts
    with pytest.raises(ExpertParallelError, match=f"{n} routed experts do not divide over 3 ranks"):
        apply_expert_parallel(model, Layout(ep=3, dp=1))


@pytest.mark.slow  # torchrun
@pytest.mark.parametrize("first,then", [(2, 1), (1, 2)])
def test_resume_across_layouts(runs, texts, tmp_path, first, then):
    """A checkpoint written by one layout continues under another with the uninterrupted run's losses."""
    import shutil

    src = runs / ("dp2" if first == 2 else "single")
    out = tmp_path / "resumed"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("step-0000006", "bf16", "fp8", "final.pt"))
    extra = ["--dp", "2"] if then == 2 else []
    pretrain(texts, out, "--resume", "--no-export", *extra, ranks=then)
    assert_same_run(log(runs / "single"), log(out))


@pytest.mark.slow  # torchrun
def test_bad_layouts_are_refused_before_any_work(texts, tmp_path):
    proc = pretrain(texts, tmp_path / "a", "--dp", "2", check=False)  # not under torchrun
    assert proc.returncode == 2 and "torchrun --nproc-per-node 2" in proc.stderr
    # each rank refuses on its own; torchrun may stop the slower one before it writes (a loaded machine), so >= 1
    proc = pretrain(texts, tmp_path / "b", "--dp", "3", ranks=2, check=False)
    assert proc.returncode != 0 and proc.stderr.count("--dp 3 needs 3 processes (--dp), but torchrun started 2") >= 1
    proc = pretrain(texts, tmp_path / "c", "--dp", "2", "--micro-batch-size", "3", ranks=2, check=False)
    assert proc.returncode != 0 and "not divisible by --micro-batch-size 3 x --dp 2" in proc.stderr
    proc = pretrain(texts, tmp_path / "d", "--ep", "4", ranks=2, check=False)
    assert proc.returncode != 0 and proc.stderr.count("--ep 4 must divide the 2 data-parallel ranks") >= 1
    proc = pretrain(texts, tmp_path / "e", "--ep", "2", "--dp", "4", ranks=2, check=False)
    assert proc.returncode != 0 and "needs 4 processes (--dp), but torchrun started 2" in proc.stderr
    proc = pretrain(texts, tmp_path / "f", "--ep", "2", check=False)  # not under torchrun
    assert proc.returncode == 2 and "torchrun --nproc-per-node 2" in proc.stderr
    assert not (tmp_path / "c" / "checkpoints").exists()


def tp_run(checkpoint, tmp_path, mode: str = "tp") -> list[dict]:
    """``tp_plan="auto"`` (or, ``mode="ep"``, expert parallelism through ``distributed_config``) on 2 gloo ranks
    (tests/integration/_tp_worker.py); each rank's report."""
    report = tmp_path / f"{mode}.json"
    worker = Path(__file__).with_name("_tp_worker.py")
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        str(worker),
        str(checkpoint),
        str(report),
        mode,
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [json.loads(Path(f"{report}.{r}").read_text()) for r in (0, 1)]


@pytest.mark.slow  # torchrun
@pytest.mark.parametrize("fp8", [False, True])
def test_tp_plan_auto_equals_single_process(tmp_path, fp8):
    """transformers' own tensor parallelism on our declared plan: MLPs and experts sharded over 2 ranks give the
    single-process logits and greedy tokens, BF16 and FP8 (widths in whole 128-blocks per rank)."""
    import modeling_deepseekv3 as ds

    ckpt = ds.make_tiny_checkpoint(
        tmp_path / "ckpt", fp8=fp8, overrides={"intermediate_size": 512, "moe_intermediate_size": 256}
    )
    rank0, rank1 = tp_run(ckpt, tmp_path)
    assert rank0["sharded"] == rank1["sharded"] == "DTensor"
    assert rank0["max_diff"] < 1e-4 and rank0["generate_equal"], rank0


@pytest.mark.slow  # torchrun
@pytest.mark.parametrize("fp8", [False, True])
def test_expert_parallel_inference_through_distributed_config(tmp_path, fp8):
    """``from_pretrained(..., distributed_config=DistributedConfig(tp_size=2, ep_size=2, tp_plan={}))``: each rank
    loads only its half of every MoE layer's routed experts; logits and greedy tokens equal one process's."""
    import modeling_deepseekv3 as ds

    ckpt = ds.make_tiny_checkpoint(tmp_path / "ckpt", fp8=fp8)
    rank0, rank1 = tp_run(ckpt, tmp_path, mode="ep")
    n = len(rank0["held_experts"]) + len(rank1["held_experts"])
    assert set(rank0["held_experts"]).isdisjoint(rank1["held_experts"]) and len(rank0["held_experts"]) == n // 2
    assert rank0["max_diff"] < 1e-4 and rank0["generate_equal"], rank0


@pytest.mark.slow  # torchrun
def test_tp_plan_refuses_fp8_slices_that_cut_blocks(tiny_fp8, tmp_path):
    reports = tp_run(tiny_fp8, tmp_path)  # the tiny default: 384 / 192-wide MLPs -> 192 / 96-wide slices
    assert all("cut its 128-wide FP8 scale blocks" in r.get("error", "") for r in reports), reports


@pytest.mark.slow  # torchrun
def test_a_dead_rank_stops_the_run_and_the_last_checkpoint_resumes(texts, tmp_path):
    """SIGKILL one of two ranks mid-run: the survivor and torchrun exit non-zero within a minute instead of
    hanging in a collective, and the last complete checkpoint continues in a single process."""
    import signal
    import time

    out = tmp_path / "run"

    def command(steps: int) -> list[str]:
        args = list(COMMON)
        args[args.index("--steps") + 1] = str(steps)
        return [
            "-m",
            "modeling_deepseekv3",
            "pretrain",
            *args,
            "--no-export",
            "--data",
            str(texts / "train"),
            "--output",
            str(out),
            "--log-json",
            str(out / "log.jsonl"),
        ]

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc-per-node",
            "2",
            *command(400),
            "--dp",
            "2",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    log_file, deadline = out / "log.jsonl", time.time() + 300
    while time.time() < deadline and not (log_file.exists() and len(log_file.read_text().splitlines()) >= 8):
        time.sleep(0.2)
    ranks = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(ranks) == 2, ranks
    os.kill(int(ranks[-1]), signal.SIGKILL)
    t0 = time.time()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0 and time.time() - t0 < 60, err[-2000:]
    last = latest_checkpoint(out / "checkpoints")
    assert last is not None
    step = int(last.name.split("-")[1])
    resumed = subprocess.run(
        [sys.executable, *command(step + 3), "--resume"],
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert [r["step"] for r in log(out)][-3:] == [step + 1, step + 2, step + 3]


@pytest.fixture(scope="module")
def four_layers(tmp_path_factory):
    """The tiny preset with 4 decoder layers: 2 pipeline ranks x 2 stages each in the V."""
    from importlib.resources import files

    cfg = json.loads((files("modeling_deepseekv3.training") / "presets" / "tiny.json").read_text())
    path = tmp_path_factory.mktemp("cfg") / "config.json"
    path.write_text(json.dumps({**cfg, "num_hidden_layers": 4}))
    return path


def pp_run(texts, out, config, *extra, ranks=1):
    """``pretrain`` on the 4-layer config with 4 micro-batches of 2 (the last --model-config wins)."""
    return pretrain(texts, out, "--model-config", str(config), "--micro-batch-size", "2", *extra, ranks=ranks)


@pytest.fixture(scope="module")
def pp_runs(texts, four_layers, tmp_path_factory):
    root = tmp_path_factory.mktemp("pp")
    pp_run(texts, root / "single", four_layers)
    for schedule in PP_SCHEDULES:
        pp_run(texts, root / schedule, four_layers, "--pp", "2", "--pp-schedule", schedule, ranks=2)
    # 2 pipelines of 2 stages; the 2 ranks of each position split the batch and the experts
    pretrain(
        texts,
        root / "pp2xep2",
        "--model-config",
        str(four_layers),
        "--micro-batch-size",
        "1",
        "--pp",
        "2",
        "--ep",
        "2",
        ranks=4,
    )
    # 2 pipelines (1F1B) whose data ranks hold the weights whole and average their gradients
    pretrain(
        texts,
        root / "pp2xdp2",
        "--model-config",
        str(four_layers),
        "--micro-batch-size",
        "2",
        "--pp",
        "2",
        "--dp",
        "2",
        "--pp-schedule",
        "1f1b",
        ranks=4,
    )
    # DualPipeV's overlapped pairs in two threads, each direction's all-to-alls on its own communicator
    pretrain(
        texts,
        root / "pp2xep2-overlap",
        "--model-config",
        str(four_layers),
        "--micro-batch-size",
        "1",
        "--pp",
        "2",
        "--ep",
        "2",
        "--pp-overlap",
        ranks=4,
    )
    return root


PP_SCHEDULES = ("dualpipev", "zbv", "1f1b", "gpipe", "interleaved1f1b")


@pytest.mark.slow  # torchrun
@pytest.mark.parametrize("schedule", [*PP_SCHEDULES, "pp2xep2", "pp2xep2-overlap", "pp2xdp2"])
def test_pp2_equals_the_single_process_run(pp_runs, schedule):
    """torch.distributed.pipelining, 4 micro-batches: V placement (dualpipev, zbv: 4 stages on 2 ranks), one stage
    per rank (1f1b, gpipe: the MTP layer on rank 1 with a replica of the embedding whose gradient the two ranks
    sum), looped (interleaved1f1b); and 2 x 2 ranks of pipeline x expert parallelism, also with DualPipeV's
    overlapped forward+backward pairs run in two threads, and of pipeline x (replicated) data parallelism. The same losses (MTP on the
    last stage, balance losses injected where their layers run), gradient norms, expert loads and evaluation."""
    single, piped = log(pp_runs / "single"), log(pp_runs / schedule)
    assert_same_run(single, piped)
    a, b = weights(pp_runs / "single"), weights(pp_runs / schedule)
    assert a.keys() == b.keys()  # every rank saved its own layers under the single-process names
    # atol: the pp x ep runs accumulate micro-batches of 1 (the single run: of 2), and AdamW's g / sqrt(v) turns
    # that rounding on near-zero gradients into weight differences up to ~2e-6 after 6 steps on an AVX2 CPU
    # (AMD EPYC, measured; the same with and without --pp-overlap; earlier runs on an AVX-512 Xeon stayed under 1e-6)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=5e-6, msg=k)
    summary = json.loads((pp_runs / schedule / "summary.json").read_text())
    assert summary["pipeline_parallel"] == 2 and summary["expert_parallel"] == (2 if "ep2" in schedule else 1)
    exported, reference = load(pp_runs / schedule / "bf16"), load(pp_runs / "single" / "bf16")
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(exported(ids).logits, reference(ids).logits, rtol=1e-2, atol=2e-2)


@pytest.mark.slow  # torchrun
def test_pp_composes_with_fp8_training(texts, four_layers, tmp_path):
    """FP8 training (emulated recipe) through DualPipeV's split backward follows the single-process FP8 run (to float
    rounding of the split input/weight gradients: near-tied expert choices may flip late in the run)."""
    pp_run(texts, tmp_path / "single", four_layers, "--fp8", "--no-export")
    pp_run(texts, tmp_path / "pp2", four_layers, "--fp8", "--pp", "2", "--no-export", ranks=2)
    # rel: 1.3e-4 at step 5 on an AMD EPYC (AVX2), the same before and after the stage became the core forward
    for x, y in zip(log(tmp_path / "single"), log(tmp_path / "pp2"), strict=True):
        assert y["loss"] == pytest.approx(x["loss"], rel=3e-4), x["step"]


@pytest.mark.slow  # torchrun
@pytest.mark.parametrize("first,then", [("dualpipev", 1), (1, "dualpipev")])
def test_pp_resumes_across_layouts(pp_runs, texts, four_layers, tmp_path, first, then):
    import shutil

    src = pp_runs / (first if first != 1 else "single")
    out = tmp_path / "resumed"
    shutil.copytree(src, out, ignore=shutil.ignore_patterns("step-0000006", "bf16", "fp8", "final.pt"))
    extra = ["--pp", "2"] if then != 1 else []
    pp_run(texts, out, four_layers, "--resume", "--no-export", *extra, ranks=2 if then != 1 else 1)
    assert_same_run(log(pp_runs / "single"), log(out))


@pytest.mark.slow  # torchrun
@pytest.mark.parametrize(
    "extra,match",
    [
        (["--pp-schedule", "zbv", "--micro-batch-size", "4"], "needs at least 4 micro-batches"),
        (["--dp", "2"], "needs 4 processes (--pp x --dp), but torchrun started 2"),
        (["--pp-schedule", "1f1b", "--pp-overlap"], "--pp-schedule 1f1b has none"),
    ],
)
def test_bad_pipeline_layouts_are_refused(texts, four_layers, tmp_path, extra, match):
    proc = pretrain(
        texts, tmp_path / "x", "--model-config", str(four_layers), "--pp", "2", *extra, ranks=2, check=False
    )
    assert proc.returncode != 0 and proc.stderr.count(match) == 2, proc.stderr[-2000:]  # every rank says so


@pytest.mark.slow  # torchrun
def test_pipeline_needs_enough_layers(texts, tmp_path):
    proc = pretrain(texts, tmp_path / "x", "--pp", "2", ranks=2, check=False)  # the 2-layer tiny preset
    assert proc.returncode != 0 and "cannot fill the 4 stages of --pp 2 --pp-schedule dualpipev" in proc.stderr
    proc = pretrain(texts, tmp_path / "y", "--pp", "2", check=False)  # not under torchrun
    assert proc.returncode == 2 and "torchrun --nproc-per-node 2" in proc.stderr


MISMATCH_WORKER = """
import os, torch.distributed as dist
from modeling_deepseekv3.distributed.layout import DataParallelError, Layout, check_same_on_every_rank
dist.init_process_group("gloo")
rank = dist.get_rank()
try:
    check_same_on_every_rank(Layout(dp=2, rank=rank, mesh="grid"), {"config": "abc", "data": f"shard-{rank}"})
except DataParallelError as e:
    print(f"rank {rank}: {e}", flush=True)
dist.destroy_process_group()
"""


@pytest.mark.slow  # torchrun
def test_ranks_with_different_inputs_are_refused_on_every_rank(tmp_path):
    """Ranks launched with different data (or config, or flags) stop with the same clear error, before any work."""
    script = tmp_path / "worker.py"
    script.write_text(MISMATCH_WORKER)
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, OMP_NUM_THREADS="1"),
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    for rank in (0, 1):
        assert f"rank {rank}: rank 1 runs with a different data than rank 0 (shard-1 vs shard-0)" in proc.stdout
