"""Accuracy cost of storing the MLA latent cache in FP8 (``latent_cache_format``), on a tiny checkpoint.

For each format the same greedy continuation (200 tokens, from the BF16-latent model in fp32) is replayed
token by token through the cache (teacher forcing), and compared with the no-cache forward:
logit error (max, mean, relative RMS) and top-1 agreement; then each format generates 200 tokens freely
and we count how many match the reference before the first divergence. For scale, the same figures for
running the whole model in bfloat16 instead of float32. (A random tiny MoE model is chaotic: any
perturbation flips some expert choices, so the model-level numbers are pessimistic.) Then the error that
the cache format alone adds to one attention layer with DeepSeek-V3's dimensions at a 1K context.

    python benchmarks/latent_cache_accuracy.py [--tokens 200]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))

import modeling_deepseekv3 as ds


def replay(model, ref, prompt_len):
    with torch.no_grad():
        out = model(ref[:, :prompt_len], use_cache=True)
        steps, cache = [out.logits[:, -1:]], out.cache
        for t in range(prompt_len, ref.shape[1] - 1):
            out = model(ref[:, t : t + 1], cache=cache)
            steps.append(out.logits)
    return torch.cat(steps, 1)[0].float(), cache


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        path = ds.make_tiny_checkpoint(Path(tmp) / "tiny", mtp=False)

        def load(**kw):
            return ds.DeepseekV3ForCausalLM.from_pretrained(path, **{"dtype": torch.float32, **kw})

        base = load()
        prompt = torch.randint(2, 1024, (1, 8), generator=torch.Generator().manual_seed(args.seed))
        gen = dict(max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False)
        ref = base.generate(prompt, **gen)
        with torch.no_grad():
            full = base(ref, use_cache=False).logits[0, 7:-1].float()
        print(f"tiny checkpoint, {args.tokens} greedy tokens, teacher-forced through the cache vs no-cache forward")
        print(
            f"{'variant':28s} {'B/token/layer':>13s} {'max err':>8s} {'mean err':>9s} {'rel RMS':>8s} {'top-1':>6s} {'free run':>9s}"
        )
        variants = [
            ("latent fp32 (reference)", {}),
            ("latent fp8 (FlashMLA 656B)", {"latent_cache_format": "fp8"}),
            ("latent fp8_plain (576B)", {"latent_cache_format": "fp8_plain"}),
            ("whole model in bf16", {"dtype": torch.bfloat16}),
        ]
        for name, kw in variants:
            model = load(**kw)
            logits, cache = replay(model, ref, 8)
            err = (logits - full).abs()
            top1 = (logits.argmax(-1) == full.argmax(-1)).float().mean().item()
            free = model.generate(prompt, **gen)[0, 8:]
            diverged = (free != ref[0, 8:]).nonzero()
            first = int(diverged[0]) if len(diverged) else args.tokens
            v3 = ds.core.cache.latent_bytes_per_token(512, 64, cache.settings["latent_cache_format"], torch.bfloat16)
            print(
                f"{name:28s} {v3:13d} {err.max():8.4f} {err.mean():9.5f} {(err.norm() / full.norm()):8.4f} "
                f"{top1:6.3f} {first:5d}/{args.tokens}"
            )
        print(
            "(B/token/layer: DeepSeek-V3 dimensions, BF16 compute; 'free run': tokens equal to the reference "
            "before the first divergence)"
        )
    layer_level(1024)


def layer_level(context: int) -> None:
    """Relative error of one V3-dims attention layer's decode output, FP8 cache vs full-precision cache."""
    from decode import build_layers

    from modeling_deepseekv3.core.cache import LatentCache
    from modeling_deepseekv3.core.rope import RotaryEmbedding

    cfg, _, layer, _ = build_layers(torch.float32)
    rope = RotaryEmbedding(cfg)
    x = torch.randn(1, context + 1, cfg.hidden_size, generator=torch.Generator().manual_seed(0))
    pe = rope(torch.arange(context + 1)[None])
    outs = {}
    for fmt in ("auto", "fp8", "fp8_plain"):
        cfg.latent_cache_format = fmt
        cache = LatentCache(config=cfg)
        with torch.no_grad():
            layer(x[:, :context], tuple(t[:, :context] for t in pe), None, cache)
            outs[fmt] = layer(x[:, context:], tuple(t[:, context:] for t in pe), None, cache)[0]
    print(f"one attention layer, V3 dims, decode at context {context}: relative error of the output vs fp32 cache")
    for fmt in ("fp8", "fp8_plain"):
        print(f"  {fmt:10s} {((outs[fmt] - outs['auto']).norm() / outs['auto'].norm()).item():.4f}")


if __name__ == "__main__":
    main()
