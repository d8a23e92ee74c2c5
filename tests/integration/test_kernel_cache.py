"""The native kernel's cache (fp8/native.py) against damaged and planted files: issue 23, "no unverified native code".

Each case is a real cache folder and a real child process that loads the kernel and runs an FP8 linear through
whatever path it ends up on; the child must exit 0 with the reference's answer. The real kernel is compiled once
per module, by a stand-in compiler that passes through to the system one; afterwards the stand-in "builds" by
copying that library (``FAKE_CXX_COPY``), so a rebuild costs nothing, and it logs each call so that the tests can
count builds. Only the test marked ``slow`` compiles again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

if sys.platform != "linux" or platform.machine().lower() not in {"x86_64", "amd64"}:
    pytest.skip("the native FP8 kernel is built on x86-64 Linux only", allow_module_level=True)
REAL_CXX = next((p for n in (os.environ.get("CXX"), "c++", "g++", "clang++") if n and (p := shutil.which(n))), None)
if REAL_CXX is None:
    pytest.skip("no C++ compiler", allow_module_level=True)

STAND_IN = """#!/bin/sh
# The system compiler, or a stand-in build: FAKE_CXX_COPY copies that library to the -o path, FAKE_CXX_FAIL prints
# its text and fails. Every call appends a line to FAKE_CXX_LOG.
[ -n "$FAKE_CXX_LOG" ] && echo call >> "$FAKE_CXX_LOG"
if [ -n "$FAKE_CXX_FAIL" ]; then echo "$FAKE_CXX_FAIL" >&2; exit 1; fi
if [ -n "$FAKE_CXX_COPY" ]; then
  while [ $# -gt 0 ]; do
    if [ "$1" = "-o" ]; then exec cp "$FAKE_CXX_COPY" "$2"; fi
    shift
  done
  exit 2
fi
exec {real} "$@"
"""

# What every child runs after its prelude: FP8 linears (three calls) and two availability checks, the outputs
# against the dequantize reference, and one JSON line: whether the kernel loaded, the warnings it gave, and
# what the prelude recorded.
PROBE = """
import json, warnings
import torch, torch.nn.functional as F
from modeling_deepseekv3.fp8 import FP8Linear, block_dequantize, native
layer = FP8Linear(160, 176)
layer.set_dense_weight(torch.randn(176, 160))
x = torch.randn(3, 160)
with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    with torch.no_grad():
        outs = [layer(x) for _ in range(3)]
    native.available(), native.available()
expected = F.linear(x, block_dequantize(layer.weight, layer.weight_scale_inv))
for out in outs:
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
notes = [str(w.message) for w in caught if "kernel unavailable" in str(w.message)]
print(json.dumps({"native": "ops" in native._state, "notes": notes, "recorded": globals().get("recorded")}))
"""


@dataclasses.dataclass
class Built:
    cxx: Path  # the stand-in compiler (its path and stat are part of the library's name)
    so: Path  # a good library and its manifest, as the builder published them
    manifest: Path


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> Built:
    root = tmp_path_factory.mktemp("kernel")
    cxx = root / "cxx"
    cxx.write_text(STAND_IN.format(real=REAL_CXX))
    cxx.chmod(0o755)
    code = "from modeling_deepseekv3.fp8 import native; native.load(strict=True); print(native._state['path'])"
    out = subprocess.run(
        [sys.executable, "-c", code],
        env=child_env(CXX=str(cxx), DEEPSEEKV3_CACHE_DIR=str(root / "good")),
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    so = Path(out.stdout.strip().splitlines()[-1])
    return Built(cxx, so, so.with_suffix(".json"))


def child_env(**extra: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("FAKE_CXX") and k != "DEEPSEEKV3_FP8_ISA"}
    env.update({k: v for k, v in extra.items() if v is not None})
    return env


def seeded(tmp_path: Path, built: Built, *, library: bool = True, manifest: bool = True) -> Path:
    """A private cache folder holding copies of the good library and/or its manifest."""
    cache = tmp_path / "cache"
    cache.mkdir(mode=0o700)
    if library:
        shutil.copy(built.so, cache / built.so.name)
    if manifest:
        shutil.copy(built.manifest, cache / built.manifest.name)
    return cache


def probe(cache: Path, built: Built, tmp_path: Path, prelude: str = "", **env: str | None) -> dict:
    """Run PROBE in a child on ``cache``; by default a rebuild copies the good library. Returns its JSON line plus
    its stderr and the number of compiler calls so far (logged per test)."""
    log = tmp_path / "cxx.log"
    settings = {
        "CXX": str(built.cxx),
        "DEEPSEEKV3_CACHE_DIR": str(cache),
        "FAKE_CXX_LOG": str(log),
        "FAKE_CXX_COPY": str(built.so),
        **env,
    }
    proc = subprocess.run(
        [sys.executable, "-c", prelude + PROBE], env=child_env(**settings), capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    result["stderr"] = proc.stderr
    result["builds"] = len(log.read_text().splitlines()) if log.exists() else 0
    return result


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_verifies(so: Path) -> None:
    manifest = json.loads(so.with_suffix(".json").read_text())
    assert manifest["sha256"] == sha256(so) and manifest["size"] == so.stat().st_size


def the_note(result: dict) -> str:
    """The single warning of a child that fell back to the torch path (one, however often it called)."""
    assert not result["native"] and len(result["notes"]) == 1, result["notes"]
    return result["notes"][0]


def test_a_verified_library_loads_without_a_build(tmp_path, built):
    assert_verifies(built.so)
    r = probe(seeded(tmp_path, built), built, tmp_path)
    assert r["native"] and not r["notes"] and r["builds"] == 0


def test_a_build_is_fsynced_then_published_with_its_manifest(tmp_path, built):
    """The library and the manifest are fsynced under temporary names in the cache folder, the folder after the
    renames, and nothing temporary is left."""
    prelude = (
        "import os\nrecorded = []\n_fsync = os.fsync\n"
        "def _recording(fd):\n    recorded.append(os.readlink(f'/proc/self/fd/{fd}'))\n    return _fsync(fd)\n"
        "os.fsync = _recording\n"
    )
    cache = seeded(tmp_path, built, library=False, manifest=False)
    r = probe(cache, built, tmp_path, prelude)
    assert r["native"] and not r["notes"] and r["builds"] == 1
    temps = [p for p in r["recorded"] if p.startswith(str(cache) + "/") and p.endswith(".tmp")]
    assert len(temps) == 2 and r["recorded"][-1] == str(cache), r["recorded"]
    so = cache / built.so.name
    assert_verifies(so)
    assert sorted(p.name for p in cache.iterdir()) == sorted([so.name, built.manifest.name, so.stem + ".lock"])
    assert so.stat().st_mode & 0o777 == 0o755


DAMAGE = {  # what is done to the cached pair -> the reason the loader gives before rebuilding
    "truncated": "partial copy",
    "same_size_tamper": "sha256 mismatch",
    "no_manifest": ".json is missing",
    "manifest_of_another_build": "another build",
    "garbled_manifest": "unreadable manifest",
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_entry_is_rebuilt_once_and_never_loaded(tmp_path, built, damage):
    """Before: a truncated library killed every process with SIGBUS, and any bytes at the name were loaded. Now
    the child says why it rejects the file, rebuilds once, and loads only the verified rebuild."""
    cache = seeded(tmp_path, built)
    so, manifest = cache / built.so.name, cache / built.manifest.name
    good = so.read_bytes()
    if damage == "truncated":
        so.write_bytes(good[: len(good) // 2])
    elif damage == "same_size_tamper":
        mid = len(good) // 2
        so.write_bytes(good[:mid] + bytes(b ^ 0x5A for b in good[mid : mid + 64]) + good[mid + 64 :])
    elif damage == "no_manifest":
        manifest.unlink()
    elif damage == "manifest_of_another_build":
        manifest.write_text(json.dumps({**json.loads(manifest.read_text()), "key": "0" * 64}))
    else:
        manifest.write_text('{"sha256": ')
    r = probe(cache, built, tmp_path)
    assert r["native"] and not r["notes"] and r["builds"] == 1
    assert "was rejected" in r["stderr"] and DAMAGE[damage] in r["stderr"] and "rebuilding" in r["stderr"]
    assert so.read_bytes() == good
    assert_verifies(so)
    if damage == "truncated":  # and the next process just loads it
        again = probe(cache, built, tmp_path)
        assert again["native"] and again["builds"] == 1 and "rebuilding" not in again["stderr"]


def test_a_library_without_the_entry_point_is_refused_once(tmp_path, built):
    """A valid ELF that matches its manifest but is not our kernel: refused right after loading with one line
    naming the file (before: AttributeError at the first forward, again on every call); no rebuild loop."""
    src = tmp_path / "other.cpp"
    src.write_text('extern "C" int some_other_entry_point() { return 7; }\n')
    other = tmp_path / "other.so"
    subprocess.run([REAL_CXX, "-shared", "-fPIC", str(src), "-o", str(other)], check=True, timeout=120)
    cache = seeded(tmp_path, built, library=False)
    so, manifest = cache / built.so.name, cache / built.manifest.name
    shutil.copy(other, so)
    manifest.write_text(
        json.dumps({**json.loads(manifest.read_text()), "sha256": sha256(so), "size": so.stat().st_size})
    )
    r = probe(cache, built, tmp_path)
    note = the_note(r)
    assert "deepseekv3_fp8_isa_mask" in note and str(so) in note and "delete it" in note
    assert r["builds"] == 0


@pytest.mark.parametrize("what", ["folder", "library", "manifest"])
@pytest.mark.parametrize("problem", ["writable_by_others", "owned_by_another_user"])
def test_a_cache_others_can_write_is_refused(tmp_path, built, what, problem):
    """Before: a library planted in a shared cache ran as the victim. Now the folder and its files must be the
    user's and writable by nobody else; else nothing is loaded or built, and the note names the path and the fix."""
    cache = seeded(tmp_path, built)
    path = {"folder": cache, "library": cache / built.so.name, "manifest": cache / built.manifest.name}[what]
    if problem == "writable_by_others":
        path.chmod(0o777 if what == "folder" else 0o666)
        fix = f"chmod go-w {path}"
    else:
        if os.geteuid() != 0:
            pytest.skip("giving a file to another user needs root")
        os.chown(path, 65534, 65534)
        fix = "belongs to uid 65534"
    r = probe(cache, built, tmp_path)
    note = the_note(r)
    assert str(path) in note and fix in note and "DEEPSEEKV3_CACHE_DIR" in note
    assert r["builds"] == 0


@pytest.mark.parametrize("link", ["lock", "library"])
def test_a_symlink_in_the_cache_is_never_followed(tmp_path, built, link):
    """Before: a planted ``.lock`` symlink made the victim create the file it pointed to. Now: O_NOFOLLOW, and a
    refusal naming the link; the target is neither created nor loaded."""
    cache = seeded(tmp_path, built, library=False, manifest=link == "library")  # no library: a build takes the lock
    name = built.so.with_suffix(".lock").name if link == "lock" else built.so.name
    target = tmp_path / "target" if link == "lock" else built.so
    (cache / name).symlink_to(target)
    r = probe(cache, built, tmp_path)
    note = the_note(r)
    assert "symbolic link" in note and str(cache / name) in note
    assert r["builds"] == 0
    if link == "lock":
        assert not target.exists()


def test_a_full_disk_during_the_compile_is_named_and_not_marked_failed(tmp_path, built):
    """The linker runs out of space: the note says so (before: "No such file", from removing the output the
    linker had already deleted), with no ``.failed`` marker -- a full disk is not a broken compiler, the next
    process tries again -- and this process does not try again."""
    cache = seeded(tmp_path, built, library=False, manifest=False)
    r = probe(cache, built, tmp_path, FAKE_CXX_FAIL="/usr/bin/ld: final link failed: No space left on device")
    note = the_note(r)
    assert f"no space left on device in {cache}" in note and "No such file" not in note
    assert r["builds"] == 1
    assert [p.name for p in cache.iterdir()] == [built.so.with_suffix(".lock").name]


def test_a_full_disk_while_publishing_is_named_and_leaves_nothing(tmp_path, built):
    prelude = (
        "import errno, os\n"
        "def _full(fd):\n    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))\n"
        "os.fsync = _full\n"
    )
    cache = seeded(tmp_path, built, library=False, manifest=False)
    r = probe(cache, built, tmp_path, prelude)
    note = the_note(r)
    assert f"no space left on device in {cache}" in note
    assert r["builds"] == 1
    assert [p.name for p in cache.iterdir()] == [built.so.with_suffix(".lock").name]


@pytest.mark.slow
def test_a_truncated_library_is_rebuilt_by_the_real_compiler(tmp_path, built):
    cache = seeded(tmp_path, built)
    so = cache / built.so.name
    so.write_bytes(so.read_bytes()[:4096])
    r = probe(cache, built, tmp_path, FAKE_CXX_COPY=None)
    assert r["native"] and not r["notes"] and r["builds"] == 1 and "rebuilding" in r["stderr"]
    assert_verifies(so)
