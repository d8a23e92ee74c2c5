"""Greedy tokens from vLLM for the interop test: run with the vLLM environment's python (scripts/setup_vllm.sh).

Reads prompts as token ids (JSON list of lists) so no tokenizer is involved on either side, generates
``--max-new-tokens`` greedily (EOS ignored, so both sides produce the same count), optionally with vLLM's MTP
speculative decoding, and prints one JSON object: ``{"tokens": [[...], ...], "vllm": version}``. This file never
imports modeling_deepseekv3: vLLM reads the checkpoint directory on its own, as a user's server would.

    .venv-vllm/bin/python scripts/vllm_greedy.py DIR --prompts prompts.json [--max-new-tokens 16] [--mtp K]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # one process: the engine core runs in this one


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model")
    parser.add_argument("--prompts", required=True, help="JSON file: a list of token-id lists")
    parser.add_argument("--max-new-tokens", type=int, default=16)
    parser.add_argument("--dtype", default="bfloat16", help="vLLM CPU's MLA kernels (AMX) take bfloat16, not float32")
    parser.add_argument("--mtp", type=int, default=0, help="num_speculative_tokens for vLLM's MTP method (0: off)")
    args = parser.parse_args()
    import vllm
    from vllm import LLM, SamplingParams

    with open(args.prompts) as f:
        prompts = json.load(f)
    longest = max(len(p) for p in prompts) + args.max_new_tokens + max(args.mtp, 0) + 8
    kwargs = {}
    if args.mtp:
        kwargs["speculative_config"] = {"method": "mtp", "num_speculative_tokens": args.mtp}
    llm = LLM(
        model=args.model,
        dtype=args.dtype,
        max_model_len=longest,
        enforce_eager=True,
        skip_tokenizer_init=True,
        seed=0,
        **kwargs,
    )
    params = SamplingParams(
        temperature=0.0,
        max_tokens=args.max_new_tokens,
        min_tokens=args.max_new_tokens,
        ignore_eos=True,
        detokenize=False,
    )
    outputs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    tokens = [list(o.outputs[0].token_ids) for o in outputs]
    json.dump({"tokens": tokens, "vllm": vllm.__version__}, sys.stdout)
    print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
