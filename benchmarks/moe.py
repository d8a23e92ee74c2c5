"""One MoE layer, ours vs transformers-native, same weights, one process.

Native (transformers 5.24) fuses the experts into 3-D tensors and runs them through its experts
implementations: "grouped_mm" (its default) and "eager" (a Python loop over hit experts). Ours keeps one
module per expert (checkpoint keys, per-expert placement, PEFT) and sorts the token-expert assignments
once; dense experts are stacked on the first inference call and run as two grouped matmuls ("ours"),
otherwise each active expert runs on its contiguous slice ("per-expert loop"). Times per forward for T tokens, fp32 and bf16; then ours with FP8-resident
experts (the native FP8 kernel, fp8/native.py) vs BF16-resident experts: speed and weight bytes.

    python benchmarks/moe.py                      # T = 1, 16, 512; fp32 and bf16
    python benchmarks/moe.py --tokens 1 16 --dtypes float32
"""

from __future__ import annotations

import argparse

import torch
import transformers
from timing import interleaved, ratio
from transformers.models.deepseek_v3 import modeling_deepseek_v3 as native_mod

import modeling_deepseekv3 as ds
from modeling_deepseekv3.core.moe import DeepseekV3MoE

LAYER = {  # V3's routing (256 experts, top-8, 8 groups / 4 kept, 1 shared) with narrower experts, so the
    # layer fits in RAM twice (ours + native) in fp32
    "hidden_size": 1536,
    "moe_intermediate_size": 512,
    "n_routed_experts": 256,
    "num_experts_per_tok": 8,
    "n_group": 8,
    "topk_group": 4,
    "n_shared_experts": 1,
    "routed_scaling_factor": 2.5,
    "num_hidden_layers": 2,
    "first_k_dense_replace": 1,
    "vocab_size": 256,
    "intermediate_size": 256,
    "num_attention_heads": 4,
    "kv_lora_rank": 64,
    "q_lora_rank": 64,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 16,
    "v_head_dim": 16,
}
FP8_QUANT = {"quant_method": "fp8", "fmt": "e4m3", "weight_block_size": [128, 128], "activation_scheme": "dynamic"}


def compare(fns: dict, rounds: int = 5) -> dict:
    return interleaved(fns, rounds=rounds, min_time=0.5)


def build(dtype, fp8=False):
    cfg = ds.DeepseekV3Config(**LAYER, quantization_config=FP8_QUANT if fp8 else None)
    torch.manual_seed(0)
    ours = DeepseekV3MoE(cfg)
    with torch.no_grad():
        ours.gate.weight.normal_(0, 3 / LAYER["hidden_size"] ** 0.5)
        ours.gate.e_score_correction_bias.uniform_(-0.3, 0.3)
        for _name, module in ours.named_modules():
            if isinstance(module, ds.FP8Linear):
                module.set_dense_weight(torch.randn(module.out_features, module.in_features) / module.in_features**0.5)
            elif isinstance(module, torch.nn.Linear):
                module.weight.normal_(0, module.in_features**-0.5)
    return cfg, ours.to(dtype).eval()


def native_copy(ours, cfg, dtype, impl):
    ncfg = transformers.DeepseekV3Config(**LAYER)
    ncfg._experts_implementation = impl
    native = native_mod.DeepseekV3MoE(ncfg)
    with torch.no_grad():
        native.gate.weight.copy_(ours.gate.weight)
        native.gate.e_score_correction_bias.copy_(ours.gate.e_score_correction_bias)
        for e, expert in enumerate(ours.experts):
            native.experts.gate_up_proj[e].copy_(torch.cat((expert.gate_proj.weight, expert.up_proj.weight)))
            native.experts.down_proj[e].copy_(expert.down_proj.weight)
        native.shared_experts.load_state_dict(ours.shared_experts.state_dict())
    native = native.to(dtype).eval()
    native.gate.to(torch.float32)  # native keeps the router in fp32 too (_keep_in_fp32_modules_strict)
    return native


