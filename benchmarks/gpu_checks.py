"""The end-to-end GPU checks (issue 26): the shipped model on CUDA, the FP8 training recipe on CUDA, and a
device map with attention on the GPU and the routed experts on the CPU.

    python benchmarks/gpu_checks.py [--model models/shakespeare-deepseek-v3] [--new-tokens 48]

Each check prints one block with its figures and a PASS / FAIL line; a failing check prints its traceback and
the others still run. The exit status is the number of failed checks. Needs a CUDA GPU (exit 2 without one).

1. ``generate`` of the shipped (FP8) model on ``cuda``: greedy tokens with ``fp8_compute="dequant"`` (exact
   twin of the CPU path) must equal the CPU's; the GPU's own backend (``auto``: ``scaled_mm`` on Hopper, which
   also quantizes the activations to FP8 1x128 tiles) is reported as the share of tokens equal to the CPU's;
   ``generate(use_mtp=True)`` on the GPU must equal plain greedy on the GPU (lossless); decode tokens/s.
2. One step of the FP8 training recipe on CUDA (``backend="cuda"``, FP8 tensor cores) against the emulated
   twin (exact fp32 GEMMs of the same FP8 operands) from the same weights and batch: relative error of the
   loss and of the gradients; then the step time (forward + backward + AdamW) of the recipe against BF16.
3. ``plan_device_map(strategy="cpu-experts")``: attention and dense parts on ``cuda:0``, routed experts FP8 on
   the CPU, computing there; greedy tokens must equal the all-CPU model's.
"""

from __future__ import annotations

import argparse
import collections
import statistics
import sys
import time
import traceback

import torch

import modeling_deepseekv3 as ds

DEVICE = torch.device("cuda")  # --device cpu: a dry run of the script itself on a machine without a GPU
GEMM = "cuda"  # the training recipe's backend under test (emulated on the dry run)
PROMPTS = ["To be, or not to be", "Friends, Romans, countrymen", "Now is the winter of", "O Romeo, Romeo"]


def greedy(model, ids, new_tokens, **kw):
    out = model.generate(
        ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, return_dict_in_generate=True, **kw
    )
    return out


def sync():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def cuda_seconds(fn, reps: int) -> float:
    """Median seconds of ``reps`` synchronized calls after one warm-up."""
    fn()
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def prompt_batch(tok):
    """The prompts left-padded into one batch (ids, mask)."""
    tok.padding_side = "left"
    enc = tok(PROMPTS, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids, enc.attention_mask


def check_generate(args) -> bool:
    tok = ds.load_tokenizer(args.model)
    ids, mask = prompt_batch(tok)
    cpu = ds.DeepseekV3ForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    ref = greedy(cpu, ids, args.new_tokens, attention_mask=mask).sequences
    print(f"  CPU ({cpu.fp8_backend()}) greedy, batch {len(PROMPTS)} x {args.new_tokens} tokens")
    ok = True
    for compute in ("dequant", "auto"):
        gpu = ds.DeepseekV3ForCausalLM.from_pretrained(
            args.model, dtype=torch.float32, device_map=str(DEVICE), fp8_compute=compute
        )
        g_ids, g_mask = ids.to(DEVICE), mask.to(DEVICE)
        plain = greedy(gpu, g_ids, args.new_tokens, attention_mask=g_mask).sequences.cpu()
        mtp = greedy(gpu, g_ids, args.new_tokens, attention_mask=g_mask, use_mtp=True)
        new = slice(ids.shape[1], None)
        agree = (plain[:, new] == ref[:, new]).float().mean().item()
        lossless = torch.equal(mtp.sequences.cpu(), plain)
        one = g_ids[:1, g_mask[0].bool()]
        t_plain = cuda_seconds(lambda: greedy(gpu, one, args.new_tokens), 3)
        t_mtp = cuda_seconds(lambda: greedy(gpu, one, args.new_tokens, use_mtp=True), 3)
        print(
            f"  {DEVICE} fp8_compute={compute!r} -> backend {gpu.fp8_backend()}: tokens equal to CPU {agree:.1%}; "
            f"use_mtp equals plain: {lossless} (acceptance {mtp.mtp_stats.acceptance[0]:.1%}); batch-1 decode "
            f"{args.new_tokens / t_plain:.0f} tok/s plain, {args.new_tokens / t_mtp:.0f} tok/s use_mtp"
        )
        ok &= lossless and (compute != "dequant" or agree == 1.0)
    return ok


def training_config():
    """V3's attention dims (q_lora 1536, kv_lora 512, 128+64 / 128 head dims) at 2048 hidden, 16 heads, 4
    layers (1 dense + 3 MoE of 16 experts, top-4): big enough that the GEMMs, not the launches, take the time."""
    return ds.DeepseekV3Config(
        vocab_size=32768,
        hidden_size=2048,
        intermediate_size=5632,
        moe_intermediate_size=1024,
        num_hidden_layers=4,
        first_k_dense_replace=1,
        num_attention_heads=16,
        num_key_value_heads=16,
        q_lora_rank=1536,
        kv_lora_rank=512,
        qk_nope_head_dim=128,
        qk_rope_head_dim=64,
        v_head_dim=128,
        n_routed_experts=16,
        num_experts_per_tok=4,
        n_group=4,
        topk_group=2,
        n_shared_experts=1,
        num_nextn_predict_layers=0,
        load_mtp=False,
        max_position_embeddings=4096,
    )


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30)).item()


