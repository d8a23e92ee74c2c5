"""A real-size model on a 24 GB CPU box: Moonlight-16B-A3B's shape as an official-layout FP8 checkpoint.

Moonlight-16B-A3B is the DeepSeek-V3 architecture at 16B parameters (27 layers, hidden 2048, 64 routed experts top-6
+ 2 shared, MLA with kv_lora_rank 512 and no q_lora, vocab 163840; ``hub_config/moonlight/config.json``). In FP8 its
weights are ~16.6 GB; in BF16 they would be ~32 GB, more than this box holds. The weights here are random from a
seed (``make_tiny_checkpoint(config=...)``: FP8 block-scaled like the official files), written once into
``--workdir`` shard by shard with a progress bar (a few minutes; the benchmark's job, never the tests').

Each phase runs in its own process, so each peak RSS is that phase's alone:

* ``decode``: ``from_pretrained(dtype=bfloat16)`` (FP8 codes stay FP8: zero-copy views of the mmapped shards;
  embedding, norms and ``lm_head`` in BF16), its seconds and peak RSS; then greedy decode after a short prompt at
  each ``--threads`` (median step of ``--new-tokens``, ``--rounds`` rounds), the weight bytes one token reads
  (routed experts at top-k / n_routed, the embedding as one row) and that as a fraction of this machine's
  measured read bandwidth; peak RSS over the whole phase (mapped weights included: everything this process held).
  The same with the decode step compiled (``cache_implementation="static"``, ``compile_config=CompileConfig(
  fullgraph=True)``), compiled once per thread count (its seconds printed), rounds alternating with the eager ones.
* ``llamacpp``: llama.cpp (``llama-cpp-python``, as in ``vs_llamacpp.py``) decoding the same weights: a Q8_0 GGUF
  that llama.cpp's converter writes from our BF16 export (the 33 GB export is deleted afterwards; done once, ~10
  minutes), same prompt, same thread counts, the same figures. Our model and llama.cpp's do not fit in memory
  together, so they run in turn, ``--repeat`` times each, alternating; medians over the repeats.
* ``lora``: PEFT LoRA (r=8) over every FP8 linear, the routed experts included (``lora_config(model)``), the base
  frozen and FP8; ``--lora-steps`` AdamW steps on a ``--lora-seq``-token batch: seconds per step, trainable
  parameters, peak RSS.

    python benchmarks/moonlight_cpu.py [--phases decode,llamacpp,lora] [--threads 1,2] [--new-tokens 16] [--repeat 2]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "hub_config" / "moonlight" / "config.json"
GiB = 2**30


def peak_rss() -> int:
    """The process's high-water resident bytes: anonymous memory and the mapped weight pages it touched."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_anon() -> int:
    """Resident anonymous bytes now (what is not the mapped checkpoint)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    return 0


def read_through(files) -> None:
    """Read files once so their pages sit in the page cache: both engines map their weights, and the two models do
    not fit in memory together, so each phase starts by bringing its own back (not timed)."""
    for file in files:
        with open(file, "rb") as f:
            while f.read(1 << 24):
                pass


def write_checkpoint(workdir: Path) -> Path:
    import modeling_deepseekv3 as ds

    path = workdir / "fp8"
    if not (path / "config.json").is_file():
        print(f"writing the Moonlight-shape FP8 checkpoint (random weights, seed 0) to {path}", flush=True)
        t0 = time.perf_counter()
        config = json.loads(CONFIG.read_text())
        ds.make_tiny_checkpoint(path, config=config, mtp=False, num_shards=34, progress=True)
        print(f"wrote it in {time.perf_counter() - t0:.0f} s", flush=True)
    return path


def load(path: Path):
    import torch

    import modeling_deepseekv3 as ds

    read_through(sorted(path.glob("*.safetensors")))
    t0 = time.perf_counter()
    model = ds.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    seconds = time.perf_counter() - t0
    return model, {"load_s": seconds, "load_peak_rss_gib": peak_rss() / GiB, "load_anon_gib": rss_anon() / GiB}


def phase_decode(path: Path, args) -> dict:
    import torch
    from timing import StepClock, checked
    from vs_llamacpp import ours_bytes_per_token, read_bandwidth

    model, out = load(path)
    config = model.config
    out["bytes_per_token"] = nbytes = ours_bytes_per_token(model)
    out["parameters"] = sum(p.numel() for p in model.parameters())
    prompt = torch.randint(2, config.vocab_size, (1, 8), generator=torch.Generator().manual_seed(0))
    # no EOS rather than min_new_tokens, whose logits processors cost ~1 ms a step at this vocabulary (vs_llamacpp.py)
    kw = {"do_sample": False, "max_new_tokens": args.new_tokens + 1, "eos_token_id": None}

    from transformers.generation.configuration_utils import CompileConfig

    compiled = {"cache_implementation": "static", "compile_config": CompileConfig(fullgraph=True, mode="default")}

    def step_seconds(**extra) -> float:
        clock = StepClock()
        model.generate(prompt, streamer=clock, pad_token_id=0, **kw, **extra)
        return statistics.median(b - a for a, b in zip(clock.times[1:], clock.times[2:]))  # decode steps only

    for t in args.threads:
        bandwidth = read_bandwidth(t)
        torch.set_num_threads(t)
        model.generate(prompt, pad_token_id=0, do_sample=False, max_new_tokens=3)  # warm-up: pages the weights in
        torch._dynamo.reset()  # inductor sizes its kernels' parallelism for the threads it compiles with
        model.__dict__.pop("_compiled_call", None)
        t0 = time.perf_counter()
        step_seconds(**compiled)  # compiles
        compile_s = time.perf_counter() - t0
        eager, fast = [], []
        for _ in range(args.rounds):
            eager.append(step_seconds())
            fast.append(step_seconds(**compiled))
        step = checked(statistics.median(eager), f"decode, {t} thread(s)")
        step_c = checked(statistics.median(fast), f"compiled decode, {t} thread(s)")
        out[f"{t} thread(s)"] = {
            "decode_tok_s": 1 / step,
            "read_bandwidth_gb_s": bandwidth / 1e9,
            "bandwidth_fraction": nbytes / step / bandwidth,
            "compiled_decode_tok_s": 1 / step_c,
            "compiled_bandwidth_fraction": nbytes / step_c / bandwidth,
            "compile_s": compile_s,
        }
    out["peak_rss_gib"] = peak_rss() / GiB
    out["anon_gib"] = rss_anon() / GiB
    return out


def gguf_path(workdir: Path) -> Path:
    return workdir / "moonlight-q8_0.gguf"


def phase_llamacpp(path: Path, args) -> dict:
    import torch
    from timing import checked
    from vs_llamacpp import LlamaCpp, converter_source, gguf_bytes_per_token, read_bandwidth

    import modeling_deepseekv3 as ds

    config = ds.DeepseekV3Config.from_pretrained(path)
    gguf = gguf_path(path.parent)
    read_through([gguf])
    out = {"bytes_per_token": gguf_bytes_per_token(gguf, converter_source(path.parent), config)}
    prompt = torch.randint(2, config.vocab_size, (8,), generator=torch.Generator().manual_seed(0)).tolist()
    for t in args.threads:
        bandwidth = read_bandwidth(t)
        engine = LlamaCpp(gguf, t, context=64 + args.new_tokens)
        engine.decode(prompt, 3)  # warm-up: pages the weights in
        step = checked(
            statistics.median(engine.decode(prompt, args.new_tokens)[0] for _ in range(args.rounds)), "decode"
        )
        out[f"{t} thread(s)"] = {
            "decode_tok_s": 1 / step,
            "read_bandwidth_gb_s": bandwidth / 1e9,
            "bandwidth_fraction": out["bytes_per_token"] / step / bandwidth,
        }
        del engine
    out["peak_rss_gib"] = peak_rss() / GiB
    return out


def phase_lora(path: Path, args) -> dict:
    import torch
    from peft import get_peft_model

    from modeling_deepseekv3.integrations.peft import lora_config

    model, out = load(path)
    torch.set_num_threads(max(args.threads))
    model = get_peft_model(model, lora_config(model, r=8))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    out["trainable"] = sum(p.numel() for p in trainable)
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)
    ids = torch.randint(2, model.config.vocab_size, (1, args.lora_seq), generator=torch.Generator().manual_seed(0))
    losses, seconds = [], []
    for _ in range(args.lora_steps + 1):  # the first step pages the weights in and allocates: not timed
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds.append(time.perf_counter() - t0)
        losses.append(loss.item())
    out["s_per_step"] = statistics.median(seconds[1:])
    out["losses"] = losses
    out["peak_rss_gib"] = peak_rss() / GiB
    out["anon_gib"] = rss_anon() / GiB
    return out


PHASES = {"decode": phase_decode, "llamacpp": phase_llamacpp, "lora": phase_lora}
ALTERNATING = ("decode", "llamacpp")  # run --repeat times each, in turn


def median_runs(runs: list[dict], threads: list[int]) -> dict:
    """One phase's figures, decode rates and read bandwidth the medians over its runs (the other fields from the
    first; one run's bandwidth reading on a shared host can be far off: 55 GB/s once where the others read 35)."""
    out = dict(runs[0])
    for t in threads:
        key = f"{t} thread(s)"
        rate = statistics.median(r[key]["decode_tok_s"] for r in runs)
        out[key] = {**runs[0][key], "decode_tok_s": rate, "runs": [r[key]["decode_tok_s"] for r in runs]}
        out[key]["read_bandwidth_gb_s"] = statistics.median(r[key]["read_bandwidth_gb_s"] for r in runs)
        out[key]["bandwidth_fraction"] = out["bytes_per_token"] * rate / (out[key]["read_bandwidth_gb_s"] * 1e9)
        if "compiled_decode_tok_s" in runs[0][key]:
            rate = statistics.median(r[key]["compiled_decode_tok_s"] for r in runs)
            out[key]["compiled_decode_tok_s"] = rate
            out[key]["compiled_bandwidth_fraction"] = (
                out["bytes_per_token"] * rate / (out[key]["read_bandwidth_gb_s"] * 1e9)
            )
    out["peak_rss_gib"] = max(r["peak_rss_gib"] for r in runs)
    return out


