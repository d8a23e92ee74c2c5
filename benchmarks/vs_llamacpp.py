"""CPU decode and prefill against llama.cpp on the same weights, in one process, interleaved, same thread count.

What runs (each model, each thread count, ``--rounds`` interleaved rounds after a warm-up):

* ours: ``DeepseekV3ForCausalLM.from_pretrained(checkpoint, dtype=float32)``, FP8 weights on the native kernel;
  greedy ``generate()`` timed per step (``timing.StepClock``); and "ours compiled", the same model with its decode
  step compiled (``cache_implementation="static"``, ``compile_config=CompileConfig(fullgraph=True)``; compiled in
  the warm-up, which runs every timed shape once);
* llama.cpp through ``llama-cpp-python`` (an optional extra, never a dependency of the package: ``pip install
  ".[llamacpp]"`` with ``CMAKE_ARGS="-DGGML_NATIVE=ON"`` builds it for this CPU), on GGUF files written from our
  BF16 export by llama.cpp's own converter (``convert_hf_to_gguf.py`` from the same llama-cpp-python sdist, its
  ``--outtype q8_0`` and ``f16``), flash attention on (its CLI's default); tokens fed through ``llama_decode`` and
  the greedy token read from its logits (a few microseconds of Python per step, counted against llama.cpp).

Figures: decode tokens/s after a short prompt (``--new-tokens`` steps, median step) and after a ``--long-context``
prompt; prefill tokens/s of a ``--prefill`` prompt. Each decode figure is also given as the bytes read per token
(weights each engine holds: routed experts at top-k / n_routed, the embedding as one row, the MTP layer not at all,
the cache left out) times tokens/s, as a fraction of this machine's read bandwidth (measured here, the same threads).

Models: ``shipped`` (models/shakespeare-deepseek-v3, 19M parameters: overhead-bound) and ``v3dims`` (V3's attention
dims and routing shape, 4 layers, 0.9B parameters: ``fp8_cpu.py``'s E2E shape, random FP8 weights, written once into
``--workdir``).

Then decode tokens/s against context on the V3-dims model, one thread (``--contexts``; ``0`` skips it): ours, llama.cpp
Q8_0 and transformers' native DeepSeek-V3 (fp32, on the same BF16 export llama.cpp converts), interleaved per
context, plotted to ``--plot`` (benchmarks/decode_vs_context.png).

    python benchmarks/vs_llamacpp.py [--models shipped,v3dims] [--threads 1,2] [--rounds 3] [--contexts 8,512,...]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import shutil
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import torch
import transformers
from fp8_cpu import E2E
from timing import StepClock, checked, ratio

import modeling_deepseekv3 as ds

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "models" / "shakespeare-deepseek-v3"
LLAMA_CPP_PYTHON = "0.3.36"  # the version whose vendored converter writes the GGUFs


def llama_cpp_module():
    try:
        import llama_cpp
    except ImportError:
        sys.exit(
            "llama-cpp-python is not installed. Build it for this CPU (a few minutes):\n"
            f'  CMAKE_ARGS="-DGGML_NATIVE=ON" pip install "llama-cpp-python=={LLAMA_CPP_PYTHON}"   '
            '(or pip install ".[llamacpp]")'
        )
    return llama_cpp


def converter_source(workdir: Path) -> Path:
    """llama.cpp's sources as vendored in the llama-cpp-python sdist (the converter and gguf-py are not in the
    wheel): fetched from PyPI once."""
    src = workdir / f"llama_cpp_python-{LLAMA_CPP_PYTHON}" / "vendor" / "llama.cpp"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src
    workdir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "-d", str(workdir)]
        + [f"llama-cpp-python=={LLAMA_CPP_PYTHON}"],
        check=True,
    )
    with tarfile.open(workdir / f"llama_cpp_python-{LLAMA_CPP_PYTHON}.tar.gz") as tar:
        tar.extractall(workdir, filter="data")
    return src


# Runs llama.cpp's converter with one change: our tokenizer (byte-level BPE, GPT-2's split regex) is not in its
# table of known pre-tokenizer hashes, which it refuses; it is GPT-2's pre-tokenizer. Only token ids cross between
# the engines here, so this only labels the vocabulary.
_CONVERT = """
import sys
src = sys.argv.pop(1)
sys.path[:0] = [src, src + "/gguf-py"]
import conversion.base as base
base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
import convert_hf_to_gguf
convert_hf_to_gguf.main()
"""


def write_ggufs(
    name: str, checkpoint: Path, workdir: Path, formats: tuple[str, ...] = ("Q8_0", "F16"), keep_export: bool = True
) -> dict[str, Path]:
    """``{"Q8_0": path, "F16": path}`` (``formats``): our BF16 export of ``checkpoint`` converted by llama.cpp's
    converter. ``keep_export=False`` deletes the BF16 export afterwards (Moonlight's is 33 GB)."""
    out = {fmt: workdir / f"{name}-{fmt.lower()}.gguf" for fmt in formats}
    if all(p.is_file() for p in out.values()):
        return out
    bf16 = workdir / f"{name}-bf16"
    if not (bf16 / "config.json").is_file():
        print(f"exporting {checkpoint} to BF16 for llama.cpp's converter ...", flush=True)
        ds.convert_checkpoint(checkpoint, bf16, to="bf16", overwrite=True, progress=True)
    src = converter_source(workdir)
    for fmt, path in out.items():
        if path.is_file():
            continue
        print(f"converting to {fmt} GGUF with llama.cpp's converter ...", flush=True)
        tmp = path.with_suffix(".partial")
        cmd = [sys.executable, "-c", _CONVERT, str(src), str(bf16), "--outtype", fmt.lower(), "--outfile", str(tmp)]
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        tmp.rename(path)  # never leave a half-written GGUF under the final name
    if not keep_export:
        shutil.rmtree(bf16)
    return out


def make_v3dims(workdir: Path) -> Path:
    path = workdir / "v3dims-fp8"
    if not (path / "config.json").is_file():
        t0 = time.perf_counter()
        ds.make_tiny_checkpoint(path, mtp=False, overrides=E2E, tokenizer=True)
        print(f"wrote the V3-dims FP8 checkpoint in {time.perf_counter() - t0:.0f} s")
    return path


def read_bandwidth(threads: int, gib: float = 1.0) -> float:
    """Bytes/s of a streaming read (``sum`` over a ``gib`` float32 buffer, far larger than any cache), the best of 9
    spread over ~2 s: what the machine can read. Interference (a neighbour on a shared host) only lowers a sample;
    a median of 5 taken in a busy moment gave 21.6 GB/s at one thread where the best reads are 25-32, and an engine
    then appeared to read faster than the machine can."""
    torch.set_num_threads(threads)
    x = torch.ones(int(gib * 2**30) // 4)
    x.sum()
    times = []
    for _ in range(9):
        t0 = time.perf_counter()
        x.sum()
        times.append(time.perf_counter() - t0)
        time.sleep(0.2)
    return x.numel() * 4 / checked(min(times), "bandwidth read")


def ours_bytes_per_token(model) -> float:
    """Weight bytes one decode token reads (see the module docstring)."""
    config = model.config
    share = config.num_experts_per_tok / config.n_routed_experts
    total = 0.0
    for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
        if ".layers." in name and int(name.split(".layers.")[1].split(".")[0]) >= config.num_hidden_layers:
            continue  # the MTP layer
        b = t.numel() * t.element_size()
        if "embed_tokens" in name:
            b /= t.shape[0]
        elif ".experts." in name and "shared" not in name:
            b *= share
        total += b
    return total


def gguf_bytes_per_token(path: Path, src: Path, config) -> float:
    sys.path[:0] = [str(src / "gguf-py")]
    import gguf

    share = config.num_experts_per_tok / config.n_routed_experts
    total = 0.0
    for t in gguf.GGUFReader(path).tensors:
        b = float(t.n_bytes)
        if t.name.startswith("token_embd"):
            b /= int(t.shape[-1])
        elif "_exps" in t.name:
            b *= share
        total += b
    return total


class Ours:
    generate_kwargs: dict = {}

    def __init__(self, path: Path):
        self.model = ds.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        self.bytes = ours_bytes_per_token(self.model)

    def decode(self, prompt: list[int], steps: int) -> tuple[float, list[int]]:
        clock = StepClock()
        ids = torch.tensor([prompt])
        # no EOS instead of min_new_tokens: its two logits processors cost ~1 ms a step at a 160k vocabulary, which
        # llama.cpp is not charged for
        kw = {"do_sample": False, "max_new_tokens": steps + 1, "eos_token_id": None, "pad_token_id": 0}
        kw.update(self.generate_kwargs)
        out = self.model.generate(ids, streamer=clock, **kw)[0, len(prompt) :].tolist()
        intervals = [b - a for a, b in itertools.pairwise(clock.times[1:])]  # decode steps only
        return statistics.median(intervals), out

    def prefill(self, prompt: list[int]) -> float:
        clock = StepClock()
        self.model.generate(torch.tensor([prompt]), streamer=clock, max_new_tokens=1, do_sample=False, pad_token_id=0)
        return clock.times[1] - clock.times[0]  # the prompt's forward and one argmax


class OursCompiled(Ours):
    """The same model with its decode step compiled: ``generate(cache_implementation="static",
    compile_config=CompileConfig(fullgraph=True))`` (inductor). The cache is sized to each prompt plus its steps, so
    each (prompt length, steps) pair compiles once per thread count, in the warm-up; later calls reuse the graph."""

    def __init__(self, ours: Ours):
        from transformers.generation.configuration_utils import CompileConfig

        self.model, self.bytes = ours.model, ours.bytes
        config = CompileConfig(fullgraph=True, dynamic=False, mode="default")
        self.generate_kwargs = {"cache_implementation": "static", "compile_config": config}
        self.threads = torch.get_num_threads()

    def decode(self, prompt: list[int], steps: int) -> tuple[float, list[int]]:
        if torch.get_num_threads() != self.threads:  # inductor sizes its kernels' parallelism when it compiles
            torch._dynamo.reset()
            self.model.__dict__.pop("_compiled_call", None)
            self.threads = torch.get_num_threads()
        return super().decode(prompt, steps)


class LlamaCpp:
    """A llama.cpp context on one GGUF, driven through the C API (``llama_decode`` on a one-sequence batch, the last
    position's logits): flash attention on, as ``llama-cli`` / ``llama-bench`` run by default (off, its CPU decode
    is ~5x slower here)."""

    def __init__(self, path: Path, threads: int, context: int):
        self.api = llama_cpp_module()
        self.llm = self.api.Llama(
            model_path=str(path),
            n_ctx=context,
            n_batch=512,
            n_ubatch=512,
            n_threads=threads,
            n_threads_batch=threads,
            flash_attn=True,
            verbose=False,
        )
        self.ctx = self.llm._ctx.ctx
        self.vocab = self.llm.n_vocab()

    def _feed(self, tokens: list[int]) -> int:
        """Decode ``tokens`` (at most ``n_batch``) after what the context holds -> the greedy next token."""
        import numpy as np

        api = self.api
        ids = (api.llama_token * len(tokens))(*tokens)  # kept alive: the batch only points at it
        batch = api.llama_batch_get_one(ids, len(tokens))
        if api.llama_decode(self.ctx, batch) != 0:
            raise RuntimeError("llama_decode failed")
        return int(np.ctypeslib.as_array(api.llama_get_logits_ith(self.ctx, -1), shape=(self.vocab,)).argmax())

    def _start(self, prompt: list[int]) -> int:
        self.api.llama_memory_clear(self.api.llama_get_memory(self.ctx), True)
        token = None
        for i in range(0, len(prompt), 512):
            token = self._feed(prompt[i : i + 512])
        return token

    def decode(self, prompt: list[int], steps: int) -> tuple[float, list[int]]:
        token = self._start(prompt)
        out, intervals = [token], []
        for _ in range(steps):
            t0 = time.perf_counter()
            token = self._feed([token])
            intervals.append(time.perf_counter() - t0)
            out.append(token)
        return statistics.median(intervals), out

    def prefill(self, prompt: list[int]) -> float:
        t0 = time.perf_counter()
        self._start(prompt)
        return time.perf_counter() - t0


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="shipped,v3dims")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--long-context", type=int, default=1024, help="decode after a prompt this long (0: skip)")
    parser.add_argument("--prefill", type=int, default=512)
    parser.add_argument("--workdir", default=str(ROOT / "runs" / "vs_llamacpp"))
    parser.add_argument("--json", default=None, help="write every figure here")
    parser.add_argument("--contexts", default="8,512,1024,2048", help="V3-dims decode vs context (0: skip)")
    parser.add_argument("--plot", default=str(ROOT / "benchmarks" / "decode_vs_context.png"))
    args = parser.parse_args()
    transformers.logging.set_verbosity_error()
    llama_cpp_module()
    workdir = Path(args.workdir)
    threads = [int(t) for t in args.threads.split(",")]
    checkpoints = {"shipped": SHIPPED, "v3dims": None}
    names = args.models.split(",")
    src = converter_source(workdir)

    from continuous_batching import cpu_model

    from modeling_deepseekv3.fp8 import native

    native.load()
    isas = native.supported_isas()
    forced = os.environ.get("DEEPSEEKV3_FP8_ISA", "auto")
    kernel = forced if forced != "auto" else (max(isas, key=native.ISAS.__getitem__) if isas else "torch fallback")
    print(
        f"{cpu_model()}, torch {torch.__version__}, llama-cpp-python {llama_cpp_module().__version__}, "
        f"our FP8 kernel: {kernel} (this CPU runs {', '.join(isas) or 'none'})"
    )
    bandwidth = {t: read_bandwidth(t) for t in threads}
    print("read bandwidth: " + ", ".join(f"{bandwidth[t] / 1e9:.1f} GB/s at {t} thread(s)" for t in threads))

    results = {}
    for name in names:
        path = checkpoints[name] or make_v3dims(workdir)
        ggufs = write_ggufs(name, path, workdir)
        ours = Ours(path)
        config = ours.model.config
        context = max(args.long_context, args.prefill) + args.new_tokens + 8
        engines = {"ours FP8": ours, "ours compiled": OursCompiled(ours)}
        nbytes = {"ours FP8": ours.bytes, "ours compiled": ours.bytes}
        for fmt, gguf_path in ggufs.items():
            nbytes[f"llama.cpp {fmt}"] = gguf_bytes_per_token(gguf_path, src, config)
        g = torch.Generator().manual_seed(0)
        short = torch.randint(2, config.vocab_size, (8,), generator=g).tolist()
        long_steps = max(8, args.new_tokens // 4)
        long_len = min(args.long_context, config.max_position_embeddings - long_steps - 2)  # within the context
        long = torch.randint(2, config.vocab_size, (long_len,), generator=g).tolist()
        pre = torch.randint(2, config.vocab_size, (args.prefill,), generator=g).tolist()
        for t in threads:
            torch.set_num_threads(t)
            for fmt, gguf_path in ggufs.items():
                engines[f"llama.cpp {fmt}"] = LlamaCpp(gguf_path, t, context)
            samples = {e: {"decode": [], "decode_long": [], "prefill": []} for e in engines}
            tokens = {}
            for engine in engines.values():  # warm-up: the timed shapes (the compiled engine compiles each here)
                engine.decode(short, args.new_tokens)
                if args.long_context:
                    engine.decode(long, long_steps)
                engine.prefill(pre[:64])
            for _ in range(args.rounds):
                for label, engine in engines.items():
                    step, tokens[label] = engine.decode(short, args.new_tokens)
                    samples[label]["decode"].append(step)
                    if args.long_context:
                        samples[label]["decode_long"].append(engine.decode(long, long_steps)[0])
                    samples[label]["prefill"].append(engine.prefill(pre))
            table = {}
            for label, s in samples.items():
                step = checked(statistics.median(s["decode"]), f"{label} decode")
                table[label] = {
                    "decode_tok_s": 1 / step,
                    "decode_long_tok_s": 1 / checked(statistics.median(s["decode_long"]), label)
                    if s["decode_long"]
                    else None,
                    "prefill_tok_s": args.prefill / checked(statistics.median(s["prefill"]), f"{label} prefill"),
                    "bytes_per_token": nbytes[label],
                    "bandwidth_fraction": nbytes[label] / step / bandwidth[t],
                }
            results[f"{name}, {t} thread(s)"] = table
            print(
                f"\n== {name} ({sum(p.numel() for p in ours.model.parameters()) / 1e6:.0f}M parameters loaded), {t} thread(s)"
            )
            print(
                f"  {'engine':18s} {'decode tok/s':>12s} {'@' + str(long_len):>9s} {'prefill':>9s} "
                f"{'MB/token':>9s} {'frac of BW':>10s}"
            )
            for label, row in table.items():
                long_s = f"{row['decode_long_tok_s']:9.1f}" if row["decode_long_tok_s"] else f"{'-':>9s}"
                print(
                    f"  {label:18s} {row['decode_tok_s']:12.1f} {long_s} {row['prefill_tok_s']:9.1f} "
                    f"{row['bytes_per_token'] / 1e6:9.1f} {row['bandwidth_fraction']:10.2f}"
                )
            for mine in ("ours FP8", "ours compiled"):
                ours_row = table[mine]
                for fmt in ggufs:
                    other = table[f"llama.cpp {fmt}"]
                    print(
                        f"  {mine} / llama.cpp {fmt}: decode "
                        f"{ratio(1 / other['decode_tok_s'], 1 / ours_row['decode_tok_s']):.2f}x"
                        f", prefill {ratio(1 / other['prefill_tok_s'], 1 / ours_row['prefill_tok_s']):.2f}x"
                    )
            print(
                "  compiled / eager decode: "
                f"{ratio(1 / table['ours FP8']['decode_tok_s'], 1 / table['ours compiled']['decode_tok_s']):.2f}x"
                f"; greedy tokens identical: {tokens['ours compiled'] == tokens['ours FP8']}"
            )
            same = sum(a == b for a, b in zip(tokens["ours FP8"], tokens["llama.cpp F16"]))
            print(f"  greedy tokens, ours vs llama.cpp F16: {same}/{len(tokens['ours FP8'])} identical (rounding)")
            for fmt in ggufs:
                del engines[f"llama.cpp {fmt}"]
    if args.contexts != "0":
        contexts = [int(c) for c in args.contexts.split(",")]
        results["decode vs context, v3dims, 1 thread"] = sweep = decode_vs_context(workdir, contexts, args.rounds)
        plot(sweep, args.plot, f"{cpu_model()}, our FP8 kernel: {kernel}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def decode_vs_context(workdir: Path, contexts: list[int], rounds: int, steps: int = 8) -> dict:
    """``{engine: {context: tok/s}}``: the median decode step after a prompt of each length, one thread."""
    torch.set_num_threads(1)
    path = make_v3dims(workdir)
    ggufs = write_ggufs("v3dims", path, workdir)
    native = Native(workdir / "v3dims-bf16")
    ours = Ours(path)
    engines = {
        "ours FP8": ours,
        "ours compiled": OursCompiled(ours),
        "llama.cpp Q8_0": LlamaCpp(ggufs["Q8_0"], 1, max(contexts) + steps + 8),
        "transformers native (fp32)": native,
    }
    vocab = native.model.config.vocab_size
    g = torch.Generator().manual_seed(1)
    prompts = {c: torch.randint(2, vocab, (c,), generator=g).tolist() for c in contexts}
    for engine in engines.values():  # warm-up: every timed shape (the compiled engine compiles each here)
        for c in contexts:
            engine.decode(prompts[c], steps)
    samples = {label: {c: [] for c in contexts} for label in engines}
    for _ in range(rounds):
        for c in contexts:
            for label, engine in engines.items():
                samples[label][c].append(engine.decode(prompts[c], steps)[0])
    sweep = {
        label: {c: 1 / checked(statistics.median(v), f"{label} @{c}") for c, v in s.items()}
        for label, s in samples.items()
    }
    print(f"\n== decode tok/s vs context, v3dims, 1 thread (median step of {steps}, {rounds} rounds)")
    print(f"  {'context':>8s} " + " ".join(f"{label:>26s}" for label in sweep))
    for c in contexts:
        print(f"  {c:8d} " + " ".join(f"{sweep[label][c]:26.1f}" for label in sweep))
    return sweep


class Native(Ours):
    """transformers' own DeepSeek-V3 (its expanded-cache attention) on the BF16 export, in fp32."""

    def __init__(self, path: Path):
        self.model = transformers.DeepseekV3ForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def plot(sweep: dict, out: str, machine: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("  (matplotlib missing: no plot)")
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, points in sweep.items():
        ax.plot(list(points), list(points.values()), marker="o", label=label)
    ax.set_xlabel("context (tokens before the decoded one)")
    ax.set_ylabel("decode tokens/s (batch 1)")
    ax.set_title(f"Decode speed vs context, V3-dims model (0.9B), 1 thread\n{machine}")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    print(f"  plot: {out}")


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
