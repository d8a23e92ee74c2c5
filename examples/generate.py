"""The main job: a DeepSeek-V3 checkpoint in the official FP8 layout -> from_pretrained (FP8 kept) -> generate().

By default it loads the model this repository ships, ``models/shakespeare-deepseek-v3``: a DeepSeek-V3 in miniature
(MLA, DeepSeekMoE with shared + routed experts, an MTP layer) pretrained here with ``deepseek-v3 pretrain`` on 40
works of Shakespeare and stored as the official checkpoints are -- float8_e4m3fn weights with 128x128
``weight_scale_inv`` blocks. It continues a prompt in the style of the plays and prints the text, tokens/s, and the
same with MTP speculative decoding. ``--model DIR`` points it at any official-layout checkout.

    python examples/generate.py [--model DIR] [--prompt TEXT] [--max-new-tokens 120] [--sample]
"""

import argparse
import time
from pathlib import Path

import torch

import modeling_deepseekv3 as ds

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "shakespeare-deepseek-v3"
parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", type=Path, default=SHIPPED)
parser.add_argument("--prompt", default="KING HENRY.\nNow, lords, to France; and let us not forget\n")
parser.add_argument("--max-new-tokens", type=int, default=120)
parser.add_argument("--sample", action="store_true", help="sample (temperature 0.8, top-p 0.95) instead of greedy")
parser.add_argument("--repetition-penalty", type=float, default=1.2, help="1.0 = off; a small model repeats itself")
args = parser.parse_args()

t0 = time.perf_counter()
model = ds.DeepseekV3ForCausalLM.from_pretrained(args.model, dtype=torch.float32)  # fp32 compute: fast on CPU
tokenizer = ds.load_tokenizer(args.model)
fp8 = model.fp8_modules()
print(
    f"loaded {args.model.name} in {time.perf_counter() - t0:.2f}s: {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M "
    f"parameters, {len(fp8)} linears kept in FP8, MTP layers: {len(model.model.mtp_layers)}"
)

ids = tokenizer(args.prompt, return_tensors="pt").input_ids
options = {
    "max_new_tokens": args.max_new_tokens,
    "do_sample": args.sample,
    "pad_token_id": tokenizer.pad_token_id,
    "repetition_penalty": args.repetition_penalty,
}
if args.sample:
    torch.manual_seed(0)
    options.update(temperature=0.8, top_p=0.95)
for mtp in (False, True):
    if mtp and not model.model.mtp_layers:
        break
    t0 = time.perf_counter()
    out = model.generate(ids, use_mtp=mtp, return_dict_in_generate=True, **options)
    seconds = time.perf_counter() - t0
    new = out.sequences[0, ids.shape[1] :]
    if not mtp:
        print("-" * 60 + "\n" + args.prompt + tokenizer.decode(new, skip_special_tokens=True) + "\n" + "-" * 60)
    if not mtp:
        plain = new
    stats = ""
    if mtp:  # greedy speculative decoding is lossless: the very same tokens
        same = "" if args.sample else f"; same tokens as plain: {torch.equal(new, plain)}"
        stats = f" ({out.mtp_stats.summary()}{same})"
    print(
        f"{'with MTP' if mtp else 'plain   '}: {len(new)} tokens in {seconds:.2f}s = {len(new) / seconds:.1f} tokens/s{stats}"
    )
