"""The native CPU kernels for block-scaled FP8 (``csrc/fp8_cpu.cpp``): built once per machine, cached, loaded.

What they compute, with the same formula as :func:`~.reference.fp8_matmul_reference` (their reference twin):
``y = x @ dequant(W_fp8, scale_inv).T`` reading the FP8 weight directly (1 byte per parameter), fp32
accumulation, output in the input's dtype (float32 or bfloat16). Few rows (decode) stream the weight once;
more rows (prefill) dequantize it chunk by chunk into a reused buffer and multiply with BLAS. One more entry point
streams a dense BF16 / FP32 weight at decode (:func:`dense_linear`: the output head). The C++ file's header
explains the kernels.

Packaging, so that a user never notices:

* The source is compiled against torch's *stable C ABI* (``STABLE_TORCH_LIBRARY``: no pybind11, no ATen
  headers), which takes ~1-3 s instead of the ~45 s of a ``torch/extension.h`` build, by the system C++
  compiler (``$CXX``, else ``c++``/``g++``/``clang++``) called directly -- not through
  ``torch.utils.cpp_extension``, which wants ninja and always links the Python bindings. ``scripts/setup.sh``
  builds it ahead of time; otherwise the first FP8 matmul of the first process on a machine builds it.
* The shared library is cached in ``$DEEPSEEKV3_CACHE_DIR`` (default ``$XDG_CACHE_HOME/modeling_deepseekv3``
  or ``~/.cache/modeling_deepseekv3``) under a name hashing the source, the torch version, the compiler's
  path and identity, and the flags; a file lock keeps two processes from building at once. Loading a cached
  build takes about a millisecond.
* Nothing unverified is loaded. That name is computable by anyone and a file can be cut short (a partial copy,
  a power loss), so the name proves nothing: the builder fsyncs the library, renames it into place, then
  publishes a manifest beside it (``<name>.json``: sha256, size, the full build key), and a process loads the
  library only when its bytes match that manifest -- hashed and loaded through the same open file, so a swap in
  between cannot slip in. A missing, partial or altered library (or manifest) is rebuilt once; a library
  lacking the expected entry points is refused. The folder and its files must belong to the current user and
  be writable by nobody else (else: refused, with the fix), and no path in it is followed through a symlink.
* The ops are registered as torch custom ops (``torch.ops.deepseekv3_fp8.*``) with fake (meta) kernels, so
  they work under ``torch.no_grad``, inside ``torch.compile`` graphs and on meta tensors.
* Where no kernel applies -- no C++ compiler, a failed build, a refused cache, a full disk, a CPU without
  AVX2+FMA+F16C, not x86-64 -- :func:`available` is False after one warning line (saying why and what to do),
  the failure is remembered for the process, and the callers take the torch path (dequantize, then
  ``F.linear``): slower, never a different answer, never a crash.

Run-time ISA dispatch, chosen by cpuid inside the library: AVX-512 (F/BW/VL) with GFNI and VBMI where the CPU
has them (Zen 4, Ice Lake and later: the decode tiles' cheapest code widening), else AVX-512, else AVX2+FMA+F16C.
``DEEPSEEKV3_FP8_ISA=avx2|avx512|avx512gfni|auto|off`` forces a variant for the process (``off``: the torch
path); the private ``_isa`` argument of the wrappers does the same per call, for tests.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import platform
import shutil
import stat
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
    "dense_linear",
    "dequantize",
    "experts",
    "head_matmul",
    "library_path",
    "linear",
    "load",
    "manifest_path",
    "supported_isas",
]

SOURCE = Path(__file__).with_name("csrc") / "fp8_cpu.cpp"
ISAS = {"avx2": 1, "avx512": 2, "avx512gfni": 3}  # the library's ISA codes (0 = best available)
# Rows up to which `linear` streams the FP8 weight (widening it in registers, or once per K chunk into L1 for
# more than 4 rows); above, chunked dequantization + BLAS is faster. Measured crossover (2048x7168 and
# 7168x2048, one thread): 24-32 rows with AVX-512, 16-24 with AVX2 against an AVX-512 BLAS.
STREAM_MAX_ROWS = 24
# Rows per group from which `head_matmul` dequantizes each group's rows and multiplies with BLAS instead.
HEAD_BLAS_MIN_ROWS = 32
_FLAGS = ("-O3", "-std=c++17", "-shared", "-fPIC", "-fvisibility=hidden", "-fno-math-errno")
_X86 = {"x86_64", "amd64", "x64"}
CACHE_ENV = "DEEPSEEKV3_CACHE_DIR"
_SYMBOL = "deepseekv3_fp8_isa_mask"  # the C entry point the loader calls first
_OPS = (
    "linear",
    "head_matmul",
    "dequantize",
    "dense_linear",
    "experts",
)  # what the library must register in torch.ops.deepseekv3_fp8
_MANIFEST_FORMAT = 1
_MANIFEST_MAX_BYTES = 1 << 16
# Opening flags for files in the cache: never through a symlink, never handed to a child process, and never
# blocking on a FIFO someone left at the name (O_NONBLOCK changes nothing for regular files).
_OPEN = getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NONBLOCK", 0)


class NativeBuildError(RuntimeError):
    """The kernel library could not be built or loaded here (the message says why and what to do)."""


class _Unverified(Exception):
    """The cached library cannot be used as it is, but a fresh build would replace it: missing, partial, altered,
    or without its manifest. (What a rebuild could not fix -- a foreign owner, loose permissions, a symlink -- is
    a :class:`NativeBuildError` instead.)"""


_lock = threading.Lock()
_state: dict[str, object] = {}  # "ops", "isa", "isas", "path", "fd", or "error"


def cache_dir() -> Path:
    """Where built libraries live (one file per source/torch/compiler combination)."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
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


