"""Pipeline schedules under ``torch.distributed.pipelining``: step time and measured idle (bubble) per schedule,
beside the bubble formulas of DualPipe's table.

    python benchmarks/pipeline.py                 # 2 and 4 gloo ranks, every schedule
    python benchmarks/pipeline.py --ranks 2 --steps 6 --schedules 1f1b dualpipev

Each configuration runs in its own ``torchrun`` (gloo, CPU, 1 thread per rank) with the same model (8 decoder
layers, MoE, MTP layer), the same global batch and micro-batches, through ``PipelineTrainer`` -- the code
``pretrain --pp`` runs. Every compute action (F forward chunk, B full or input-gradient backward, W weight-gradient
backward) is timestamped on every rank (``PipelineTrainer(timeline=True)``). Per step and rank:

* busy = the time covered by actions (the union of their intervals: under ``dualpipev+overlap`` a pair's forward
  and backward run in two threads at once, and "overlap s" is the time two actions ran together) (L, the last stage's loss: head, cross-entropy and the MTP layer,
  counts as compute too), idle = step wall time - busy (waiting for a neighbour, i.e. the
  bubble, plus communication and schedule overhead, which the formulas leave out);
* the formula's bubble in seconds, from the measured median F, B and W of that run: 1F1B (also GPipe's)
  ``(PP-1)(F+B)``, DualPipeV ``(PP/2-1)(F&B+B-3W)`` with PP = stages and F&B = F+B (the two halves of an
  overlapped pair run one after the other here: on CPU there is no second stream to overlap them on). ZB-V and
  interleaved 1F1B have no row in DualPipe's table; their measured idle stands alone.

Measured idle exceeds the formulas, which assume equal stages and free communication: the last stage also runs
the loss (L: head, cross-entropy, the MTP layer) and its backward, and at these sizes (10-40 ms actions) gloo's
point-to-point transfers and the schedule's per-action Python work are a visible share of every step.

Figures are the medians over the timed steps (after one warm-up step). A configuration with more ranks than
CPU cores is run but its figures are marked: time-slicing stretches the actions, so idle is understated and no
measured/formula ratio is printed for it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SCHEDULES = ("gpipe", "1f1b", "interleaved1f1b", "zbv", "dualpipev", "dualpipev+overlap")
LAYERS, MICRO_BATCHES, MICRO_BATCH_SIZE, SEQ = 8, 8, 2, 64


def _config():
    import modeling_deepseekv3 as ds

    return ds.DeepseekV3Config(
        vocab_size=2048,
        hidden_size=256,
        intermediate_size=512,
        moe_intermediate_size=128,
        num_hidden_layers=LAYERS,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        q_lora_rank=128,
        kv_lora_rank=128,
        qk_nope_head_dim=32,
        qk_rope_head_dim=16,
        v_head_dim=32,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        num_nextn_predict_layers=1,
        max_position_embeddings=512,
        use_cache=False,
    )


def worker(schedule: str, steps: int, out: str) -> None:
    """One rank of one configuration (under torchrun): time ``steps`` + 1 training steps, write rank 0's summary."""
    import torch
    import torch.distributed as dist

    from modeling_deepseekv3.distributed.layout import init_layout
    from modeling_deepseekv3.distributed.pipeline import PipelineTrainer, num_stages
    from modeling_deepseekv3.modeling import DeepseekV3ForCausalLM

    torch.set_num_threads(1)
    pp = int(os.environ["WORLD_SIZE"])
    layout = init_layout(None, pp)
    torch.manual_seed(0)
    config = _config()
    config.mtp_loss_weight = 0.3
    model = DeepseekV3ForCausalLM(config).train()
    name, _, overlap = schedule.partition("+")
    trainer = PipelineTrainer(
        model, layout, name, MICRO_BATCHES, (MICRO_BATCH_SIZE, SEQ), timeline=True, overlap=bool(overlap)
    )
    windows = torch.randint(
        0, config.vocab_size, (MICRO_BATCHES * MICRO_BATCH_SIZE, SEQ + 1), generator=torch.Generator().manual_seed(1)
    )
    records = []
    for step in range(steps + 1):
        dist.barrier()
        t0 = time.perf_counter()
        trainer.train_step(windows)
        wall = time.perf_counter() - t0
        model.zero_grad(set_to_none=True)
        if step:  # the first step warms up (allocations, the schedule's first communication)
            records.append({"wall": wall, "actions": [(k, ts - t0, t1 - t0) for k, _, ts, t1 in trainer.timeline]})
    everyone = [None] * pp
    dist.all_gather_object(everyone, records)
    if layout.is_main:
        Path(out).write_text(
            json.dumps({"schedule": schedule, "ranks": pp, "stages": num_stages(name, pp), "per_rank": everyone})
        )
    dist.destroy_process_group()


