"""The native CPU kernels for block-scaled FP8 (``csrc/fp8_cpu.cpp``): built once per machine, cached, loaded.

What they compute, with the same formula as :func:`~.kernels.fp8_matmul_reference` (their reference twin):
``y = x @ dequant(W_fp8, scale_inv).T`` reading the FP8 weight directly (1 byte per parameter), fp32
accumulation, output in the input's dtype (float32 or bfloat16). Few rows (decode) stream the weight once;
more rows (prefill) dequantize it chunk by chunk into a reused buffer and multiply with BLAS. The C++ file's
header explains the kernels.

Packaging, so that a user never notices:

* The source is compiled against torch's *stable C ABI* (``STABLE_TORCH_LIBRARY``: no pybind11, no ATen
  headers), which takes ~1-3 s instead of the ~45 s of a ``torch/extension.h`` build, by the system C++
  compiler (``$CXX``, else ``c++``/``g++``/``clang++``) called directly -- not through
  ``torch.utils.cpp_extension``, which wants ninja and always links the Python bindings. ``scripts/setup.sh``
  builds it ahead of time; otherwise the first FP8 matmul of the first process on a machine builds it.
* The shared library is cached in ``$DEEPSEEKV3_CACHE_DIR`` (default ``$XDG_CACHE_HOME/modeling_deepseekv3``
  or ``~/.cache/modeling_deepseekv3``) under a name hashing the source, the torch version, the compiler's
  path and identity, and the flags; a file lock keeps two processes from building at once, and the library
  is renamed into place only when complete. Loading a cached build takes well under a millisecond.
* The ops are registered as torch custom ops (``torch.ops.deepseekv3_fp8.*``) with fake (meta) kernels, so
  they work under ``torch.no_grad``, inside ``torch.compile`` graphs and on meta tensors.
* Where no kernel applies -- no C++ compiler, a failed build, a CPU without AVX2+FMA+F16C, not x86-64 --
  :func:`available` is False after one warning line, and the callers take the torch path (dequantize, then
  ``F.linear``): slower, never a different answer.

Run-time ISA dispatch: AVX-512 (F/BW/VL) where the CPU has it, else AVX2+FMA+F16C, chosen by cpuid inside
the library. ``DEEPSEEKV3_FP8_ISA=avx2|avx512|auto|off`` forces a variant for the process (``off``: the torch
path); the private ``_isa`` argument of the wrappers does the same per call, for tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch

__all__ = [
    "HEAD_BLAS_MIN_ROWS",
    "ISAS",
    "STREAM_MAX_ROWS",
    "NativeBuildError",
    "available",
    "cache_dir",
    "dequantize",
    "head_matmul",
    "library_path",
    "linear",
    "load",
    "supported_isas",
]

SOURCE = Path(__file__).with_name("csrc") / "fp8_cpu.cpp"
ISAS = {"avx2": 1, "avx512": 2}  # the library's ISA codes (0 = best available)
# Rows up to which `linear` streams the FP8 weight (widening it in registers, or once per K chunk into L1 for
# more than 4 rows); above, chunked dequantization + BLAS is faster. Measured crossover (2048x7168 and
# 7168x2048, one thread): 24-32 rows with AVX-512, 16-24 with AVX2 against an AVX-512 BLAS.
STREAM_MAX_ROWS = 24
# Rows per group from which `head_matmul` dequantizes each group's rows and multiplies with BLAS instead.
HEAD_BLAS_MIN_ROWS = 32
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-math-errno")
_X86 = {"x86_64", "amd64", "x64"}


class NativeBuildError(RuntimeError):
    """The kernel library could not be built or loaded here (the message says why and what to do)."""


_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops", "isa", "path", or "error"


def cache_dir() -> Path:
    """Where built libraries live (one file per source/torch/compiler combination)."""
    if os.environ.get("DEEPSEEKV3_CACHE_DIR"):
        return Path(os.environ["DEEPSEEKV3_CACHE_DIR"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "modeling_deepseekv3"


def _compiler() -> str | None:
    for name in (os.environ.get("CXX"), "c++", "g++", "clang++"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _torch_dirs() -> tuple[Path, Path]:
    root = Path(torch.__file__).parent
    return root / "include", root / "lib"


def library_path(cxx: str | None = None) -> Path | None:
    """The cached library's path for this source, torch and compiler (None without a compiler). Cheap: no
    subprocess, only the source bytes and a ``stat`` of the compiler feed the hash."""
    cxx = cxx or _compiler()
    if cxx is None:
        return None
    real = os.path.realpath(cxx)
    st = os.stat(real)
    h = hashlib.sha256()
    for part in (SOURCE.read_bytes(), torch.__version__.encode(), real.encode(), str((st.st_size, st.st_mtime_ns)).encode(),
                 " ".join(_FLAGS).encode(), platform.machine().encode()):
        h.update(part)
        h.update(b"\0")
    return cache_dir() / f"deepseekv3_fp8-{h.hexdigest()[:16]}.so"


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on ``path`` (created if missing); a no-op where ``fcntl`` does not exist."""
    try:
        import fcntl
    except ImportError:  # not POSIX: builds still land atomically (rename), at worst twice
        yield
        return
    with open(path, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _build(so: Path, cxx: str) -> None:
    include, lib = _torch_dirs()
    so.parent.mkdir(parents=True, exist_ok=True)
    failed = so.with_suffix(".failed")
    with _file_lock(so.with_suffix(".lock")):
        if so.exists():  # another process built it while we waited
            return
        if failed.exists():
            raise NativeBuildError(
                f"an earlier build of the FP8 CPU kernel failed (log: {failed}); fix the compiler and delete that "
                "file to retry."
            )
        fd, tmp = tempfile.mkstemp(suffix=".so.tmp", dir=so.parent)
        os.close(fd)
        cmd = [cxx, *_FLAGS, f"-I{include}", str(SOURCE), "-o", tmp, f"-L{lib}", "-ltorch_cpu", "-lc10",
               f"-Wl,-rpath,{lib}"]
        t0 = time.perf_counter()
        print(f"modeling_deepseekv3: building the FP8 CPU kernel once for this machine ({so.name}) ...",
              file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            os.unlink(tmp)
            failed.write_text(" ".join(cmd) + "\n\n" + proc.stdout + proc.stderr)
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
            raise NativeBuildError(f"the FP8 CPU kernel failed to compile ({' | '.join(tail)}); log: {failed}")
        os.replace(tmp, so)
        print(f"modeling_deepseekv3: built in {time.perf_counter() - t0:.1f}s (cached in {so.parent})",
              file=sys.stderr, flush=True)


def _register_fakes() -> None:
    """Shapes-only kernels: used for meta tensors and while torch.compile traces."""

    @torch.library.register_fake("deepseekv3_fp8::linear")
    def _(x, weight, scale_inv, block_m, block_n, max_stream_rows, isa):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("deepseekv3_fp8::head_matmul")
    def _(x, weight, scale_inv, block_m, block_n, row_stride, row_offset, rows, transpose, blas_min_rows, isa):
        return x.new_empty(x.shape[0], x.shape[1], weight.shape[1] if transpose else rows)

    @torch.library.register_fake("deepseekv3_fp8::dequantize")
    def _(weight, scale_inv, block_m, block_n, isa):
        return weight.new_empty(weight.shape, dtype=torch.float32)


def _load() -> None:
    forced = os.environ.get("DEEPSEEKV3_FP8_ISA", "auto").strip().lower()
    if forced in ("off", "none", "0", "torch"):
        raise NativeBuildError("disabled by DEEPSEEKV3_FP8_ISA=off")
    if forced not in ("auto", *ISAS):
        raise NativeBuildError(f"DEEPSEEKV3_FP8_ISA must be auto, avx2, avx512 or off, got {forced!r}")
    if platform.machine().lower() not in _X86:
        raise NativeBuildError(f"no kernel for {platform.machine()} CPUs (x86-64 with AVX2 only)")
    cxx = _compiler()
    if cxx is None:
        raise NativeBuildError("no C++ compiler found (install g++ or clang++, or set CXX)")
    so = library_path(cxx)
    if not so.exists():
        _build(so, cxx)
    torch.ops.load_library(str(so))
    mask = int(ctypes.CDLL(str(so)).deepseekv3_fp8_isa_mask())
    have = [name for name, code in ISAS.items() if mask & (1 << code)]
    if not have:
        raise NativeBuildError("this CPU has no AVX2+FMA+F16C")
    if forced != "auto" and forced not in have:
        raise NativeBuildError(f"DEEPSEEKV3_FP8_ISA={forced} but this CPU supports only {', '.join(have)}")
    _register_fakes()
    _state.update(ops=torch.ops.deepseekv3_fp8, isa=ISAS.get(forced, 0), path=so, isas=tuple(have))


@torch.compiler.disable  # file locks, a subprocess and dlopen: run eagerly if first reached while compiling
def load(strict: bool = False) -> bool:
    """Build (first time on this machine) and load the kernels; True if they can be used. Idempotent and
    thread-safe. On failure warns once (one line, saying why and that the torch path is used instead)
    and returns False, or raises :class:`NativeBuildError` with ``strict=True``."""
    if "ops" in _state:
        return True
    if "error" not in _state:
        with _lock:
            if "ops" not in _state and "error" not in _state:
                try:
                    _load()
                except (NativeBuildError, OSError, RuntimeError) as exc:
                    _state["error"] = exc
                    warnings.warn(
                        f"modeling_deepseekv3: native FP8 CPU kernel unavailable ({exc}); FP8 linears on CPU use "
                        "the slower torch path (dequantize, then matmul). Results are the same.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
    if strict and "error" in _state:
        err = _state["error"]
        raise err if isinstance(err, NativeBuildError) else NativeBuildError(str(err))
    return "ops" in _state


def available() -> bool:
    """Whether the native kernels are loaded (loads them on first call)."""
    return "ops" in _state or load()


def supported_isas() -> tuple[str, ...]:
    """The kernel variants this CPU can run (empty if the library is unavailable)."""
    return _state.get("isas", ()) if available() else ()


def _isa_code(isa: str | None) -> int:
    if isa is None:
        return _state["isa"]
    if isa not in ISAS:
        raise ValueError(f"isa must be one of {sorted(ISAS)}, got {isa!r}.")
    return ISAS[isa]


def _blocks(block_size) -> tuple[int, int]:
    bm, bn = block_size
    return int(bm), int(bn)


def linear(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_size, *,
           max_stream_rows: int = STREAM_MAX_ROWS, _isa: str | None = None) -> torch.Tensor:
    """``x [T, N] @ dequant(weight [M, N], scale_inv).T -> [T, M]`` in ``x``'s dtype (float32 or bfloat16).
    Rows ``<= max_stream_rows`` stream the FP8 weight; more use chunked dequantization + BLAS. Needs
    :func:`available`."""
    bm, bn = _blocks(block_size)
    return _state["ops"].linear(x, weight, scale_inv, bm, bn, int(max_stream_rows), _isa_code(_isa))


def head_matmul(x: torch.Tensor, weight: torch.Tensor, scale_inv: torch.Tensor, block_size, row_stride: int,
                row_offset: int, rows: int, transpose: bool, *, blas_min_rows: int = HEAD_BLAS_MIN_ROWS,
                _isa: str | None = None) -> torch.Tensor:
    """Per-group products with row ranges of one FP8 weight; group ``g`` uses rows
    ``g * row_stride + row_offset + [0, rows)`` (``W_g [rows, N]``). ``transpose=False``:
    ``x [G, T, N] @ W_g.T -> [G, T, rows]``; ``transpose=True``: ``x [G, T, rows] @ W_g -> [G, T, N]``.
    The absorbed MLA's ``W_UV`` and ``W_UK`` products on ``kv_b_proj`` (group = head). From
    ``blas_min_rows`` rows on, each group's rows are dequantized once and multiplied by BLAS."""
    bm, bn = _blocks(block_size)
    return _state["ops"].head_matmul(x, weight, scale_inv, bm, bn, int(row_stride), int(row_offset), int(rows),
                                     bool(transpose), int(blas_min_rows), _isa_code(_isa))


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block_size, *, _isa: str | None = None) -> torch.Tensor:
    """The dense float32 weight, bit-identical to :func:`~.format.block_dequantize` (one rounding of
    ``float(code) * scale``), at memory speed."""
    bm, bn = _blocks(block_size)
    return _state["ops"].dequantize(weight, scale_inv, bm, bn, _isa_code(_isa))
