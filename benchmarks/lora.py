"""LoRA training step: ours vs transformers-native + PEFT, same weights, same targets, one process.

Targets everywhere: the attention projections, the dense and shared MLPs, and the routed experts. Ours
wraps each expert's projections (plain ``target_modules``); native keeps experts as fused 3-D tensors, so
PEFT reaches them through ``target_parameters`` (``mlp.experts.gate_up_proj`` / ``mlp.experts.down_proj``).
Per variant: seconds per optimizer step (forward + backward + AdamW), the bytes of the model's weights and
the peak RSS growth over the steps (activations, gradients, optimizer state, temporaries; sampled from
/proc). A third row trains ours on the FP8 version of the checkpoint.

    python benchmarks/lora.py [--steps 5] [--seq 256] [--batch 2]
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import torch
import transformers
from peft import LoraConfig, get_peft_model
from timing import ratio

import modeling_deepseekv3 as ds
from modeling_deepseekv3.integrations.peft import lora_config

sys.path.insert(0, str(Path(__file__).parent))
from memory_load import PeakRSS, model_bytes, release_memory

CONFIG = {  # V3 routing (groups, top-k, shared expert) at a size a CPU trains in seconds
    "vocab_size": 4096,
    "hidden_size": 1024,
    "intermediate_size": 2048,
    "moe_intermediate_size": 512,
    "num_hidden_layers": 4,
    "first_k_dense_replace": 1,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
    "q_lora_rank": 384,
    "kv_lora_rank": 256,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 64,
    "v_head_dim": 64,
    "n_routed_experts": 64,
    "n_group": 8,
    "topk_group": 4,
    "num_experts_per_tok": 8,
    "max_position_embeddings": 4096,
    "rope_scaling": None,
}
ATTENTION = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


def run(name, model, peft_config, ids, steps):
    model = get_peft_model(model, peft_config)
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-4)

    def step():
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    step()  # warm-up (allocations, compilation)
    release_memory()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        seconds = (time.perf_counter() - t0) / steps
    n_trainable = sum(p.numel() for p in trainable)
    weights = model_bytes(model)
    growth = peak.peak - peak.baseline
    print(
        f"  {name:34s} {seconds:7.3f} s/step   weights {weights / 2**20:7.1f} MiB + peak RSS growth "
        f"{growth / 2**20:7.1f} MiB = {(weights + growth) / 2**20:7.1f} MiB   trainable {n_trainable / 1e6:5.2f}M",
        flush=True,
    )
    return seconds, weights + growth


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--rank", type=int, default=8)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        dense = ds.make_tiny_checkpoint(Path(tmp) / "dense", fp8=False, mtp=False, overrides=CONFIG, tokenizer=False)
        fp8 = ds.make_tiny_checkpoint(Path(tmp) / "fp8", fp8=True, mtp=False, overrides=CONFIG, tokenizer=False)
        ids = torch.randint(2, CONFIG["vocab_size"], (args.batch, args.seq))
        print(
            f"torch {torch.__version__}, {torch.get_num_threads()} threads; {CONFIG['num_hidden_layers']} layers, "
            f"{CONFIG['n_routed_experts']} experts; batch {args.batch} x {args.seq} tokens; LoRA r={args.rank}, fp32"
        )
        r, alpha = args.rank, 2 * args.rank
        native = transformers.DeepseekV3ForCausalLM.from_pretrained(dense, dtype=torch.float32)
        native_cfg = LoraConfig(
            r=r,
            lora_alpha=alpha,
            target_modules=[*ATTENTION, "gate_proj", "up_proj", "down_proj"],
            target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
        )
        t_native, m_native = run("native + PEFT (target_parameters)", native, native_cfg, ids, args.steps)
        del native
        release_memory()
        ours = ds.DeepseekV3ForCausalLM.from_pretrained(dense, dtype=torch.float32)
        t_ours, m_ours = run(
            "ours (per-expert LoRA)", ours, lora_config(ours, "all", r=r, lora_alpha=alpha), ids, args.steps
        )
        del ours
        release_memory()
        ours8 = ds.DeepseekV3ForCausalLM.from_pretrained(fp8, dtype=torch.float32)
        t_fp8, m_fp8 = run("ours, FP8 base", ours8, lora_config(ours8, "all", r=r, lora_alpha=alpha), ids, args.steps)
        print(
            f"ratio native/ours: step time {ratio(t_native, t_ours):.2f}x, memory (weights + peak growth) "
            f"{m_native / max(m_ours, 1):.2f}x (FP8 base: time {ratio(t_native, t_fp8):.2f}x, memory "
            f"{m_native / max(m_fp8, 1):.2f}x)"
        )
        del ours8
        gc.collect()


if __name__ == "__main__":
    main()
