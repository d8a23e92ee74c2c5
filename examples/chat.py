"""Multi-turn chat with a DeepSeek-V3-family checkpoint: chat template, streamed replies, conversation kept.

Reads user turns from stdin (type /exit or press Ctrl-D to stop), so it also works non-interactively:

    printf 'Hello!\\nTell me more.\\n' | python examples/chat.py --model checkpoints/tiny-deepseek-v3

Uses a tiny random official-layout checkpoint (with a chat template) by default, created if missing; the
shipped Shakespeare model is a plain language model, not a chat model.
"""

import argparse
import sys
from pathlib import Path
from threading import Thread

import torch
from transformers import TextIteratorStreamer

import modeling_deepseekv3 as ds

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", type=Path, default=Path("checkpoints/tiny-deepseek-v3"))
parser.add_argument("--max-new-tokens", type=int, default=32)
parser.add_argument("--system", default="You are a helpful assistant.")
args = parser.parse_args()

if not (args.model / "tokenizer.json").exists():  # written with the weights
    ds.make_tiny_checkpoint(args.model, num_shards=3)
model = ds.DeepseekV3ForCausalLM.from_pretrained(args.model, dtype=torch.float32)
tokenizer = ds.load_tokenizer(args.model)
messages = [{"role": "system", "content": args.system}]

for line in sys.stdin:
    user = line.strip()
    if user == "/exit":
        break
    if not user:
        continue
    messages.append({"role": "user", "content": user})
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    inputs = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")
    streamer = TextIteratorStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = dict(**inputs, streamer=streamer, max_new_tokens=args.max_new_tokens, do_sample=False)
    worker = Thread(target=model.generate, kwargs=kwargs)
    worker.start()
    print(f"user: {user}\nassistant: ", end="", flush=True)
    reply = ""
    for piece in streamer:  # tokens arrive while generate() runs in the worker thread
        reply += piece
        print(piece, end="", flush=True)
    worker.join()
    print()
    messages.append({"role": "assistant", "content": reply})
print(f"[{sum(m['role'] == 'assistant' for m in messages)} replies]")
