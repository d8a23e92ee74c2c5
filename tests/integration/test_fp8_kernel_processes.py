"""The native FP8 CPU kernel in fresh processes (slow: each starts Python and torch, some compile the kernel): the
first FP8 matmul being compiled loads the library, a CPU without the SIMD variants gets the torch path (a real build
with them left out), ``DEEPSEEKV3_FP8_ISA=off``, and two processes building into one fresh cache. The in-process
twins of the fallbacks: tests/unit/test_fp8_kernel.py; damaged and planted cache files: test_kernel_cache.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from modeling_deepseekv3.fp8 import native

if not native.load():
    pytest.skip(f"native FP8 kernel unavailable here: {native._state.get('error')}", allow_module_level=True)


@pytest.mark.slow
def test_first_call_inside_torch_compile_loads_the_library():
    """A fresh process whose first FP8 matmul is being compiled: loading runs eagerly (a graph break), then
    the compiled graph uses the op; same result as eager."""
    code = (
        "import torch; from modeling_deepseekv3.fp8 import FP8Linear, native;"
        "assert 'ops' not in native._state;"
        "layer = FP8Linear(160, 176); layer.set_dense_weight(torch.randn(176, 160)); x = torch.randn(3, 160);"
        "c = torch.compile(layer)(x.requires_grad_(False));"
        "assert 'ops' in native._state; torch.testing.assert_close(c, layer(x), rtol=1e-5, atol=1e-5); print('ok')"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.slow
def test_a_cpu_without_the_kernels_gets_the_torch_path_and_one_notice(tmp_path):
    """What a CPU without AVX2 (or not x86) sees: the library is built as it is there (no SIMD variant),
    says so once, and FP8 linears compute on the torch path with the reference's answer."""
    cxx = tmp_path / "cxx-no-simd"
    cxx.write_text(f'#!/bin/sh\nexec {shutil.which("c++") or shutil.which("g++")} -DDSV3_NO_SIMD "$@"\n')
    cxx.chmod(0o755)
    code = (
        "import warnings, torch, torch.nn.functional as F\n"
        "from modeling_deepseekv3.fp8 import FP8Linear, block_dequantize\n"
        "layer = FP8Linear(160, 176); layer.set_dense_weight(torch.randn(176, 160)); x = torch.randn(3, 160)\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always'); out = layer(x); layer(x)\n"
        "notes = [str(w.message) for w in caught if 'FP8 CPU kernel unavailable' in str(w.message)]\n"
        "assert len(notes) == 1 and 'no AVX2' in notes[0], notes\n"
        "torch.testing.assert_close(out, F.linear(x, block_dequantize(layer.weight, layer.weight_scale_inv)))\n"
        "print('ok')\n"
    )
    env = dict(os.environ, CXX=str(cxx), DEEPSEEKV3_CACHE_DIR=str(tmp_path / "cache"))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr[-2000:]


@pytest.mark.slow
def test_isa_environment_variable_can_turn_the_kernel_off():
    code = (
        "import warnings, torch; warnings.simplefilter('ignore');"
        "from modeling_deepseekv3.fp8 import native; print(native.available())"
    )
    env = dict(os.environ, DEEPSEEKV3_FP8_ISA="off")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.slow
def test_two_processes_build_one_library(tmp_path):
    """A fresh cache dir, two processes starting at once: the file lock makes one build and the other wait and
    load it; both then compute correctly."""
    code = (
        "import torch; from modeling_deepseekv3.fp8 import native, block_quantize;"
        "from modeling_deepseekv3.fp8.reference import fp8_matmul_reference;"
        "native.load(strict=True); q, s = block_quantize(torch.randn(130, 200)); x = torch.randn(2, 200);"
        "d = (native.linear(x, q, s, (128, 128)) - fp8_matmul_reference(x, q, s, (128, 128))).abs().max();"
        "assert d < 1e-4, d; print('ok')"
    )
    env = dict(os.environ, DEEPSEEKV3_CACHE_DIR=str(tmp_path))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(2)
    ]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert all(out.strip() == "ok" for out, _ in results)
    assert sum("building the FP8 CPU kernel" in err for _, err in results) == 1
    assert len(list(tmp_path.glob("*.so"))) == 1 and not list(tmp_path.glob("*.tmp"))