def _build_key(cxx: str) -> str:
    """sha256 over everything the library's bytes depend on: source, torch, compiler (path, size, mtime), flags,
    machine. Its first 16 digits name the file; the manifest records all 64, so a library+manifest pair from
    another build renamed to this name is still told apart."""
    real = os.path.realpath(cxx)
    st = os.stat(real)
    h = hashlib.sha256()
    for part in (
        SOURCE.read_bytes(),
        torch.__version__.encode(),
        real.encode(),
        str((st.st_size, st.st_mtime_ns)).encode(),
        " ".join(_FLAGS).encode(),
        platform.machine().encode(),
    ):
        h.update(part)
        h.update(b"\0")
    return h.hexdigest()


def library_path(cxx: str | None = None) -> Path | None:
    """The cached library's path for this source, torch and compiler (None without a compiler). Cheap: no
    subprocess, only the source bytes and a ``stat`` of the compiler feed the hash."""
    cxx = cxx or _compiler()
    if cxx is None:
        return None
    return _library_for(_build_key(cxx))


def _library_for(key: str) -> Path:
    return cache_dir() / f"deepseekv3_fp8-{key[:16]}.so"


def manifest_path(so: Path) -> Path:
    """The manifest the builder publishes beside ``so`` (after it): what the library's bytes must hash to."""
    return so.with_suffix(".json")


# -- the cache's trust checks ------------------------------------------------------------------------------------


def _refuse_if_others_can_write(st: os.stat_result, path: Path, what: str) -> None:
    """A file another account owns or may write could hold code that would run as us: refuse it, saying how to fix
    it. (Not checked where the OS has no uids.)"""
    if not hasattr(os, "geteuid"):
        return
    me = os.geteuid()
    if st.st_uid != me:
        raise NativeBuildError(
            f"{what} {path} belongs to uid {st.st_uid}, not to you (uid {me}), and code loaded from there would run "
            f"as you: remove it, or set {CACHE_ENV} to a folder of your own"
        )
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise NativeBuildError(
            f"{what} {path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):#o}), so anyone could swap "
            f"the kernel there: run `chmod go-w {path}`, or set {CACHE_ENV} to a folder only you can write"
        )


