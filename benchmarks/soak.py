"""Soak: does a long-running process grow? 50 x generate(200 tokens) and 10 x load/free in one process.

Wave 1's default CPU FP8 path leaked ~1.9 MiB per 200 generated tokens (a ``torch._dynamo.config.patch``
entered on every FP8 matmul); the native kernel removed the cause. This measures the resident set (VmRSS)
after a warm-up, then after each loop, on the FP8 model the README's main job runs (the shipped model when
present, else a tiny official-layout FP8 checkpoint), with the kernel (``fp8_compute="auto"``) and with the
reference path (``"dequant"``). ``tests/integration/test_hardening.py`` keeps a shorter version as a test.

    python benchmarks/soak.py [--model DIR] [--generations 50] [--new-tokens 200] [--loads 10]
"""

from __future__ import annotations

import argparse
import gc
import tempfile
import time
from pathlib import Path

import torch
import transformers

import modeling_deepseekv3 as ds

SHIPPED = Path(__file__).resolve().parents[1] / "models" / "shakespeare-deepseek-v3"


def rss_mib() -> float:
    """Current resident set of this process (Linux ``/proc``), MiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc/self/status: this benchmark needs Linux")


def soak(path: Path, fp8_compute: str, generations: int, new_tokens: int, loads: int) -> None:
    model = ds.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, fp8_compute=fp8_compute)
    ids = torch.randint(3, model.config.vocab_size, (1, 16), generator=torch.Generator().manual_seed(0))
    opts = {"max_new_tokens": new_tokens, "min_new_tokens": new_tokens, "do_sample": False}
    for _ in range(3):  # warm-up: allocator pools, kernel build/cache, one-time buffers
        model.generate(ids, **opts)
    gc.collect()
    start, t0 = rss_mib(), time.perf_counter()
    marks = []
    for i in range(generations):
        model.generate(ids, **opts)
        if (i + 1) % max(1, generations // 5) == 0:
            gc.collect()
            marks.append(rss_mib() - start)
    seconds = time.perf_counter() - t0
    grown = rss_mib() - start
    print(
        f"  {fp8_compute:7s}: {generations} x generate({new_tokens}) in {seconds:.1f}s; RSS growth over the loop "
        f"{grown:+.1f} MiB ({grown / generations:+.3f} MiB per generate; checkpoints "
        f"{', '.join(f'{m:+.1f}' for m in marks)})",
        flush=True,
    )
    del model
    gc.collect()
    base = rss_mib()
    after = []
    for _ in range(loads):
        m = ds.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32, fp8_compute=fp8_compute)
        m.generate(ids, max_new_tokens=4)
        del m
        gc.collect()
        after.append(rss_mib() - base)
    print(
        f"  {fp8_compute:7s}: {loads} x load/generate/free: RSS after each {', '.join(f'{a:+.1f}' for a in after)} "
        f"MiB (growth from the 2nd to the last: {after[-1] - after[0]:+.1f} MiB)",
        flush=True,
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path, default=None)
    parser.add_argument("--generations", type=int, default=50)
    parser.add_argument("--new-tokens", type=int, default=200)
    parser.add_argument("--loads", type=int, default=10)
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    with tempfile.TemporaryDirectory() as tmp:
        path = args.model or (SHIPPED if (SHIPPED / "config.json").is_file() else None)
        if path is None:
            path = Path(ds.make_tiny_checkpoint(Path(tmp) / "tiny", fp8=True))
        print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; model {path}")
        for mode in ("auto", "dequant"):
            soak(path, mode, args.generations, args.new_tokens, args.loads)


if __name__ == "__main__":
    main()