def _union(intervals) -> float:
    """Length of the union of ``(start, end)`` intervals (overlapped actions count once)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(intervals):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def summarize(result: dict) -> dict:
    """Medians over steps of the mean over ranks; F/B/W/L medians over every action of the run."""
    per_rank, stages = result["per_rank"], result["stages"]
    steps = len(per_rank[0])
    walls, idles, busies, overlaps = [], [], [], []
    for s in range(steps):
        wall = max(r[s]["wall"] for r in per_rank)  # the step ends when the slowest rank is done
        busy = [_union((a, b) for _, a, b in r[s]["actions"]) for r in per_rank]
        summed = [sum(b - a for _, a, b in r[s]["actions"]) for r in per_rank]
        walls.append(wall)
        busies.append(statistics.mean(busy))
        idles.append(statistics.mean(wall - b for b in busy))
        overlaps.append(statistics.mean(x - b for x, b in zip(summed, busy)))
    durations = {k: [b - a for r in per_rank for rec in r for kk, a, b in rec["actions"] if kk == k] for k in "FBWL"}
    f = statistics.median(durations["F"])
    b_in = statistics.median(durations["B"])
    w = statistics.median(durations["W"]) if durations["W"] else 0.0
    b = b_in + w  # a full backward (input + weight gradients), the table's B
    formula = None
    if result["schedule"] in ("gpipe", "1f1b"):
        formula = ("(PP-1)(F+B)", (stages - 1) * (f + b))
    elif result["schedule"].startswith("dualpipev"):
        formula = ("(PP/2-1)(F&B+B-3W)", (stages / 2 - 1) * ((f + b) + b - 3 * w))
    return {
        "wall": statistics.median(walls),
        "busy": statistics.median(busies),
        "idle": statistics.median(idles),
        "overlap": statistics.median(overlaps),
        "F": f,
        "B": b,
        "W": w,
        "L": statistics.median(durations["L"]),
        "formula": formula,
        "steps": steps,
        "stages": stages,
    }


def run(ranks: int, schedule: str, steps: int, tmp: Path) -> dict:
    out = tmp / f"{schedule}-{ranks}.json"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        str(ranks),
        __file__,
        "--worker",
        schedule,
        "--steps",
        str(steps),
        "--out",
        str(out),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800)
    if proc.returncode:
        raise SystemExit(f"{schedule} on {ranks} ranks failed:\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ranks", type=int, nargs="+", default=[2, 4])
    ap.add_argument("--schedules", nargs="+", choices=SCHEDULES, default=list(SCHEDULES))
    ap.add_argument("--steps", type=int, default=5, help="timed steps per configuration (after one warm-up)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps, args.out)
        return
    cores = os.cpu_count() or 1
    print(
        f"{LAYERS} layers, {MICRO_BATCHES} micro-batches of {MICRO_BATCH_SIZE} x {SEQ} tokens, gloo, 1 thread per "
        f"rank, {cores} CPU cores; medians of {args.steps} steps"
    )
    header = (
        f"{'ranks':>5} {'schedule':<18} {'stages':>6} {'step s':>8} {'busy s':>8} {'idle s':>8} {'idle %':>7} "
        f"{'F ms':>7} {'B ms':>7} {'W ms':>7} {'L ms':>7} {'overlap s':>9}  formula bubble"
    )
    print(header)
    with tempfile.TemporaryDirectory() as tmp:
        for ranks in args.ranks:
            for schedule in args.schedules:
                s = summarize(run(ranks, schedule, args.steps, Path(tmp)))
                if not (0 < s["busy"] <= s["wall"] * 1.001 and s["F"] > 0 and s["B"] > 0):
                    print(
                        f"{ranks:>5} {schedule:<18} implausible timings (busy {s['busy']:.3f} s of a "
                        f"{s['wall']:.3f} s step); not reported"
                    )
                    continue
                oversubscribed = ranks > cores
                line = (
                    f"{ranks:>5} {schedule:<18} {s.get('stages', ''):>6} {s['wall']:8.3f} {s['busy']:8.3f} "
                    f"{s['idle']:8.3f} {100 * s['idle'] / s['wall']:6.1f}% {1e3 * s['F']:7.1f} "
                    f"{1e3 * s['B']:7.1f} {1e3 * s['W']:7.1f} {1e3 * s['L']:7.1f} {s['overlap']:9.3f}  "
                )
                if s["formula"] is None:
                    line += "(not in DualPipe's table)"
                else:
                    name, seconds = s["formula"]
                    line += f"{name} = {seconds:.3f} s"
                    if oversubscribed:
                        line += f" (no ratio: {ranks} ranks on {cores} cores)"
                    elif s["overlap"] > 0:  # F and B ran in pairs: their durations, the formula's inputs, are stretched
                        line += " (no ratio: overlapped actions stretch F and B)"
                    elif seconds > 0:
                        line += f"; measured idle / formula = {s['idle'] / seconds:.2f}"
                print(line, flush=True)


if __name__ == "__main__":
    main()