def _os_message(exc: OSError, folder: Path) -> str:
    """The real reason, in words: a full disk must not read as "No such file" (what the compiler's cleanup used
    to leave behind), and it is not a reason to give up on this machine for good."""
    if exc.errno == errno.ENOSPC:
        return (
            f"no space left on device in {folder}; free some space there, or set {CACHE_ENV} to a folder on "
            "another disk"
        )
    if exc.errno == getattr(errno, "EDQUOT", None):
        return f"disk quota exceeded in {folder}; free some space there, or set {CACHE_ENV} to another folder"
    where = f" ({exc.filename})" if exc.filename else ""
    return f"could not write the kernel into {folder}: {exc.strerror or exc}{where}"


def _private_folder(folder: Path) -> None:
    """Create the cache folder (mode 0o700) if missing; refuse one that others could write into."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        with contextlib.suppress(FileExistsError):
            folder.mkdir(mode=0o700)
        st = os.stat(folder)
    except OSError as exc:
        raise NativeBuildError(_os_message(exc, folder)) from exc
    if not stat.S_ISDIR(st.st_mode):
        raise NativeBuildError(f"the kernel cache {folder} is not a folder: remove it, or set {CACHE_ENV} elsewhere")
    _refuse_if_others_can_write(st, folder, "the kernel cache folder")


def _open_checked(path: Path, what: str) -> tuple[int, os.stat_result]:
    """Open a cache file for reading without following a symlink; refuse anything but a regular file of ours."""
    try:
        fd = os.open(path, os.O_RDONLY | _OPEN)
    except FileNotFoundError as exc:
        raise _Unverified(f"{path.name} is missing") from exc
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NativeBuildError(
                f"{what} {path} is a symbolic link, which the kernel cache never follows: "
                f"delete it, and check who else can write to {path.parent}"
            ) from exc
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NativeBuildError(f"{what} {path} is not a regular file: delete it")
        _refuse_if_others_can_write(st, path, what)
    except BaseException:
        os.close(fd)
        raise
    return fd, st


def _sha256(fd: int) -> str:
    h, offset = hashlib.sha256(), 0
    while chunk := os.pread(fd, 1 << 20, offset):
        h.update(chunk)
        offset += len(chunk)
    return h.hexdigest()


def _open_verified(so: Path, key: str) -> int:
    """An open descriptor of ``so`` whose bytes match the manifest its builder wrote (the caller loads through it
    and keeps it). Raises :class:`_Unverified` for what a rebuild fixes -- mapping a file shorter than its ELF
    headers say kills the process with SIGBUS, so a size or hash mismatch must never reach the loader."""
    fd, st = _open_checked(so, "the kernel library")
    try:
        mfd, _ = _open_checked(manifest_path(so), "the kernel manifest")
        with os.fdopen(mfd, "rb") as f:
            raw = f.read(_MANIFEST_MAX_BYTES + 1)
        try:
            manifest = json.loads(raw)
            digest, size, built_from = str(manifest["sha256"]), int(manifest["size"]), manifest["key"]
        except (ValueError, KeyError, TypeError) as exc:
            raise _Unverified("an unreadable manifest") from exc
        if built_from != key:
            raise _Unverified("a manifest of another build (other source, torch or compiler)")
        if st.st_size != size:
            raise _Unverified(
                f"{st.st_size} bytes where its build wrote {size}: a partial copy or an interrupted write"
            )
        if _sha256(fd) != digest:
            raise _Unverified("content that differs from its build (sha256 mismatch)")
    except BaseException:
        os.close(fd)
        raise
    return fd


# -- building and publishing -------------------------------------------------------------------------------------


@contextlib.contextmanager
def _file_lock(path: Path):
    """An exclusive lock on ``path`` (created 0o600 if missing, never through a symlink: a planted link would
    otherwise make us create a file wherever it points); a no-op where ``fcntl`` does not exist."""
    try:
        import fcntl
    except ImportError:  # not POSIX: builds still land atomically (rename), at worst twice
        yield
        return
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | _OPEN, 0o600)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise NativeBuildError(
                f"the lock file {path} is a symbolic link, which the kernel cache never follows: "
                f"delete it, and check who else can write to {path.parent}"
            ) from exc
        raise NativeBuildError(_os_message(exc, path.parent)) from exc
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise NativeBuildError(f"the lock file {path} is not a regular file: delete it")
        _refuse_if_others_can_write(st, path, "the lock file")
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


def _fsync_dir(folder: Path) -> None:
    """Make the renames durable: without this a power loss can bring back the old names, or none."""
    fd = os.open(folder, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):  # file systems that cannot sync a folder
            raise
    finally:
        os.close(fd)


def _write_temp(folder: Path, stem: str, data: bytes, mode: int) -> str:
    """``data`` in a new temporary file of ``folder`` (created exclusively), fsynced; returns its path."""
    fd, tmp = tempfile.mkstemp(prefix=f"{stem}-", suffix=".tmp", dir=folder)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        os.fchmod(fd, mode)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    os.close(fd)
    return tmp


def _compile_and_publish(so: Path, cxx: str, key: str) -> None:
    """Compile to a temporary name in the cache folder, fsync, rename to ``so``, then publish the manifest the
    same way (a reader that sees the library before its manifest rejects it and waits on the lock); the
    folder is fsynced last. OSErrors propagate for :func:`_build` to put in words."""
    include, lib = _torch_dirs()
    folder = so.parent
    fd, tmp = tempfile.mkstemp(prefix=f"{so.stem}-", suffix=".tmp", dir=folder)
    os.close(fd)
    manifest_tmp = None
    try:
        cmd = [
            cxx,
            *_FLAGS,
            f"-I{include}",
            str(SOURCE),
            "-o",
            tmp,
            f"-L{lib}",
            "-ltorch_cpu",
            "-lc10",
            f"-Wl,-rpath,{lib}",
        ]
        t0 = time.perf_counter()
        print(
            f"modeling_deepseekv3: building the FP8 CPU kernel once for this machine ({so.name}) ...",
            file=sys.stderr,
            flush=True,
        )
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            log = proc.stdout + proc.stderr
            tail = " | ".join(log.strip().splitlines()[-3:])
            if "No space left on device" in log or "Disk quota exceeded" in log:  # transient: no .failed marker
                raise NativeBuildError(
                    f"no space left on device in {folder} (or the compiler's temporary folder): "
                    f"the compiler says {tail}; free some space, or set {CACHE_ENV} to another disk"
                )
            failed = so.with_suffix(".failed")
            os.replace(_write_temp(folder, so.stem, (" ".join(cmd) + "\n\n" + log).encode(), 0o644), failed)
            raise NativeBuildError(f"the FP8 CPU kernel failed to compile ({tail}); log: {failed}")
        fd = os.open(tmp, os.O_RDONLY | _OPEN)  # the linker may have replaced our temp file: check what is there
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise NativeBuildError(f"the compiler left no regular file at {tmp}")
            os.fchmod(fd, 0o755)  # the linker's mode follows the umask (0o775 under umask 002): ours must not
            os.fsync(fd)
            digest, size = _sha256(fd), os.fstat(fd).st_size
        finally:
            os.close(fd)
        manifest = {
            "format": _MANIFEST_FORMAT,
            "library": so.name,
            "sha256": digest,
            "size": size,
            "key": key,
            "torch": torch.__version__,
            "compiler": os.path.realpath(cxx),
            "source": str(SOURCE),
        }
        manifest_tmp = _write_temp(folder, so.stem, (json.dumps(manifest, indent=1) + "\n").encode(), 0o644)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(manifest_path(so))  # never pair the new library with the old manifest, even briefly
        os.replace(tmp, so)
        tmp = None
        os.replace(manifest_tmp, manifest_path(so))
        manifest_tmp = None
        _fsync_dir(folder)
        print(
            f"modeling_deepseekv3: built in {time.perf_counter() - t0:.1f}s (cached in {folder})",
            file=sys.stderr,
            flush=True,
        )
    finally:
        for leftover in (tmp, manifest_tmp):  # the linker deletes its output on failure: missing is fine
            if leftover is not None:
                with contextlib.suppress(OSError):
                    os.unlink(leftover)


def _build(so: Path, cxx: str, key: str) -> int:
    """(Re)build ``so`` under the file lock and return a verified descriptor of it. Called once per process at
    most: if the fresh build does not verify either, that is an error, not a loop."""
    with _file_lock(so.with_suffix(".lock")):
        try:
            return _open_verified(so, key)  # another process built it while we waited
        except _Unverified as exc:
            why = str(exc)
        failed = so.with_suffix(".failed")
        if failed.exists():
            raise NativeBuildError(
                f"an earlier build of the FP8 CPU kernel failed (log: {failed}); fix the compiler and delete that "
                "file to retry."
            )
        if os.path.lexists(so):
            print(
                f"modeling_deepseekv3: the cached FP8 CPU kernel {so} was rejected ({why}); rebuilding it",
                file=sys.stderr,
                flush=True,
            )
        try:
            _compile_and_publish(so, cxx, key)
        except OSError as exc:
            raise NativeBuildError(_os_message(exc, so.parent)) from exc
        try:
            return _open_verified(so, key)
        except _Unverified as exc:
            raise NativeBuildError(
                f"the FP8 CPU kernel just built at {so} fails its own check ({exc}); delete it "
                f"and {manifest_path(so).name} and retry"
            ) from exc


# -- loading -----------------------------------------------------------------------------------------------------


def _dlopen(fd: int, so: Path):
    """Load the library through the descriptor its bytes were hashed from (``/proc/self/fd``, where it exists),
    so that what runs is what was verified, and check its entry points before anything calls them. RTLD_GLOBAL,
    as ``torch.ops.load_library`` does (which cannot be used here: it resolves the path back to the file name)."""
    via_fd = f"/proc/self/fd/{fd}"
    target = via_fd if os.path.exists(via_fd) else str(so)
    fix = f"delete it and {manifest_path(so).name} so that it is rebuilt"
    try:
        lib = ctypes.CDLL(target, mode=ctypes.RTLD_GLOBAL)
    except OSError as exc:
        raise NativeBuildError(f"{so} matches its manifest but the loader refused it ({exc}); {fix}") from exc
    torch.ops.loaded_libraries.add(str(so))
    try:
        isa_mask = getattr(lib, _SYMBOL)
    except AttributeError as exc:
        raise NativeBuildError(f"{so} has no {_SYMBOL} entry point (built from another source?); {fix}") from exc
    missing = [op for op in _OPS if not hasattr(torch.ops.deepseekv3_fp8, op)]
    if missing:
        raise NativeBuildError(
            f"{so} registers no deepseekv3_fp8::{', '.join(missing)} op (built from another source?); {fix}"
        )
    isa_mask.restype, isa_mask.argtypes = ctypes.c_int64, []
    return isa_mask


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

    @torch.library.register_fake("deepseekv3_fp8::dense_linear")
    def _(x, weight, isa):
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("deepseekv3_fp8::experts")
    def _(x, counts, weights, scales, block_m, block_n, max_stream_rows, isa):
        return x.new_empty(x.shape[0], weights[2].shape[0] if weights else x.shape[1])


def _load() -> None:
    forced = os.environ.get("DEEPSEEKV3_FP8_ISA", "auto").strip().lower()
    if forced in ("off", "none", "0", "torch"):
        raise NativeBuildError("disabled by DEEPSEEKV3_FP8_ISA=off")
    if forced not in ("auto", *ISAS):
        raise NativeBuildError(f"DEEPSEEKV3_FP8_ISA must be auto, {', '.join(ISAS)} or off, got {forced!r}")
    if platform.machine().lower() not in _X86:
        raise NativeBuildError(f"no kernel for {platform.machine()} CPUs (x86-64 with AVX2 only)")
    cxx = _compiler()
    if cxx is None:
        raise NativeBuildError("no C++ compiler found (install g++ or clang++, or set CXX)")
    key = _build_key(cxx)
    so = _library_for(key)
    _private_folder(so.parent)
    try:
        fd = _open_verified(so, key)
    except _Unverified:
        fd = _build(so, cxx, key)
    _state["fd"] = fd  # kept open: the loaded library's name refers to it
    mask = int(_dlopen(fd, so)())
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
    thread-safe. On failure warns once (one line, saying why and that the torch path is used instead),
    remembers the failure for the process (no retry on later calls) and returns False, or raises
    :class:`NativeBuildError` with ``strict=True``."""
    if "ops" in _state:
        return True
    if "error" not in _state:
        with _lock:
            if "ops" not in _state and "error" not in _state:
                try:
                    _load()
                except Exception as exc:  # whatever goes wrong with native code here, the torch path still works
                    _state["error"] = exc
                    warnings.warn(
                        f"modeling_deepseekv3: native FP8 CPU kernel unavailable ({exc}); FP8 linears on CPU use "
                        "the slower torch path (dequantize, then matmul). Results agree within float rounding "
                        "(in bf16, greedy tokens can differ at near-ties).",
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


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size,
    *,
    max_stream_rows: int = STREAM_MAX_ROWS,
    _isa: str | None = None,
) -> torch.Tensor:
    """``x [T, N] @ dequant(weight [M, N], scale_inv).T -> [T, M]`` in ``x``'s dtype (float32 or bfloat16).
    Rows ``<= max_stream_rows`` stream the FP8 weight; more use chunked dequantization + BLAS. Needs
    :func:`available`."""
    bm, bn = _blocks(block_size)
    return _state["ops"].linear(x, weight, scale_inv, bm, bn, int(max_stream_rows), _isa_code(_isa))


