"""FP8 inference backends on a GPU (``fp8_compute``): correctness against the dequant twin, speed, memory.

Run on a CUDA machine: ``python benchmarks/fp8_gpu.py [--prefill-rows 4096] [--reps 20]``. One table:

1. Per GEMM, V3 shapes (out x in): each backend this GPU runs (``dequant``, ``scaled_mm`` on SM90, ``w8a16``
   with Triton) against the exact fp32 reference of the same bf16 input (relative error), prefill TFLOP/s
   next to a dense BF16 ``F.linear`` of the same shape (goal: FP8 GEMM >= 1.5x BF16), and decode time per
   call at batch 1 / 4 / 16 / 64 (goal: faster than dequant at every batch).
2. Peak memory of one decoder layer's forward (V3 attention + dense MLP dims, 2048 tokens) per backend.

On a machine without CUDA it says so and exits with status 2 (the numbers need a GPU).
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

V3_SHAPES = [(2048, 7168), (7168, 2048), (24576, 1536), (576, 7168), (7168, 16384), (18432, 7168)]  # (out, in)
DECODE_BATCHES = (1, 4, 16, 64)


def timed(fn, reps: int) -> float:
    """Seconds per call (CUDA-synchronized, after one warm-up)."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps


def backends() -> list[str]:
    from modeling_deepseekv3.fp8.dispatch import FP8BackendError, device_backend

    out = ["dequant"]
    for name in ("scaled_mm", "w8a16"):
        try:
            device_backend(name, "cuda")
            out.append(name)
        except FP8BackendError as err:
            print(f"  ({name} skipped: {err})")
    return out


def gemm_rows(args, names) -> list[list[str]]:
    from modeling_deepseekv3.fp8 import FP8Linear, block_quantize
    from modeling_deepseekv3.fp8.reference import fp8_matmul_reference

    rows = []
    for n, k in V3_SHAPES:
        q, s = block_quantize(torch.randn(n, k, device="cuda") / 16)
        dense = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
        x_pre = torch.randn(args.prefill_rows, k, device="cuda", dtype=torch.bfloat16)
        flops = 2 * args.prefill_rows * n * k
        bf16_tflops = flops / timed(lambda: F.linear(x_pre, dense), args.reps) / 1e12
        ref_x = x_pre[:64]
        ref = fp8_matmul_reference(ref_x.float(), q, s, (128, 128))
        for name in names:
            layer = FP8Linear(k, n, compute=name, device="cuda")
            layer.weight.data.copy_(q)
            layer.weight_scale_inv.data.copy_(s)
            with torch.no_grad():
                err = ((layer(ref_x).float() - ref).norm() / ref.norm()).item()
                tflops = flops / timed(lambda: layer(x_pre), args.reps) / 1e12
                decode = []
                for b in DECODE_BATCHES:
                    xb = torch.randn(b, k, device="cuda", dtype=torch.bfloat16)
                    decode.append(f"{timed(lambda: layer(xb), args.reps) * 1e6:.0f}")
            rows.append(
                [
                    f"{n}x{k}",
                    name,
                    f"{err:.1e}",
                    f"{tflops:.0f}",
                    f"{bf16_tflops:.0f}",
                    f"{tflops / bf16_tflops:.2f}x",
                    " / ".join(decode),
                ]
            )
    return rows


def layer_peak_memory(names) -> list[list[str]]:
    import modeling_deepseekv3 as ds

    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    config = ds.DeepseekV3Config(
        num_hidden_layers=1,
        first_k_dense_replace=1,
        vocab_size=1024,
        load_mtp=False,
        num_nextn_predict_layers=0,
        quantization_config=quant,
    )
    with torch.device("cuda"):
        model = ds.DeepseekV3ForCausalLM(config).to(torch.bfloat16).eval()
    ids = torch.randint(2, 1024, (1, 2048), device="cuda")
    rows = []
    for name in names:
        model.set_fp8_compute(name)
        with torch.no_grad():
            model(ids)  # warm-up (kernel compile, cached scale layouts)
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            model(ids)
            peak = torch.cuda.max_memory_allocated() - base
        rows.append(["decoder layer, 2048 tokens", name, "", "", "", "", f"peak +{peak / 2**20:.0f} MiB"])
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefill-rows", type=int, default=4096)
    parser.add_argument("--reps", type=int, default=20)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print(
            "benchmarks/fp8_gpu.py needs a CUDA GPU (none here): the FP8 GPU backends are tested on CPU through "
            "their twins only (tests/unit/test_fp8_gpu_backends.py). Run this on a GPU machine.",
            file=sys.stderr,
        )
        return 2
    major, minor = torch.cuda.get_device_capability()
    print(f"{torch.cuda.get_device_name()} (SM{major}{minor}), torch {torch.__version__}, CUDA {torch.version.cuda}")
    names = backends()
    header = [
        "GEMM (out x in)",
        "backend",
        "rel err",
        "prefill TFLOP/s",
        "BF16 TFLOP/s",
        "vs BF16",
        "decode us @ " + "/".join(map(str, DECODE_BATCHES)),
    ]
    table = [header] + gemm_rows(args, names) + layer_peak_memory(names)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, row in enumerate(table):
        print(" | ".join(c.ljust(w) for c, w in zip(row, widths)))
        if i == 0:
            print("-+-".join("-" * w for w in widths))
    return 0


if __name__ == "__main__":
    sys.exit(main())
