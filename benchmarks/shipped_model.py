"""Held-out quality of the shipped model: bits per byte of its BF16 and FP8 exports on the two held-out works.

Bits per byte = total next-token negative log-likelihood in bits / UTF-8 bytes of the predicted tokens, over
``--seq-len`` windows that overlap by one token (every token after the first predicted once), the same
measure ``deepseek-v3 pretrain --eval-data`` logs. Both exports are evaluated with fp32 compute (the FP8 one
through the native FP8 kernel, weights kept FP8), so the difference is what FP8 storage costs (the issue's
bar: < 0.05 bits/byte). The BF16 export lives in the training run's output (``runs/shakespeare/bf16``, not
committed); the FP8 one is ``models/shakespeare-deepseek-v3``.

    python scripts/prepare_shakespeare.py && python benchmarks/shipped_model.py [--bf16 DIR] [--fp8 DIR]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import transformers

import modeling_deepseekv3 as ds
from modeling_deepseekv3.training.data import TokenStream, eval_windows, token_byte_lengths
from modeling_deepseekv3.training.pretrain import evaluate

ROOT = Path(__file__).resolve().parents[1]
HELD_OUT = [ROOT / "data" / "shakespeare" / "eval" / name for name in ("macbeth_gut.txt", "sonnets_gut.txt")]


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bf16", type=Path, default=ROOT / "runs" / "shakespeare" / "bf16")
    parser.add_argument("--fp8", type=Path, default=ROOT / "models" / "shakespeare-deepseek-v3")
    parser.add_argument("--seq-len", type=int, default=256)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    missing = [str(p) for p in (*HELD_OUT, args.bf16 / "config.json", args.fp8 / "config.json") if not p.exists()]
    if missing:
        raise SystemExit(
            f"missing: {', '.join(missing)} (run scripts/prepare_shakespeare.py; the BF16 export comes "
            "from the README's pretrain command)"
        )
    tok = ds.load_tokenizer(args.fp8)
    byte_len = token_byte_lengths(tok)
    models = {
        "bf16 export": ds.DeepseekV3ForCausalLM.from_pretrained(args.bf16, dtype=torch.float32),
        "fp8 export": ds.DeepseekV3ForCausalLM.from_pretrained(args.fp8, dtype=torch.float32),
    }
    assert models["fp8 export"].fp8_modules() and not models["bf16 export"].fp8_modules()
    print(
        f"{'held-out text':18s} {'tokens':>7s} {'bytes':>7s} | "
        + " | ".join(f"{n:>16s}" for n in models)
        + " | FP8 cost"
    )
    for path in HELD_OUT:
        windows = eval_windows(TokenStream.from_files([path], tok), args.seq_len)
        res = {name: evaluate(m, windows, byte_len, 8) for name, m in models.items()}
        bpb = {name: r["eval_bits_per_byte"] for name, r in res.items()}
        first = next(iter(res.values()))
        print(
            f"{path.name:18s} {first['eval_tokens']:7d} {first['eval_bytes']:7d} | "
            + " | ".join(f"{v:11.4f} bits/B" for v in bpb.values())
            + f" | {bpb['fp8 export'] - bpb['bf16 export']:+.4f} bits/byte",
            flush=True,
        )


if __name__ == "__main__":
    main()
