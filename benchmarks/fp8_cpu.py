"""FP8 on CPU: the native block-scaled FP8 kernel (fp8/native.py) against dense weights, one process, same weights.

1. Per GEMM, V3 shapes (out x in), 1/4/16/64/512 rows: ``fp8_compute="auto"`` (the native kernel, FP8 weight
   read directly) vs fp32 ``F.linear`` on the pre-dequantized weight, bf16 ``F.linear`` on the pre-dequantized
   weight, and dequantize + ``F.linear`` (``fp8_compute="dequant"``, the reference). Each candidate cycles
   through its own copies of the weight, ``--cold-mib`` of them per format (default above the last-level
   cache), so every call reads its weight from memory as decode does; ``--cold-mib 0`` reuses one copy.
2. The absorbed MLA's kv_b_proj (V3 dims: 128 heads, rank 512): both per-head products straight from FP8
   (the head kernels) vs a dense fp32 copy of the weight (what ``KVBFP8Linear`` cached for inference before,
   and still does where the kernels cannot run) vs dequantizing per call -- the evidence for the decision.
3. End to end: ``generate()`` decode tokens/s of a 4-layer FP8 model with V3's attention dims and routing shape,
   FP8-resident vs the same weights dequantized to fp32 and to bf16 (``dequantize_fp8=True``); each decode
   step timed by its own timestamp, medians over interleaved repeats; greedy outputs compared.
4. Fresh processes running the main job (``examples/generate.py``, 40 new tokens, on the model it ships when
   present, else on a tiny official-layout FP8 checkpoint), with the kernel and with
   ``DEEPSEEKV3_FP8_ISA=off``: load and first-generate times, and whether anything was compiled.

Every time is a median of interleaved repeats; no ratio is printed from an implausible measurement.

    python benchmarks/fp8_cpu.py                              # everything
    python benchmarks/fp8_cpu.py --parts gemm --rows 1 16 --shapes 2048x7168
"""

from __future__ import annotations

import argparse
import itertools
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from timing import StepClock, checked, interleaved, ratio

import modeling_deepseekv3 as ds
from modeling_deepseekv3.core.attention import KVBFP8Linear
from modeling_deepseekv3.fp8 import FP8Linear, native

ROOT = Path(__file__).resolve().parents[1]
# (out, in) of V3's FP8 linears: expert gate/up, expert down, the dense MLP's gate/up (18432 rows) in part,
# q_a_proj, kv_a_proj_with_mqa (576 rows: partial block), q_b_proj
SHAPES = ["2048x7168", "7168x2048", "4096x7168", "1536x7168", "576x7168", "24576x1536"]
E2E = {  # V3's attention dims (heads of 128 + 64, latent 512) and routing shape, fewer and narrower layers:
    # ~0.9B FP8 parameters, ~0.4B of them read per token, the lm_head ~6% of that (V3: 2.5%)
    "vocab_size": 8192,
    "hidden_size": 3072,
    "intermediate_size": 8192,
    "moe_intermediate_size": 1536,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "num_attention_heads": 24,
    "num_key_value_heads": 24,
    "q_lora_rank": 1024,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "n_routed_experts": 16,
    "num_experts_per_tok": 4,
    "n_shared_experts": 1,
    "n_group": 4,
    "topk_group": 2,
    "max_position_embeddings": 4096,
    "rope_scaling": None,
}


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:8.2f}"


def copies_for(nbytes: int, cold_mib: int) -> int:
    return max(1, math.ceil(cold_mib * 2**20 / nbytes)) if cold_mib else 1


def cycler(items):
    it = itertools.cycle(items)
    return lambda: next(it)