def head_matmul(
    x: torch.Tensor,
    weight: torch.Tensor,
    scale_inv: torch.Tensor,
    block_size,
    row_stride: int,
    row_offset: int,
    rows: int,
    transpose: bool,
    *,
    blas_min_rows: int = HEAD_BLAS_MIN_ROWS,
    _isa: str | None = None,
) -> torch.Tensor:
    """Per-group products with row ranges of one FP8 weight; group ``g`` uses rows
    ``g * row_stride + row_offset + [0, rows)`` (``W_g [rows, N]``). ``transpose=False``:
    ``x [G, T, N] @ W_g.T -> [G, T, rows]``; ``transpose=True``: ``x [G, T, rows] @ W_g -> [G, T, N]``.
    The absorbed MLA's ``W_UV`` and ``W_UK`` products on ``kv_b_proj`` (group = head). From
    ``blas_min_rows`` rows on, each group's rows are dequantized once and multiplied by BLAS."""
    bm, bn = _blocks(block_size)
    return _state["ops"].head_matmul(
        x,
        weight,
        scale_inv,
        bm,
        bn,
        int(row_stride),
        int(row_offset),
        int(rows),
        bool(transpose),
        int(blas_min_rows),
        _isa_code(_isa),
    )


def dense_linear(x: torch.Tensor, weight: torch.Tensor, *, _isa: str | None = None) -> torch.Tensor:
    """``x [T, N] @ weight [M, N].T -> [T, M]`` in ``x``'s dtype for a bfloat16 or float32 ``weight`` (contiguous),
    fp32 products and sums, the weight streamed once per 2-4 input rows: a decode step's output head, which torch
    multiplies at about half the read bandwidth. Few rows only (decode); the caller sends more to BLAS."""
    return _state["ops"].dense_linear(x, weight, _isa_code(_isa))