def check_training(args) -> bool:
    from modeling_deepseekv3.fp8.training import FP8TrainingRecipe, convert_to_fp8_training

    config = training_config()
    torch.manual_seed(0)
    with DEVICE:
        base = ds.DeepseekV3ForCausalLM(config).to(torch.bfloat16)
    state = {k: v.clone() for k, v in base.state_dict().items()}
    batch = torch.randint(2, config.vocab_size, (args.train_batch, args.train_seq), device=DEVICE)

    def fresh(recipe):
        with DEVICE:
            model = ds.DeepseekV3ForCausalLM(config).to(torch.bfloat16)
        model.load_state_dict(state)
        model.train()
        return convert_to_fp8_training(model, recipe) if recipe else model

    grads, losses = {}, {}
    for name in (GEMM, "emulated"):
        model = fresh(FP8TrainingRecipe(backend=name))
        loss = model(batch, labels=batch).loss
        loss.backward()
        losses[name] = loss.detach().float()
        grads[name] = {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}
        del model
    names = sorted(grads[GEMM])
    flat = {k: torch.cat([grads[k][n].flatten() for n in names]) for k in grads}
    worst = max(names, key=lambda n: rel(grads[GEMM][n], grads["emulated"][n]))
    loss_err = rel(losses[GEMM], losses["emulated"])
    grad_err = rel(flat[GEMM], flat["emulated"])
    worst_err = rel(grads[GEMM][worst], grads["emulated"][worst])
    print(
        f"  {sum(p.numel() for p in base.parameters()) / 1e6:.0f}M params, batch {args.train_batch}x{args.train_seq}:"
        f" loss cuda {losses[GEMM].item():.5f} vs emulated {losses['emulated'].item():.5f} (rel {loss_err:.1e});"
        f" all gradients rel {grad_err:.1e}; worst tensor {worst} rel {worst_err:.1e}"
    )
    del base
    step_ms = {}
    for name, recipe in (("bf16", None), ("fp8 " + GEMM, FP8TrainingRecipe(backend=GEMM))):
        model = fresh(recipe)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=DEVICE.type == "cuda")

        def step(model=model, opt=opt):
            model(batch, labels=batch).loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)

        step_ms[name] = cuda_seconds(step, args.train_reps) * 1e3
        peak = torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else float("nan")
        if DEVICE.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        print(f"  {name}: {step_ms[name]:.1f} ms per training step (median of {args.train_reps}), peak {peak:.1f} GiB")
    print(f"  fp8 step time / bf16 step time: {step_ms['fp8 ' + GEMM] / step_ms['bf16']:.2f}")
    return loss_err < 1e-2 and grad_err < 5e-2


def check_cpu_experts(args) -> bool:
    tok = ds.load_tokenizer(args.model)
    ids, mask = prompt_batch(tok)
    resident = ds.DeepseekV3ForCausalLM.from_pretrained(args.model, dtype=torch.float32, fp8_compute="dequant")
    ref = greedy(resident, ids, args.new_tokens, attention_mask=mask).sequences
    device_map = ds.plan_device_map(
        args.model,
        {0: "10GiB", "cpu": "10GiB"} if DEVICE.type == "cuda" else {"cpu": "10GiB"},
        strategy="cpu-experts",
        dtype=torch.float32,
    )
    model = ds.DeepseekV3ForCausalLM.from_pretrained(
        args.model, dtype=torch.float32, device_map=device_map, fp8_compute="dequant"
    )
    places = collections.Counter(str(dev) for dev in device_map.values())
    expert = model.model.layers[1].mlp.experts[0]
    print(
        f"  device map units per device {dict(places)}; layer 1 expert 0 weight on {expert.up_proj.weight.device} "
        f"({expert.up_proj.weight.dtype}), attention on {model.model.layers[1].self_attn.kv_b_proj.weight.device}"
    )
    out = greedy(model, ids.to(DEVICE), args.new_tokens, attention_mask=mask.to(DEVICE)).sequences.cpu()
    same = torch.equal(out, ref)
    one = ids[:1, mask[0].bool()].to(DEVICE)
    t = cuda_seconds(lambda: greedy(model, one, args.new_tokens), 3)
    print(f"  greedy tokens equal the all-CPU model: {same}; batch-1 decode {args.new_tokens / t:.0f} tok/s")
    return same and expert.up_proj.weight.device.type == "cpu"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models/shakespeare-deepseek-v3")
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--train-batch", type=int, default=4)
    parser.add_argument("--train-seq", type=int, default=2048)
    parser.add_argument("--train-reps", type=int, default=5)
    parser.add_argument("--only", nargs="*", choices=("generate", "training", "cpu-experts"))
    parser.add_argument("--device", default="cuda", help="cpu: a dry run of this script (no figure means anything)")
    args = parser.parse_args()
    global DEVICE, GEMM
    DEVICE = torch.device(args.device)
    if DEVICE.type == "cpu":
        GEMM = "emulated"
    elif not torch.cuda.is_available():
        print("benchmarks/gpu_checks.py needs a CUDA GPU (none here).", file=sys.stderr)
        return 2
    else:
        major, minor = torch.cuda.get_device_capability()
        print(
            f"{torch.cuda.get_device_name()} (SM{major}{minor}), torch {torch.__version__}, CUDA {torch.version.cuda}"
        )
    checks = {"generate": check_generate, "training": check_training, "cpu-experts": check_cpu_experts}
    failed = 0
    for name, check in checks.items():
        if args.only and name not in args.only:
            continue
        print(f"[{name}]", flush=True)
        start = time.perf_counter()
        try:
            ok = check(args)
        except Exception:
            traceback.print_exc(file=sys.stdout)
            ok = False
        failed += not ok
        print(f"  {'PASS' if ok else 'FAIL'} ({time.perf_counter() - start:.0f} s)", flush=True)
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
    return failed


if __name__ == "__main__":
    sys.exit(main())
