"""Continuous batching on the paged latent cache: total tokens/s against one ``generate()`` at a time and against
transformers-native continuous batching, same weights, one process.

The workload: ``--requests`` prompts of mixed length (uniform in ``[--min-prompt, --max-prompt]`` tokens, cut from the
shipped model's own card text; the shipped model's context is 1024, so the longest prompt is 1024 - new tokens) and
``--new-tokens`` greedy tokens each, EOS ignored. Three ways to run it:

* ours, continuous batching: ``generate_batch`` on the FP8 checkpoint (``generation/continuous_batching.py``);
* ours, sequential: one ``generate()`` per request, same model (the latent cache, absorbed decode);
* native, continuous batching: ``transformers.DeepseekV3ForCausalLM.generate_batch`` on the BF16 export of the same
  weights (native cannot load the FP8 checkpoint on CPU), re-expanding the latent pages to per-head keys and values
  at every step.

Both continuous-batching runs get the same cache and batch settings (``num_blocks`` from the workload, batches of
``CPU_BATCH_TOKENS``; native's defaults would zero-fill 90% of the RAM and build an 8192-row dense mask over it). Wall
time of the whole workload (prefill included), medians of ``--repeats`` interleaved rounds after a warm-up; the ratios are printed.
Plus the cache bytes per token of each, and MTP (``--mtp-tokens`` drafts per step): continuous batching with the
drafts inside the batch (``generation/mtp_batching.py``) and sequential ``generate(use_mtp=True)``, on the whole
workload and on its first ``--small`` requests (where a batch is too small to fill the machine, MTP should pay).

    python benchmarks/continuous_batching.py [--requests 32] [--new-tokens 128] [--repeats 3] [--small 4]
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from pathlib import Path

import torch
import transformers
from timing import checked, ratio
from transformers import GenerationConfig
from transformers.generation.configuration_utils import ContinuousBatchingConfig
from transformers.generation.continuous_batching.utils import WorkloadHints

import modeling_deepseekv3 as ds
from modeling_deepseekv3.core.cache import latent_bytes_per_token
from modeling_deepseekv3.generation.continuous_batching import CPU_BATCH_TOKENS, cpu_cache_blocks


def workload(tok, n: int, low: int, high: int, seed: int = 0) -> list[list[int]]:
    """``n`` prompts of lengths uniform in ``[low, high]``, each from its own place in a long text."""
    text = (Path(__file__).parents[1] / "models" / "shakespeare-deepseek-v3" / "README.md").read_text()
    ids = tok(text * (1 + 4 * high // max(1, len(text) // 4)), add_special_tokens=False).input_ids
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(low, high)
        start = rng.randint(0, len(ids) - length)
        out.append(ids[start : start + length])
    return out


def cpu_model():
    out = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/shakespeare-deepseek-v3")
    parser.add_argument("--bf16", default=None, help="the BF16 export for the native comparison (default: convert)")
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--min-prompt", type=int, default=64)
    parser.add_argument("--max-prompt", type=int, default=None, help="default: the context minus --new-tokens")
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--skip-native", action="store_true")
    parser.add_argument("--mtp-tokens", type=int, default=1, help="MTP drafts per step")
    parser.add_argument("--small", type=int, default=4, help="requests of the small-batch MTP comparison")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    dtype = getattr(torch, args.dtype)

    ours = ds.DeepseekV3ForCausalLM.from_pretrained(args.model, dtype=dtype).eval()
    tok = ds.load_tokenizer(args.model)
    config = ours.config
    high = args.max_prompt or min(1024, config.max_position_embeddings) - args.new_tokens
    prompts = workload(tok, args.requests, args.min_prompt, high)
    n_new = args.requests * args.new_tokens
    print(
        f"{cpu_model()}, torch {torch.__version__}, {torch.get_num_threads()} threads, transformers "
        f"{transformers.__version__}; {args.model} ({args.dtype} activations, FP8={config.is_fp8})"
    )
    print(
        f"workload: {args.requests} requests, prompts {min(map(len, prompts))}-{max(map(len, prompts))} tokens "
        f"({sum(map(len, prompts))} in all), {args.new_tokens} new tokens each ({n_new} in all), greedy"
    )

    greedy = dict(max_new_tokens=args.new_tokens, do_sample=False, pad_token_id=0)
    hints = WorkloadHints(max_prompt_length=high, max_generated_length=args.new_tokens, num_requests=args.requests)

    def cb_config():
        cb = ContinuousBatchingConfig(max_batch_tokens=CPU_BATCH_TOKENS)
        cb.num_blocks = cpu_cache_blocks(config, cb, dtype, hints)
        return cb

    mtp_stats = {}

    def batched(model, requests=prompts, mtp=False, name=None):
        def run():
            gc = GenerationConfig(eos_token_id=None, **greedy)
            if mtp:
                gc.use_mtp, gc.num_speculative_tokens = True, args.mtp_tokens
            out = model.generate_batch(requests, generation_config=gc, continuous_batching_config=cb_config())
            outs = [out[f"req_{i}"] for i in range(len(requests))]
            if mtp:
                mtp_stats[name] = sum(o.mtp_stats.emitted for o in outs) / sum(o.mtp_stats.forwards for o in outs)
            return [o.generated_tokens for o in outs]

        return run

    def sequential(**kw):
        def run():
            return [
                ours.generate(torch.tensor([p]), min_new_tokens=args.new_tokens, **greedy, **kw)[0, len(p) :].tolist()
                for p in prompts
            ]

        return run

    small = prompts[: args.small]
    runs = {
        "ours CB": batched(ours),
        "ours CB MTP": batched(ours, mtp=True, name="ours CB MTP"),
        "ours sequential": sequential(),
        "ours sequential MTP": sequential(use_mtp=True, num_speculative_tokens=args.mtp_tokens),
        f"ours CB x{args.small}": batched(ours, small),
        f"ours CB MTP x{args.small}": batched(ours, small, mtp=True, name=f"ours CB MTP x{args.small}"),
    }
    native = None
    if not args.skip_native:
        bf16 = Path(args.bf16) if args.bf16 else Path("runs") / "cb_bench_bf16"
        if not (bf16 / "config.json").is_file():
            ds.convert_checkpoint(args.model, bf16, to="bf16", overwrite=True, progress=False)
        native = transformers.DeepseekV3ForCausalLM.from_pretrained(bf16, dtype=dtype).eval()
        runs["native CB"] = batched(native)

    # one-off costs (the engine's thread, kernel choices, allocator) out of the timed rounds, for every candidate
    few = GenerationConfig(max_new_tokens=2, do_sample=False, pad_token_id=0, eos_token_id=None)
    for model in (ours, native) if native is not None else (ours,):
        model.generate_batch(prompts[:2], generation_config=few, continuous_batching_config=cb_config())
    ours.generate(torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False, pad_token_id=0)
    ours.generate(torch.tensor([prompts[0]]), max_new_tokens=2, do_sample=False, pad_token_id=0, use_mtp=True)

    times = {name: [] for name in runs}
    outputs = {}
    for r in range(args.repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - t0)
            print(f"  round {r + 1}: {name:20s} {times[name][-1]:7.2f} s", flush=True)
    med = {name: checked(statistics.median(v), name) for name, v in times.items()}
    for name, out in outputs.items():
        assert all(len(o) == args.new_tokens for o in out), f"{name}: not every request got {args.new_tokens} tokens"

    print(f"total tokens/s (generated tokens / wall time of the whole workload), medians of {args.repeats}:")
    for name, t in med.items():
        generated = len(outputs[name]) * args.new_tokens
        print(f"  {name:22s} {generated / t:8.1f} tok/s  ({t:.2f} s)")
    print(f"ours CB / ours sequential:        {ratio(med['ours sequential'], med['ours CB']):.2f}x")
    print(f"ours CB MTP / ours CB:            {ratio(med['ours CB'], med['ours CB MTP']):.2f}x")
    small_cb, small_mtp = f"ours CB x{args.small}", f"ours CB MTP x{args.small}"
    print(f"ours CB MTP / ours CB, {args.small} requests: {ratio(med[small_cb], med[small_mtp]):.2f}x")
    print(f"ours sequential MTP / sequential: {ratio(med['ours sequential'], med['ours sequential MTP']):.2f}x")
    for name, tpf in mtp_stats.items():
        print(f"  {name}: {tpf:.2f} tokens per verify forward (k = {args.mtp_tokens})")
    for name, reference in (("ours CB MTP", "ours CB"), (small_mtp, small_cb)):
        same = sum(a == b for a, b in zip(outputs[name], outputs[reference]))
        print(f"  {name}: greedy tokens identical to {reference} for {same}/{len(outputs[name])} requests")
    if native is not None:
        print(f"ours CB / native CB:            {ratio(med['native CB'], med['ours CB']):.2f}x")
    same = sum(a == b for a, b in zip(outputs["ours CB"], outputs["ours sequential"]))
    print(f"greedy tokens of ours CB identical to ours sequential for {same}/{len(prompts)} requests", end="")
    print(
        " (bf16: batched rounding can flip near-ties; the tests check equality in fp32)"
        if dtype != torch.float32
        else ""
    )

    per_layer = latent_bytes_per_token(config.kv_lora_rank, config.qk_rope_head_dim, "bf16", dtype)
    expanded = config.num_attention_heads * (config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim)
    print(
        f"cache bytes per token (all {config.num_hidden_layers} layers): ours CB {per_layer * config.num_hidden_layers}"
        f" (paged [c_kv ; k_pe]), ours sequential {per_layer * config.num_hidden_layers} (LatentCache), native CB "
        f"{per_layer * config.num_hidden_layers} (the same pages) plus, at each step, {expanded * dtype.itemsize} "
        "bytes per cached token and layer re-expanded to per-head keys and values"
    )


if __name__ == "__main__":
    main()
