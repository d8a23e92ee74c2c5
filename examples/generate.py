"""The main job: an official-layout FP8 DeepSeek-V3 checkpoint -> from_pretrained (FP8 kept) -> pipeline().

By default it writes (once) a tiny random checkpoint in the exact official layout to
./checkpoints/tiny-deepseek-v3 -- sharded safetensors, float8_e4m3fn weights with float32 128x128
`weight_scale_inv`, per-expert keys, the MTP layer, a small tokenizer with DeepSeek's chat template --
then runs `pipeline("text-generation")` on chat messages and prints the reply and some figures. The
weights are random, so the reply is gibberish; point --model at a real checkout for real answers.

    python examples/generate.py [--model DIR] [--max-new-tokens 40]
"""

import argparse
import time
from pathlib import Path

import torch
from transformers import pipeline

import modeling_deepseekv3 as ds

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", type=Path, default=Path("checkpoints/tiny-deepseek-v3"))
parser.add_argument("--max-new-tokens", type=int, default=40)
args = parser.parse_args()

if not (args.model / "tokenizer.json").exists():  # written with the weights
    print(f"writing a tiny official-layout FP8 checkpoint to {args.model}")
    ds.make_tiny_checkpoint(args.model, num_shards=3)

t0 = time.perf_counter()
model = ds.DeepseekV3ForCausalLM.from_pretrained(args.model, dtype=torch.float32)  # fp32 compute: fastest on CPU
tokenizer = ds.load_tokenizer(args.model)
load_s = time.perf_counter() - t0
fp8 = model.fp8_modules()
fp8_params = sum(m.weight.numel() for m in fp8.values())
print(f"loaded {args.model} in {load_s:.2f}s: {len(fp8)} linears kept in FP8 ({fp8_params / 1e6:.1f}M params, "
      f"{fp8_params / 2**20:.1f} MiB + scales; BF16 would take {2 * fp8_params / 2**20:.1f} MiB); "
      f"MTP layers: {len(model.model.mtp_layers)}")

chat = pipeline("text-generation", model=model, tokenizer=tokenizer)
messages = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "What is two plus two?"},
]
print("prompt:", repr(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)))
t0 = time.perf_counter()
out = chat(messages, max_new_tokens=args.max_new_tokens, min_new_tokens=args.max_new_tokens, do_sample=False)
seconds = time.perf_counter() - t0
reply = out[0]["generated_text"][-1]
print(f"{reply['role']}: {reply['content']!r}")
cache = ds.LatentCache(config=model.config)
print(f"{args.max_new_tokens} new tokens in {seconds:.2f}s ({args.max_new_tokens / seconds:.1f} tokens/s, greedy); "
      f"latent cache: {cache.bytes_per_token_per_layer(torch.float32)} B/token/layer here, "
      f"{ds.cache.latent_bytes_per_token(512, 64, 'auto', torch.bfloat16)} for DeepSeek-V3 in BF16")
