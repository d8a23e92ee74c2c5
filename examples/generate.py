"""The main job on the embedded default: load an official-layout FP8 DeepSeek-V3 checkpoint with FP8
kept as FP8, and generate.

By default it writes (once) a tiny random checkpoint in the exact official layout -- sharded
safetensors, float8_e4m3fn weights with float32 128x128 `weight_scale_inv`, per-expert keys, the MTP
layer -- to ./checkpoints/tiny-deepseek-v3, then loads it with `from_pretrained` and generates.
Point --model at a real checkout (e.g. deepseek-ai/DeepSeek-V3) to do the same at full size.

    python examples/generate.py [--model DIR] [--max-new-tokens 32]
"""

import argparse
import time
from pathlib import Path

import torch

import modeling_deepseekv3 as ds

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", type=Path, default=Path("checkpoints/tiny-deepseek-v3"))
parser.add_argument("--max-new-tokens", type=int, default=32)
args = parser.parse_args()

if not (args.model / "config.json").exists():
    print(f"writing a tiny official-layout FP8 checkpoint to {args.model}")
    ds.make_tiny_checkpoint(args.model, num_shards=3)

t0 = time.perf_counter()
model = ds.DeepseekV3ForCausalLM.from_pretrained(args.model, dtype=torch.float32)  # fp32 compute: fastest on CPU
load_s = time.perf_counter() - t0

fp8 = model.fp8_modules()
fp8_bytes = sum(m.weight.numel() + m.weight_scale_inv.numel() * 4 for m in fp8.values())
fp8_params = sum(m.weight.numel() for m in fp8.values())
print(f"loaded {args.model} in {load_s:.2f}s: {len(fp8)} FP8 linears kept as float8_e4m3fn "
      f"({fp8_params / 1e6:.1f}M params in {fp8_bytes / 2**20:.1f} MiB; BF16 would need "
      f"{fp8_params * 2 / 2**20:.1f} MiB), MTP layers: {len(model.model.mtp_layers)}")

prompt = torch.tensor([[0, 17, 42, 99, 123, 7, 256]])  # token ids (the tiny model has no tokenizer)
t0 = time.perf_counter()
out = model.generate(prompt, max_new_tokens=args.max_new_tokens, do_sample=False)
gen_s = time.perf_counter() - t0
new = out[0, prompt.shape[1]:].tolist()
print(f"prompt ids:    {prompt[0].tolist()}")
print(f"generated ids: {new}")
print(f"{len(new)} tokens in {gen_s:.2f}s ({len(new) / gen_s:.1f} tokens/s, greedy, cached)")