def weight_bytes(module):
    return sum(p.numel() * p.element_size() for p in module.parameters())


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 16, 512])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads; layer: hidden {LAYER['hidden_size']}, "
        f"{LAYER['n_routed_experts']} experts x {LAYER['moe_intermediate_size']}, top-{LAYER['num_experts_per_tok']}"
    )
    for name in args.dtypes:
        dtype = getattr(torch, name)
        cfg, ours = build(dtype)
        natives = {impl: native_copy(ours, cfg, dtype, impl) for impl in ("grouped_mm", "eager")}
        print(f"[{name}] ms per forward")
        for t in args.tokens:
            x = torch.randn(1, t, LAYER["hidden_size"], generator=torch.Generator().manual_seed(t)).to(dtype)
            with torch.no_grad():
                ref = ours(x)
                diffs = {impl: (m(x) - ref).abs().max().item() for impl, m in natives.items()}
                times = compare({"ours": lambda: ours(x), **{impl: (lambda m=m: m(x)) for impl, m in natives.items()}})
                t_ours = times["ours"]
                # per-expert matmuls (what runs when experts are not stacked: PEFT, hooks, devices)
                ours.experts.grouped = False
                t_loop = compare({"loop": lambda: ours(x)}, rounds=3)["loop"]
                ours.experts.grouped = True
            print(
                f"  T={t:4d}: ours {t_ours * 1e3:8.2f} | native grouped_mm {times['grouped_mm'] * 1e3:8.2f} "
                f"({ratio(times['grouped_mm'], t_ours):4.2f}x) | native eager {times['eager'] * 1e3:8.2f} "
                f"({ratio(times['eager'], t_ours):4.2f}x) | ours per-expert loop {t_loop * 1e3:8.2f} "
                f"| max|diff| {max(diffs.values()):.1e}"
            )
        del natives

    print("[FP8-resident vs BF16-resident experts, ours; compute in bf16 and fp32]")
    _, fp8 = build(torch.bfloat16, fp8=True)
    dense = DeepseekV3MoE(ds.DeepseekV3Config(**LAYER))
    with torch.no_grad():
        dense.load_state_dict({k: v for k, v in fp8.state_dict().items() if "weight_scale_inv" not in k}, strict=False)
        for name, module in fp8.named_modules():
            if isinstance(module, ds.FP8Linear):
                dense.get_submodule(name).weight.copy_(module.dequantized_weight(torch.bfloat16))
    dense = dense.to(torch.bfloat16).eval()
    print(
        f"  expert weight bytes: FP8 {weight_bytes(fp8.experts) / 2**20:.1f} MiB, "
        f"BF16 {weight_bytes(dense.experts) / 2**20:.1f} MiB ({weight_bytes(fp8.experts) / weight_bytes(dense.experts):.2f}x)"
    )
    for dtype in (torch.bfloat16, torch.float32):
        dense_c = dense.to(dtype) if dtype == torch.float32 else dense
        for t in args.tokens:
            x = torch.randn(1, t, LAYER["hidden_size"]).to(dtype)
            with torch.no_grad():
                times = compare({"fp8": lambda: fp8(x), "dense": lambda: dense_c(x)}, rounds=3)
                t_fp8, t_dense = times["fp8"], times["dense"]
            print(
                f"  {str(dtype)[6:]:8s} T={t:4d}: FP8-resident {t_fp8 * 1e3:8.2f} ms, "
                f"{str(dense_c.experts[0].up_proj.weight.dtype)[6:]}-resident {t_dense * 1e3:8.2f} ms "
                f"({ratio(t_fp8, t_dense):.2f}x the time)"
            )
    bench_fp8_linear()


def bench_fp8_linear():
    """One FP8 linear of V3's expert shape 2048x7168: the native kernel vs dequantize + matmul (the reference).
    benchmarks/fp8_cpu.py has the full per-GEMM table, against dense weights too."""
    print("[FP8Linear 2048x7168, fp32 compute: fp8_compute='auto' (native kernel) vs 'dequant' (eager reference)]")
    fast = ds.FP8Linear(7168, 2048)
    fast.set_dense_weight(torch.randn(2048, 7168) / 7168**0.5)
    ref = ds.FP8Linear(7168, 2048, compute="dequant")
    ref.load_state_dict(fast.state_dict())
    for rows in (1, 8, 24, 64):
        x = torch.randn(rows, 7168)
        with torch.no_grad():
            times = compare({"auto": lambda: fast(x), "dequant": lambda: ref(x)}, rounds=3)
        print(
            f"  rows {rows:3d}: auto {times['auto'] * 1e3:7.2f} ms, dequant {times['dequant'] * 1e3:7.2f} ms "
            f"({ratio(times['dequant'], times['auto']):.1f}x)"
        )


if __name__ == "__main__":
    main()