def bench_gemm(shapes, rows_list, cold_mib: int, rounds: int):
    print(
        f"== 1. per GEMM: ms per call (weights cycled over {cold_mib} MiB per format{'' if cold_mib else ': hot'}) =="
    )
    print(
        f"  {'shape':>10s} {'rows':>4s} | {'fp8 auto':>8s} {'fp32':>8s} {'bf16':>8s} {'deq+lin':>8s} | "
        f"fp32/fp8  bf16/fp8  deq/fp8 | fp8(bf16 in) vs bf16"
    )
    for shape in shapes:
        m, n = (int(v) for v in shape.split("x"))
        base = FP8Linear(n, m)
        base.set_dense_weight(torch.randn(m, n, generator=torch.Generator().manual_seed(0)) / n**0.5)
        fp8 = [base] + [_clone_fp8(base) for _ in range(copies_for(m * n, cold_mib) - 1)]
        ref = [_clone_fp8(b, compute="dequant") for b in fp8[: max(1, len(fp8) // 4)]]
        w32 = [b.dequantized_weight(torch.float32) for b in fp8[: copies_for(4 * m * n, cold_mib)]]
        w16 = [b.dequantized_weight(torch.bfloat16) for b in fp8[: copies_for(2 * m * n, cold_mib)]]
        next_fp8, next_ref, next_32, next_16 = cycler(fp8), cycler(ref), cycler(w32), cycler(w16)
        for rows in rows_list:
            x = torch.randn(rows, n)
            xb = x.bfloat16()
            with torch.no_grad():
                fns = {
                    "fp8": lambda: next_fp8()(x),
                    "fp32": lambda: F.linear(x, next_32()),
                    "bf16": lambda: F.linear(xb, next_16()),
                    "fp8_bf16": lambda: next_fp8()(xb),
                }
                if rows <= 64:  # the reference's cost is its dequantization; one row count past that says it
                    fns["deq"] = lambda: next_ref()(x)
                t = interleaved(fns, rounds=rounds, min_time=0.2)
                diff = (fp8[0](x) - F.linear(x, w32[0])).abs().max().item()
            deq = f"{ms(t['deq'])}" if "deq" in t else f"{'-':>8s}"
            deq_ratio = f"{ratio(t['deq'], t['fp8']):7.1f}x" if "deq" in t else f"{'-':>8s}"
            print(
                f"  {shape:>10s} {rows:4d} | {ms(t['fp8'])} {ms(t['fp32'])} {ms(t['bf16'])} {deq} | "
                f"{ratio(t['fp32'], t['fp8']):7.2f}x {ratio(t['bf16'], t['fp8']):8.2f}x {deq_ratio} | "
                f"{ms(t['fp8_bf16'])} vs {ms(t['bf16'])} ({ratio(t['bf16'], t['fp8_bf16']):.2f}x)   max|diff| {diff:.1e}",
                flush=True,
            )
        del fp8, ref, w32, w16


def _clone_fp8(layer: FP8Linear, compute: str = "auto") -> FP8Linear:
    new = FP8Linear(layer.in_features, layer.out_features, compute=compute)
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        new.weight_scale_inv.copy_(layer.weight_scale_inv)
    return new


def bench_kv_b(rows_list, rounds: int, layers: int = 24):
    """``layers`` kv_b_proj copies cycled (V3 has 61): together more than the last-level cache in FP8 too, as in
    a real model (one layer alone would stay cached and flatter the dense copy)."""
    heads, nope, v, rank = 128, 128, 128, 512
    print(f"== 2. absorbed kv_b_proj, V3 dims ({heads} heads, rank {rank}), both products, {layers} layers cycled ==")
    fp8, dense, per_call = [], [], []
    for i in range(layers):
        layer = KVBFP8Linear(rank, heads * (nope + v))
        layer.configure_heads(heads, nope, v)
        layer.set_dense_weight(
            torch.randn(heads * (nope + v), rank, generator=torch.Generator().manual_seed(i)) / rank**0.5
        )
        fp8.append(layer)
        d = layer.to_dense(torch.float32)
        dense.append(d)
        ref = KVBFP8Linear(rank, heads * (nope + v), compute="dequant")
        ref.configure_heads(heads, nope, v)
        ref.load_state_dict(layer.state_dict())
        per_call.append(ref)
    w = fp8[0].weight
    print(
        f"  weight bytes per layer: FP8 {w.numel() / 2**20:.1f} MiB (+ scales); dense copy fp32 "
        f"{4 * w.numel() / 2**20:.1f} MiB, bf16 {2 * w.numel() / 2**20:.1f} MiB; "
        f"V3 (61 layers) fp32 copies: {61 * 4 * w.numel() / 2**30:.1f} GiB"
    )
    nxt = {"fp8": cycler(fp8), "dense": cycler(dense), "per_call": cycler(per_call)}
    for rows in rows_list:
        x = torch.randn(1, heads, rows, nope)

        def run(kind):
            return lambda: nxt[kind]()(x, latent_attention=lambda q: q * 0.5)

        with torch.no_grad():
            fns = {k: run(k) for k in ("fp8", "dense")}
            if rows <= 16:
                fns["per_call"] = run("per_call")
            t = interleaved(fns, rounds=rounds, min_time=0.2)
            diff = fp8[0](x, latent_attention=lambda q: q * 0.5) - dense[0](x, latent_attention=lambda q: q * 0.5)
        pc = f"per-call dequant {ms(t['per_call'])}" if "per_call" in t else ""
        print(
            f"  rows/head {rows:3d}: FP8 head kernels {ms(t['fp8'])} ms, dense fp32 copy {ms(t['dense'])} ms "
            f"({ratio(t['dense'], t['fp8']):.2f}x) {pc}  max|diff| {diff.abs().max().item():.1e}",
            flush=True,
        )


def bench_e2e(prompt_len: int, new_tokens: int, repeats: int):
    print(
        f"== 3. generate() decode, {E2E['num_hidden_layers']} layers (hidden {E2E['hidden_size']}, "
        f"{E2E['n_routed_experts']} experts of {E2E['moe_intermediate_size']}, top {E2E['num_experts_per_tok']}), "
        f"{prompt_len}-token prompt, {new_tokens} new tokens =="
    )
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        path = ds.make_tiny_checkpoint(os.path.join(tmp, "ckpt"), mtp=False, overrides=E2E, tokenizer=False)
        print(f"  wrote the FP8 checkpoint in {time.perf_counter() - t0:.0f}s")
        load = ds.DeepseekV3ForCausalLM.from_pretrained
        models = {
            "fp8 (fp32 compute)": load(path, dtype=torch.float32),
            "fp8 (bf16 compute)": load(path, dtype=torch.bfloat16),
            "fp32 dequantized": load(path, dtype=torch.float32, dequantize_fp8=True),
            "bf16 dequantized": load(path, dtype=torch.bfloat16, dequantize_fp8=True),
        }
        for name, model in models.items():
            b = sum(p.numel() * p.element_size() for p in model.parameters())
            print(f"  {name:20s}: {b / 2**30:.2f} GiB of parameters")
        prompt = torch.randint(2, E2E["vocab_size"], (1, prompt_len), generator=torch.Generator().manual_seed(0))
        kw = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
        steps = {name: [] for name in models}
        outputs = {}
        for model in models.values():  # warm-up
            model.generate(prompt, max_new_tokens=2, do_sample=False)
        for _ in range(repeats):
            for name, model in models.items():
                clock = StepClock()
                outputs[name] = model.generate(prompt, streamer=clock, **kw)
                stamps = clock.times  # [prompt, token 1 (after prefill), token 2, ...]
                assert len(stamps) == new_tokens + 1, len(stamps)
                steps[name].extend(b - a for a, b in itertools.pairwise(stamps[1:]))
        step = {name: checked(statistics.median(v), f"{name} decode step") for name, v in steps.items()}
        for name in models:
            print(
                f"  {name:20s}: {1 / step[name]:7.2f} tokens/s ({step[name] * 1e3:6.1f} ms/token, median of "
                f"{len(steps[name])} steps)"
            )
        f = step["fp8 (fp32 compute)"]
        print(
            f"  FP8-resident (fp32 compute) vs fp32-resident: {ratio(step['fp32 dequantized'], f):.2f}x faster; "
            f"vs bf16-resident: {ratio(step['bf16 dequantized'], f):.2f}x; "
            f"FP8 (bf16 compute) vs bf16-resident: {ratio(step['bf16 dequantized'], step['fp8 (bf16 compute)']):.2f}x"
        )
        same = torch.equal(outputs["fp8 (fp32 compute)"], outputs["fp32 dequantized"])
        print(f"  greedy tokens, FP8 vs fp32-dequantized: {'identical' if same else 'differ'}")


def bench_fresh_process(new_tokens: int, repeats: int):
    """The main job in fresh processes: ``examples/generate.py`` on the model it ships (``models/...``) when
    present, else on a tiny official-layout FP8 checkpoint; its own printed load time and the time of its first
    ``generate()``, and the whole process's wall time. The kernel library is cached, as after setup.sh."""
    shipped = ROOT / "models" / "shakespeare-deepseek-v3"
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = shipped if (shipped / "config.json").exists() else ds.make_tiny_checkpoint(os.path.join(tmp, "tiny"))
        print(
            f"== 4. fresh processes run the main job (examples/generate.py --model {ckpt.name} "
            f"--max-new-tokens {new_tokens}) =="
        )
        env = dict(os.environ, PYTHONUNBUFFERED="1")
        for mode in ("auto", "off"):
            env["DEEPSEEKV3_FP8_ISA"] = mode
            loads, gens, walls, built = [], [], [], False
            for _ in range(repeats):
                t0 = time.perf_counter()
                proc = subprocess.run(
                    [
                        sys.executable,
                        str(ROOT / "examples" / "generate.py"),
                        "--model",
                        str(ckpt),
                        "--max-new-tokens",
                        str(new_tokens),
                    ],
                    env=env,
                    capture_output=True,
                    text=True,
                    check=True,
                )
                walls.append(time.perf_counter() - t0)
                loads.append(float(re.search(r"loaded .* in ([0-9.]+)s", proc.stdout).group(1)))
                first = re.search(
                    r"(\d+) (?:new )?tokens in ([0-9.]+)s", proc.stdout
                )  # the first generate() it reports
                gens.append(float(first.group(2)))
                built |= "building the FP8 CPU kernel" in proc.stderr
            label = "native kernel" if mode == "auto" else "DEEPSEEKV3_FP8_ISA=off (torch path)"
            print(
                f"  {label:36s}: load {statistics.median(loads):5.2f}s, first generate ({first.group(1)} tokens) "
                f"{statistics.median(gens):6.2f}s, whole process {statistics.median(walls):6.2f}s "
                f"(medians of {repeats}; compiled anything: {built})",
                flush=True,
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", default=["gemm", "kv_b", "e2e", "fresh"])
    parser.add_argument("--shapes", nargs="+", default=SHAPES)
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 4, 16, 64, 512])
    parser.add_argument("--cold-mib", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--kv-b-rows", type=int, nargs="+", default=[1, 4, 16, 32, 64, 128])
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=24)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    native.load(strict=True)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; native FP8 kernel variants here: "
        f"{', '.join(native.supported_isas())} (library {native._state['path'].name})"
    )
    if "gemm" in args.parts:
        bench_gemm(args.shapes, args.rows, args.cold_mib, args.rounds)
    if "kv_b" in args.parts:
        bench_kv_b(args.kv_b_rows, args.rounds)
    if "e2e" in args.parts:
        bench_e2e(args.prompt, args.new_tokens, args.repeats)
    if "fresh" in args.parts:
        bench_fresh_process(40, args.repeats)


if __name__ == "__main__":
    main()