def report(name: str, r: dict, threads: list[int]) -> None:
    if name == "llamacpp":
        print(
            f"\n== llama.cpp Q8_0 ({r['bytes_per_token'] / 1e9:.2f} GB read per token), peak RSS {r['peak_rss_gib']:.2f} GiB"
        )
        for t in threads:
            row = r[f"{t} thread(s)"]
            print(
                f"  {t} thread(s): {row['decode_tok_s']:.2f} tok/s, {row['bandwidth_fraction']:.2f} of read bandwidth"
            )
        return
    print(
        f"\n== {name}: from_pretrained {r['load_s']:.1f} s, peak RSS after loading {r['load_peak_rss_gib']:.2f} GiB "
        f"(anonymous {r['load_anon_gib']:.2f} GiB)"
    )
    if name == "decode":
        print(
            f"  {r['parameters'] / 1e9:.1f}B parameters, {r['bytes_per_token'] / 1e9:.2f} GB of weights read per token"
        )
        print(
            f"  {'threads':>7s} {'decode tok/s':>12s} {'frac of BW':>10s} {'compiled':>9s} {'frac of BW':>10s} "
            f"{'read BW GB/s':>12s} {'compile s':>9s}"
        )
        for t in threads:
            row = r[f"{t} thread(s)"]
            print(
                f"  {t:7d} {row['decode_tok_s']:12.2f} {row['bandwidth_fraction']:10.2f} "
                f"{row['compiled_decode_tok_s']:9.2f} {row['compiled_bandwidth_fraction']:10.2f} "
                f"{row['read_bandwidth_gb_s']:12.1f} {row['compile_s']:9.0f}"
            )
    else:
        print(
            f"  LoRA r=8 over every FP8 linear ({r['trainable'] / 1e6:.1f}M trainable): {r['s_per_step']:.1f} s/step, "
            f"loss {r['losses'][0]:.3f} -> {r['losses'][-1]:.3f}"
        )
    print(f"  peak RSS of the phase {r['peak_rss_gib']:.2f} GiB (anonymous at the end {r['anon_gib']:.2f} GiB)")


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phases", default="decode,llamacpp,lora")
    parser.add_argument("--repeat", type=int, default=2, help="runs of each alternating phase (decode, llamacpp)")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--lora-steps", type=int, default=3)
    parser.add_argument("--lora-seq", type=int, default=128)
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "moonlight"))
    parser.add_argument("--json", default=None, help="write every figure here")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)  # run one phase, print its JSON
    args = parser.parse_args()
    args.threads = [int(t) for t in args.threads.split(",")]
    workdir = Path(args.workdir)
    if args.child:
        import transformers

        transformers.logging.set_verbosity_error()
        print(json.dumps(PHASES[args.child](workdir / "fp8", args)))
        return
    path = write_checkpoint(workdir)
    from continuous_batching import cpu_model
    from timing import ratio

    print(
        f"{cpu_model()}; checkpoint {path} ({sum(f.stat().st_size for f in path.glob('*.safetensors')) / 1e9:.1f} GB)"
    )
    phases = args.phases.split(",")
    unknown = [name for name in phases if name not in PHASES]
    if unknown:
        sys.exit(f"--phases: unknown phase {unknown[0]!r}; choose from {', '.join(PHASES)}")
    if "llamacpp" in phases and not gguf_path(workdir).is_file():
        from vs_llamacpp import llama_cpp_module, write_ggufs

        llama_cpp_module()  # the install hint, before a 10-minute conversion
        write_ggufs("moonlight", path, workdir, formats=("Q8_0",), keep_export=False)
    order = [name for _ in range(args.repeat) for name in phases if name in ALTERNATING]
    order += [name for name in phases if name not in ALTERNATING]
    runs: dict[str, list[dict]] = {}
    for name in order:
        cmd = [sys.executable, __file__, "--child", name, *sys.argv[1:]]
        done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
        runs.setdefault(name, []).append(json.loads(done.stdout.strip().splitlines()[-1]))
    results = {}
    for name in phases:
        results[name] = median_runs(runs[name], args.threads) if name in ALTERNATING else runs[name][0]
        report(name, results[name], args.threads)
    if "decode" in results and "llamacpp" in results:
        for mine, key in (("ours", "decode_tok_s"), ("ours compiled", "compiled_decode_tok_s")):
            rows = [
                (t, results["decode"][f"{t} thread(s)"], results["llamacpp"][f"{t} thread(s)"]) for t in args.threads
            ]
            print(
                f"\n  {mine} / llama.cpp Q8_0, decode: "
                + ", ".join(
                    f"{ratio(1 / theirs['decode_tok_s'], 1 / row[key]):.2f}x at {t} thread(s)"
                    for t, row, theirs in rows
                )
            )
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
