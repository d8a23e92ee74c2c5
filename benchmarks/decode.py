"""Decode speed of multi-head latent attention: ours (absorbed, latent cache) vs transformers-native.

Three parts, each running ours and native on the same weights in one process:

1. One attention layer with DeepSeek-V3's real dimensions (hidden 7168, 128 heads, q_lora_rank 1536,
   kv_lora_rank 512, qk 128+64, v 128), random weights, cache pre-filled with the same latent content
   for both, per-token decode time at several context lengths, fp32 and bf16. Native caches the latent
   too but runs kv_b_proj over the whole cache at every step; ours attends over the latent.
2. The crossover of ``mla_impl="auto"``: absorb vs expand for a prompt of S tokens (no cache).
3. End to end: ``generate()`` tokens/s at a 2K-token prompt on a small multi-layer model, each decode step
   timed by its own timestamp (a streamer), medians over interleaved repeats.

Every figure is a median of interleaved repeats; no ratio is printed from an implausible measurement
(``timing.py``).

    python benchmarks/decode.py                       # all parts, contexts 256 1024 4096 16384
    python benchmarks/decode.py --contexts 256 1024 --dtypes float32 --skip-generate
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import tempfile

import torch
import transformers
from timing import StepClock, checked, interleaved, ratio
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as native_mod

import modeling_deepseekv3 as ds
from modeling_deepseekv3.core.attention import MLAttention
from modeling_deepseekv3.core.cache import LatentCache
from modeling_deepseekv3.core.rope import RotaryEmbedding

V3_ATTENTION = {
    "hidden_size": 7168,
    "num_attention_heads": 128,
    "num_key_value_heads": 128,
    "q_lora_rank": 1536,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "num_hidden_layers": 1,
    "first_k_dense_replace": 1,
    "intermediate_size": 256,
    "vocab_size": 256,
    "n_routed_experts": 8,
    "n_group": 1,
    "topk_group": 1,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 163840,
    "rope_scaling": {
        "type": "yarn",
        "factor": 40,
        "original_max_position_embeddings": 4096,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
}


def build_layers(dtype):
    ours_cfg = ds.DeepseekV3Config(**V3_ATTENTION)
    native_cfg = transformers.DeepseekV3Config(**V3_ATTENTION)
    native_cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    ours = MLAttention(ours_cfg, layer_idx=0)
    with torch.no_grad():
        for name, p in ours.named_parameters():
            p.copy_(
                1.0 + 0.1 * torch.randn_like(p) if "layernorm" in name else torch.randn_like(p) / p.shape[-1] ** 0.5
            )
    native = native_mod.DeepseekV3Attention(native_cfg, layer_idx=0)
    native.load_state_dict(ours.state_dict(), strict=True)
    ours, native = ours.to(dtype).eval(), native.to(dtype).eval()
    return ours_cfg, native_cfg, ours, native


def check_parity(ours_cfg, native_cfg, ours, native, dtype, seq=64):
    """Same prompt through both (prefill then 3 decode steps): the outputs must agree."""
    x = torch.randn(1, seq + 3, ours_cfg.hidden_size, dtype=dtype)
    pos = torch.arange(seq + 3)[None]
    our_rope, nat_rope = RotaryEmbedding(ours_cfg), native_mod.DeepseekV3RotaryEmbedding(native_cfg)
    our_cache, nat_cache = LatentCache(config=ours_cfg), DynamicCache(config=native_cfg)
    worst = 0.0
    with torch.no_grad():
        for lo, hi in [(0, seq), (seq, seq + 1), (seq + 1, seq + 2), (seq + 2, seq + 3)]:
            cos, sin = our_rope(pos[:, lo:hi])
            a = ours(x[:, lo:hi], (cos, sin), None, our_cache)[0]
            mask = None
            if hi - lo > 1:
                mask = torch.ones(hi - lo, hi, dtype=torch.bool).tril(diagonal=lo)[None, None]
            b = native(x[:, lo:hi], nat_rope(x, pos[:, lo:hi]), mask, cache=nat_cache)[0]
            worst = max(worst, ((a - b).abs().max() / b.abs().max()).item())
    return worst


def fill_caches(ours_cfg, native_cfg, context: int, dtype):
    """Both caches hold the same `context` tokens (random normalized latent, random roped key)."""
    g = torch.Generator().manual_seed(1)
    c_kv = torch.randn(1, context, ours_cfg.kv_lora_rank, generator=g).to(dtype)
    k_pe = torch.randn(1, context, ours_cfg.qk_rope_head_dim, generator=g).to(dtype)
    ours_cache = LatentCache(config=ours_cfg)
    ours_cache.update(torch.cat((c_kv, k_pe), -1)[:, None], torch.empty(1, 1, context, 0, dtype=dtype), 0)
    native_cache = DynamicCache(config=native_cfg)
    native_cache.update(c_kv[:, None], k_pe[:, None], 0)
    return ours_cache, native_cache


def bench_attention(contexts, dtypes, repeats):
    rows = []
    for dtype in dtypes:
        ours_cfg, native_cfg, ours, native = build_layers(dtype)
        worst = check_parity(ours_cfg, native_cfg, ours, native, dtype)
        print(f"[{str(dtype)[6:]}] parity check, 64-token prefill + 3 decode steps: max rel diff {worst:.2e}")
        our_rope, nat_rope = RotaryEmbedding(ours_cfg), native_mod.DeepseekV3RotaryEmbedding(native_cfg)
        x = torch.randn(1, 1, ours_cfg.hidden_size, dtype=dtype)
        for context in contexts:
            ours_cache, native_cache = fill_caches(ours_cfg, native_cfg, context, dtype)
            pos = torch.tensor([[context]])
            our_pe, nat_pe = our_rope(pos), nat_rope(x, pos)

            def step_ours(x=x, pe=our_pe, cache=ours_cache):
                with torch.no_grad():
                    ours(x, pe, None, cache)
                cache.crop(-1)  # keep the context length fixed

            def step_native(x=x, pe=nat_pe, cache=native_cache):
                with torch.no_grad():
                    native(x, pe, None, cache=cache)
                cache.crop(-1)

            rounds = max(1, repeats if context <= 1024 else repeats // 2 if context <= 4096 else 1)
            times = interleaved({"ours": step_ours, "native": step_native}, rounds=rounds, min_time=0.1, max_repeat=5)
            t_ours, t_native = times["ours"], times["native"]
            speedup = ratio(t_native, t_ours, f"ctx {context}")
            rows.append((str(dtype)[6:], context, t_native * 1e3, t_ours * 1e3, speedup))
            print(
                f"  ctx {context:6d}: native {t_native * 1e3:9.1f} ms/token   ours {t_ours * 1e3:7.1f} ms/token   "
                f"ratio {speedup:6.1f}x",
                flush=True,
            )
        base = next(r for r in rows if r[0] == str(dtype)[6:] and r[1] == contexts[0])
        for r in rows:
            if r[0] == str(dtype)[6:] and r[1] != contexts[0]:
                print(f"  ours cost({r[1]}) / cost({contexts[0]}) = {r[3] / base[3]:.2f}")
    return rows


def bench_crossover(lengths, repeats):
    """absorb vs expand for an S-token prompt without cache (fp32), V3 attention dims."""
    cfg, _, layer, _ = build_layers(torch.float32)
    rope = RotaryEmbedding(cfg)
    print("[float32] prompt without cache: absorb vs expand (auto picks by multiply-add count)")
    for s in lengths:
        x = torch.randn(1, s, cfg.hidden_size)
        pe = rope(torch.arange(s)[None])

        def run(impl, x=x, pe=pe):
            cfg.mla_impl = impl
            with torch.no_grad():
                layer(x, pe, None, None)

        times = interleaved(
            {impl: (lambda impl=impl: run(impl)) for impl in ("absorb", "expand")},
            rounds=repeats,
            min_time=0.1,
            max_repeat=5,
        )
        cfg.mla_impl = "auto"
        pick = layer.choose_path(s, s)
        print(
            f"  S={s:5d}: absorb {times['absorb'] * 1e3:8.1f} ms   expand {times['expand'] * 1e3:8.1f} ms   "
            f"auto -> {pick}"
        )


def bench_generate(context: int, new_tokens: int, repeats: int):
    """``generate()`` on a small multi-layer model after a long prompt: decode tokens/s from per-token
    timestamps (median step time over interleaved repeats), prefill separately, greedy outputs compared."""
    cfg = {
        "vocab_size": 4096,
        "hidden_size": 1024,
        "intermediate_size": 1024,
        "moe_intermediate_size": 256,
        "num_hidden_layers": 4,
        "first_k_dense_replace": 1,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
        "q_lora_rank": 384,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64,
        "v_head_dim": 128,
        "n_routed_experts": 8,
        "n_group": 1,
        "topk_group": 1,
        "num_experts_per_tok": 2,
        "max_position_embeddings": 8192,
        "rope_scaling": None,
    }
    with tempfile.TemporaryDirectory() as tmp:
        path = ds.make_tiny_checkpoint(os.path.join(tmp, "ckpt"), fp8=False, mtp=False, overrides=cfg)
        prompt = torch.randint(2, 4096, (1, context), generator=torch.Generator().manual_seed(0))
        models = {
            "native": transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32),
            "ours": ds.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32),
        }
        models["native"].config._attn_implementation = "sdpa"
        steps = {name: [] for name in models}
        prefill = {name: [] for name in models}
        outputs = {}
        kw = {"do_sample": False, "max_new_tokens": new_tokens, "min_new_tokens": new_tokens}
        for _ in range(repeats):  # interleaved: ours, native, ours, native, ...
            for name, model in models.items():
                clock = StepClock()
                outputs[name] = model.generate(prompt, streamer=clock, **kw)
                stamps = clock.times  # [prompt, token 1 (after prefill), token 2, ...]
                assert len(stamps) == new_tokens + 1, len(stamps)
                prefill[name].append(stamps[1] - stamps[0])
                steps[name].extend(b - a for a, b in itertools.pairwise(stamps))
        tokens_s = {}
        for name in models:
            step = checked(statistics.median(steps[name]), f"{name} decode step")
            tokens_s[name] = 1.0 / step
            print(
                f"  {name:7s}: prefill {statistics.median(prefill[name]):6.2f} s, decode {tokens_s[name]:7.2f} tokens/s "
                f"(median of {len(steps[name])} steps, {step * 1e3:.1f} ms each)"
            )
        same = torch.equal(outputs["ours"], outputs["native"])
        print(
            f"  greedy outputs identical: {same}; ours/native decode speed: "
            f"{ratio(1 / tokens_s['native'], 1 / tokens_s['ours'], 'decode step'):.1f}x"
        )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--contexts", type=int, nargs="+", default=[256, 1024, 4096, 16384])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--crossover", type=int, nargs="+", default=[16, 64, 128, 256, 512, 1024])
    parser.add_argument("--generate-context", type=int, default=2048)
    parser.add_argument("--new-tokens", type=int, default=17)
    parser.add_argument("--generate-repeats", type=int, default=3)
    parser.add_argument("--skip-generate", action="store_true")
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("== 1. one attention layer, V3 dims, per-token decode ==")
    bench_attention(args.contexts, [getattr(torch, d) for d in args.dtypes], args.repeats)
    print("== 2. auto crossover ==")
    bench_crossover(args.crossover, 2)
    if not args.skip_generate:
        print(f"== 3. generate(), 4 layers, {args.generate_context}-token prompt ==")
        bench_generate(args.generate_context, args.new_tokens, args.generate_repeats)


if __name__ == "__main__":
    main()
