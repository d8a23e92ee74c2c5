"""Memory of loading the same official-layout FP8 checkpoint: ours vs transformers-native, one process.

What is measured, for each model in turn (ours first, then native, memory returned to the OS between):

* resident bytes: the bytes of every parameter and buffer the loaded model holds;
* peak RSS during ``from_pretrained`` above the pre-load baseline (sampled every 2 ms from /proc);
* RSS after one forward pass (the mmapped weights of ours are then paged in).

Native transformers (5.24) has no CPU FP8 path: it dequantizes every FP8 weight to BF16 while loading and
fuses each layer's experts into 3-D tensors. Ours keeps the float8 codes (1 byte/param) and their FP32
block scales as zero-copy views of the mmapped shards. The checkpoint uses 128-aligned shapes only
(kv_lora_rank 512 + a 128-wide rope key), because native mis-reads partial FP8 blocks (tests/test_fp8.py);
numerical parity of the two models is tested in tests/, not here.

    python benchmarks/memory_load.py            # ~0.6 GB checkpoint in a temp dir
    python benchmarks/memory_load.py --experts 128 --keep /tmp/bench-ckpt
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import tempfile
import threading
import time
from pathlib import Path

import torch


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


class PeakRSS:
    """Samples RSS in a background thread while the block runs."""

    def __enter__(self):
        self.baseline = rss_bytes()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(0.002)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())


def release_memory():
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except OSError:
        pass


def model_bytes(model) -> int:
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        total += t.numel() * t.element_size()
    return total


def measure(name, load_fn, ids):
    release_memory()
    with PeakRSS() as peak:
        t0 = time.perf_counter()
        model = load_fn()
        load_s = time.perf_counter() - t0
    resident = model_bytes(model)
    with torch.no_grad():
        model(ids)
    after_forward = rss_bytes() - peak.baseline
    result = {
        "name": name,
        "load_s": load_s,
        "resident": resident,
        "peak_load": peak.peak - peak.baseline,
        "after_forward": after_forward,
    }
    del model
    release_memory()
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--experts", type=int, default=64, help="routed experts per MoE layer (default 64)")
    parser.add_argument("--layers", type=int, default=4, help="decoder layers, the first dense (default 4)")
    parser.add_argument("--keep", type=Path, default=None, help="write/reuse the checkpoint here instead of a temp dir")
    args = parser.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    import transformers

    import modeling_deepseekv3 as ds

    overrides = {  # every FP8 dimension a multiple of 128 so transformers-native can load it
        "vocab_size": 4096,
        "hidden_size": 1024,
        "intermediate_size": 2048,
        "moe_intermediate_size": 512,
        "num_hidden_layers": args.layers,
        "first_k_dense_replace": 1,
        "num_attention_heads": 8,
        "num_key_value_heads": 8,
        "q_lora_rank": 512,
        "kv_lora_rank": 512,
        "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 128,
        "v_head_dim": 128,
        "n_routed_experts": args.experts,
        "n_group": 8,
        "topk_group": 4,
        "num_experts_per_tok": 8,
        "max_position_embeddings": 4096,
        "rope_scaling": {
            "type": "yarn",
            "factor": 4,
            "original_max_position_embeddings": 1024,
            "beta_fast": 32,
            "beta_slow": 1,
            "mscale": 1.0,
            "mscale_all_dim": 1.0,
        },
    }
    tmp = None
    if args.keep is not None and (args.keep / "config.json").exists():
        path = args.keep
    else:
        if args.keep is None:
            tmp = tempfile.TemporaryDirectory()
            path = Path(tmp.name) / "ckpt"
        else:
            path = args.keep
        ds.make_tiny_checkpoint(path, num_shards=4, mtp=False, overrides=overrides)
    on_disk = sum(f.stat().st_size for f in path.glob("*.safetensors"))
    ids = torch.randint(2, 4096, (1, 64), generator=torch.Generator().manual_seed(0))

    transformers.logging.set_verbosity_error()
    ours = measure("ours", lambda: ds.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16), ids)
    native = measure(
        "transformers-native",
        lambda: transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.bfloat16),
        ids,
    )

    gib = 1024**3
    print(
        f"checkpoint: {path} ({on_disk / gib:.3f} GiB on disk, FP8, {args.experts} experts x {args.layers - 1} MoE layers)"
    )
    print(f"{'':22s} {'resident':>12s} {'peak RSS load':>14s} {'RSS after fwd':>14s} {'load s':>8s}")
    for r in (ours, native):
        print(
            f"{r['name']:22s} {r['resident'] / gib:10.3f} G {r['peak_load'] / gib:12.3f} G "
            f"{r['after_forward'] / gib:12.3f} G {r['load_s']:8.2f}"
        )
    print(
        f"ratio ours/native: resident {ours['resident'] / native['resident']:.3f} (goal <= 0.52), "
        f"peak RSS during load {ours['peak_load'] / max(native['peak_load'], 1):.3f} (goal <= 0.35)"
    )
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