def experts(
    x: torch.Tensor,
    counts: list[int],
    weights: list[torch.Tensor],
    scales: list[torch.Tensor],
    block_size,
    *,
    max_stream_rows: int = STREAM_MAX_ROWS,
    _isa: str | None = None,
) -> torch.Tensor:
    """The routed experts of one MoE layer on ``x [A, D]``, rows sorted by expert: ``counts[e]`` rows for the
    ``e``-th expert given, whose ``(gate, up, down)`` FP8 weights are ``weights[3e : 3e + 3]`` (scales alike). Each
    expert's rows become ``down(silu(gate(x)) * up(x))`` -> ``[A, D]``: three :func:`linear` products, torch's silu
    and product between them (bit-identical to calling them one by one), in one call."""
    bm, bn = _blocks(block_size)
    return _state["ops"].experts(x, counts, weights, scales, bm, bn, int(max_stream_rows), _isa_code(_isa))


def dequantize(weight: torch.Tensor, scale_inv: torch.Tensor, block_size, *, _isa: str | None = None) -> torch.Tensor:
    """The dense float32 weight, bit-identical to :func:`~.format.block_dequantize` (one rounding of
    ``float(code) * scale``), at memory speed."""
    bm, bn = _blocks(block_size)
    return _state["ops"].dequantize(weight, scale_inv, bm, bn, _isa_code(_isa))
