"""The native FP8 CPU kernels (fp8/native.py, fp8/csrc/fp8_cpu.cpp) against their reference twins.

Every ISA variant this CPU can run is tested (``_isa`` forces one; AVX-512 machines test the AVX2 path too),
on both shapes of work (streaming the weight and chunked dequantization + BLAS), on shapes with partial
128-blocks, 1-300 rows, float32 and bfloat16 inputs, ue8m0 scales, non-contiguous inputs and NaN/Inf.
fp32 results must match the spec formula to fp32 rounding (relative 1e-5); bf16 results may differ from
the exactly rounded fp32 result by the bf16 rounding only.
"""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch
import torch.nn.functional as F

from modeling_deepseekv3.fp8 import FP8_DTYPE, FP8Linear, block_dequantize, block_quantize, native
from modeling_deepseekv3.fp8.kernels import fp8_head_matmul_reference, fp8_matmul_reference

if not native.load():
    pytest.skip(f"native FP8 kernel unavailable here: {native._state.get('error')}", allow_module_level=True)

ISAS = list(native.ISAS)  # every variant the library has; those this CPU lacks skip
SHAPES = {  # (M, N), block
    "partial_both": ((176, 160), (128, 128)),
    "kv_a_576": ((576, 300), (128, 128)),
    "aligned": ((256, 384), (128, 128)),
    "tiny_blocks": ((40, 64), (16, 16)),
    "odd": ((7, 5), (4, 2)),
}


def need(isa):
    if isa not in native.supported_isas():
        pytest.skip(f"this CPU has no {isa}")


def quantized(shape, block, scale_fmt=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * torch.logspace(-2, 1, shape[1])  # blocks with very different scales
    return block_quantize(w, block, scale_fmt)


def rel_err(a, b):
    return ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp(min=1e-30)).item()


def assert_matches(out, x, q, s, block, exact=None):
    """fp32: relative 1e-5 to the spec formula. bf16: within the bf16 rounding of the exact fp32 result."""
    exact = fp8_matmul_reference(x.float(), q, s, block) if exact is None else exact
    assert out.dtype == x.dtype and out.shape == exact.shape
    if x.dtype == torch.float32:
        assert rel_err(out, exact) <= 1e-5
    else:
        bound = exact.abs() * 2**-8 + 1e-5 * exact.abs().max()
        assert bool(((out.float() - exact).abs() <= bound).all())
        assert rel_err(out, exact.to(torch.bfloat16)) <= 2**-7  # the bf16 reference rounds the same result


@functools.lru_cache(maxsize=16)
def linear_case(shape: str, rows: int, dtype: torch.dtype):
    """Weights, input and the exact fp32 result of one case, shared by the ISA/path variants."""
    (m, n), block = SHAPES[shape]
    q, s = quantized((m, n), block)
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(rows)).to(dtype)
    return x, q, s, block, fp8_matmul_reference(x.float(), q, s, block)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("path", ["stream", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("rows", [1, 3, 4, 5, 17, 64, 300])
def test_linear_equals_the_reference(isa, path, dtype, shape, rows):
    need(isa)
    x, q, s, block, exact = linear_case(shape, rows, dtype)
    max_stream = 10**6 if path == "stream" else 0
    assert_matches(native.linear(x, q, s, block, max_stream_rows=max_stream, _isa=isa), x, q, s, block, exact)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("path", ["stream", "chunked"])
def test_linear_with_ue8m0_scales(isa, path):
    need(isa)
    q, s = quantized((576, 300), (128, 128), "ue8m0")
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    x = torch.randn(6, 300)
    assert_matches(native.linear(x, q, s, (128, 128), max_stream_rows=10**6 if path == "stream" else 0, _isa=isa),
                   x, q, s, (128, 128))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("path", ["stream", "chunked"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_linear_on_non_contiguous_inputs(isa, path, dtype):
    need(isa)
    q, s = quantized((176, 160), (128, 128))
    max_stream = 10**6 if path == "stream" else 0
    wide = torch.randn(5, 320).to(dtype)
    for x in (wide[:, ::2], torch.randn(160, 5).to(dtype).t(), wide[1:4, 7:167]):
        assert not x.is_contiguous()
        assert_matches(native.linear(x, q, s, (128, 128), max_stream_rows=max_stream, _isa=isa), x, q, s, (128, 128))


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("path", ["stream", "chunked"])
def test_nan_and_inf_propagate_as_in_the_reference(isa, path):
    need(isa)
    q, s = quantized((176, 160), (128, 128))
    q.view(torch.uint8)[3, 150] = 0x7F  # the e4m3fn NaN code, in a weight row
    q.view(torch.uint8)[100, 5] = 0xFF  # and its negative twin
    x = torch.randn(6, 160)
    x[1, 10] = float("nan")
    x[2, 20] = float("inf")
    x[3, 30] = float("-inf")
    x[4, 40] = float("inf")
    x[4, 41] = float("-inf")
    out = native.linear(x, q, s, (128, 128), max_stream_rows=10**6 if path == "stream" else 0, _isa=isa)
    ref = fp8_matmul_reference(x, q, s, (128, 128))
    assert torch.isnan(ref).any() and torch.isinf(ref).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isposinf(out), torch.isposinf(ref)) and torch.equal(torch.isneginf(out), torch.isneginf(ref))
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-5, atol=1e-5 * ref[finite].abs().max().item())


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_dequantize_is_bit_identical_to_block_dequantize(isa, shape):
    need(isa)
    (m, n), block = SHAPES[shape]
    q, s = quantized((m, n), block)
    q.view(torch.uint8)[0, 0] = 0x7F  # NaN code: NaN, as float(code) * scale gives
    q.view(torch.uint8)[m - 1, n - 1] = 0x01  # smallest subnormal code
    out = native.dequantize(q, s, block, _isa=isa)
    ref = block_dequantize(q, s, block)
    nan = torch.isnan(ref)
    assert nan.sum() == 1 and torch.equal(torch.isnan(out), nan)  # (NaN payloads may differ)
    assert torch.equal(out[~nan].view(torch.int32), ref[~nan].view(torch.int32))


HEADS = {  # heads, nope, v, rank, block
    "v3_dims": (3, 128, 128, 512, (128, 128)),
    "tiny_partial": (4, 32, 32, 160, (128, 128)),
    "blocks_cross_heads": (5, 40, 24, 130, (16, 16)),
    "odd": (2, 7, 5, 9, (4, 2)),
}


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("path", ["kernels", "blas"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", list(HEADS), ids=list(HEADS))
@pytest.mark.parametrize("rows", [1, 2, 5, 9, 40])
def test_head_matmul_equals_the_reference(isa, path, dtype, heads, rows):
    """The absorbed MLA's two kv_b products per head: q_nope @ W_UK (transpose) and o_latent @ W_UV^T."""
    need(isa)
    blas = {"blas_min_rows": 0 if path == "blas" else 10**6}
    h, nope, v, r, block = HEADS[heads]
    q, s = quantized((h * (nope + v), r), block)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    for x, offset, n_rows, transpose in ((torch.randn(h, rows, nope), 0, nope, True),
                                         (torch.randn(h, rows, r), nope, v, False)):
        x = x.to(dtype)
        out = native.head_matmul(x, q, s, block, nope + v, offset, n_rows, transpose, _isa=isa, **blas)
        ref = fp8_head_matmul_reference(x, q, s, block, nope + v, offset, n_rows, transpose)
        assert out.dtype == dtype and out.shape == ref.shape
        assert rel_err(out, fp8_head_matmul_reference(x.float(), q, s, block, nope + v, offset, n_rows, transpose)) <= tol
        # strided input (as the attention hands it over: heads moved to the front)
        xs = x.transpose(0, 1).contiguous().transpose(0, 1)
        torch.testing.assert_close(native.head_matmul(xs, q, s, block, nope + v, offset, n_rows, transpose, _isa=isa,
                                                      **blas), out)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fp8_kv_b_absorbed_path_runs_on_the_head_kernels_and_keeps_no_dense_copy(monkeypatch, dtype):
    """The absorbed kv_b_proj reads the FP8 weight through the head kernels (no dense copy kept), equals the
    dequantize-per-call reference, and follows a weight change (a LoRA merge requantizes in place)."""
    from modeling_deepseekv3.core.attention import KVBFP8Linear

    calls = []
    real = native.head_matmul
    monkeypatch.setattr(native, "head_matmul", lambda *a, **k: calls.append(a[7]) or real(*a, **k))
    layer, ref = KVBFP8Linear(160, 4 * 64), KVBFP8Linear(160, 4 * 64, compute="dequant")
    for m in (layer, ref):
        m.configure_heads(4, 32, 32)
    x = torch.randn(2, 4, 3, 32).to(dtype)

    def attend(q_latent):  # any map of the latent query: here a fixed mix of its channels
        return torch.roll(q_latent, 7, dims=-1) * 0.5 + q_latent

    outs = []
    for seed in (0, 1):
        layer.set_dense_weight(torch.randn(256, 160, generator=torch.Generator().manual_seed(seed)))
        ref.load_state_dict(layer.state_dict())
        with torch.no_grad():
            out, expected = layer(x, latent_attention=attend), ref(x, latent_attention=attend)
        assert out.shape == (2, 4, 3, 32) and out.dtype == dtype
        tol = 1e-5 if dtype == torch.float32 else 2e-2
        torch.testing.assert_close(out.float(), expected.float(), rtol=tol, atol=tol * expected.abs().max().item())
        outs.append(out)
    assert calls == [True, False, True, False]  # W_UK (a contraction over rows), then W_UV, per call
    assert (outs[0] - outs[1]).abs().max() > 0.1  # the new weight is in effect
    assert not any(isinstance(v, torch.Tensor) and v.dtype != FP8_DTYPE and v.numel() >= 256 * 160
                   for v in vars(layer).values())  # no dense copy hangs off the module


def test_head_matmul_rejects_rows_past_the_weight():
    q, s = quantized((64, 32), (16, 16))
    with pytest.raises(RuntimeError, match="run past"):
        native.head_matmul(torch.randn(3, 1, 32), q, s, (16, 16), 32, 16, 32, False)


def test_bad_isa_name_is_refused():
    q, s = quantized((16, 16), (16, 16))
    with pytest.raises(ValueError, match="isa must be one of"):
        native.linear(torch.randn(1, 16), q, s, (16, 16), _isa="neon")


def test_op_rejects_a_mis_shaped_scale_grid():
    q, s = quantized((176, 160), (128, 128))
    with pytest.raises(RuntimeError, match=r"scale_inv must have shape .* = \[2, 2\]"):
        native.linear(torch.randn(1, 160), q, s[:1], (128, 128))


def test_fp8_linear_auto_uses_the_native_kernel(monkeypatch):
    calls = []
    real = native.linear
    monkeypatch.setattr(native, "linear", lambda *a, **k: calls.append(a[0].shape) or real(*a, **k))
    layer = FP8Linear(160, 176, bias=True)
    layer.set_dense_weight(torch.randn(176, 160))
    torch.nn.init.normal_(layer.bias)
    x = torch.randn(2, 3, 160)
    with torch.no_grad():
        out = layer(x)
    assert calls == [torch.Size([6, 160])]
    expected = F.linear(x, block_dequantize(layer.weight, layer.weight_scale_inv), layer.bias)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    layer.compute = "dequant"
    with torch.no_grad():
        layer(x)
    assert len(calls) == 1  # the reference twin never takes the kernel


def test_ops_work_on_meta_tensors():
    x = torch.empty(3, 160, device="meta")
    w = torch.empty(176, 160, dtype=FP8_DTYPE, device="meta")
    s = torch.empty(2, 2, device="meta")
    assert torch.ops.deepseekv3_fp8.linear(x, w, s, 128, 128, 16, 0).shape == (3, 176)
    xh = torch.empty(4, 2, 8, device="meta")
    assert torch.ops.deepseekv3_fp8.head_matmul(xh, w, s, 128, 128, 40, 0, 8, True, 32, 0).shape == (4, 2, 160)
    assert torch.ops.deepseekv3_fp8.dequantize(w, s, 128, 128, 0).dtype == torch.float32


def test_composes_with_torch_compile():
    layer = FP8Linear(160, 176)
    layer.set_dense_weight(torch.randn(176, 160))
    x = torch.randn(2, 5, 160)
    with torch.no_grad():
        eager = layer(x)
        compiled = torch.compile(layer, fullgraph=True)(x)
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dequantized_weight_is_native_and_identical_to_block_dequantize(monkeypatch, dtype):
    calls = []
    real = native.dequantize
    monkeypatch.setattr(native, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    layer = FP8Linear(300, 576)
    layer.set_dense_weight(torch.randn(576, 300))
    out = layer.dequantized_weight(dtype)
    assert calls == [1] and out.dtype == dtype
    assert torch.equal(out, block_dequantize(layer.weight, layer.weight_scale_inv, layer.block_size, dtype))


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


# -- packaging: fallback without a compiler, failed builds, concurrent builds ----------------------------------


def test_no_compiler_warns_once_and_falls_back(monkeypatch, tmp_path):
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setattr(native, "_compiler", lambda: None)
    monkeypatch.setenv("DEEPSEEKV3_CACHE_DIR", str(tmp_path))
    layer = FP8Linear(160, 176)
    layer.set_dense_weight(torch.randn(176, 160))
    x = torch.randn(3, 160)
    with pytest.warns(RuntimeWarning, match="no C\\+\\+ compiler found.*torch path"), torch.no_grad():
        out = layer(x)
    torch.testing.assert_close(out, F.linear(x, block_dequantize(layer.weight, layer.weight_scale_inv)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only once
        with torch.no_grad():
            layer(x)
    assert not native.available()


def test_failed_build_is_reported_with_its_log_and_not_retried(monkeypatch, tmp_path):
    bad = tmp_path / "bad-cxx"
    bad.write_text("#!/bin/sh\necho 'fatal: this compiler is broken' >&2\nexit 1\n")
    bad.chmod(0o755)
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("CXX", str(bad))
    monkeypatch.setenv("DEEPSEEKV3_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(native.NativeBuildError, match=r"failed to compile.*broken"), pytest.warns(RuntimeWarning):
        native.load(strict=True)
    logs = list((tmp_path / "cache").glob("*.failed"))
    assert len(logs) == 1 and "broken" in logs[0].read_text()
    monkeypatch.setattr(native, "_state", {})  # a new process: the marker stops a retry (and its stall)
    with pytest.raises(native.NativeBuildError, match=r"earlier build .* failed"), pytest.warns(RuntimeWarning):
        native.load(strict=True)


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


def test_isa_environment_variable_can_turn_the_kernel_off():
    code = ("import warnings, torch; warnings.simplefilter('ignore');"
            "from modeling_deepseekv3.fp8 import native; print(native.available())")
    env = dict(os.environ, DEEPSEEKV3_FP8_ISA="off")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_two_processes_build_one_library(tmp_path):
    """A fresh cache dir, two processes starting at once: the file lock makes one build and the other wait and
    load it; both then compute correctly."""
    code = (
        "import torch; from modeling_deepseekv3.fp8 import native, block_quantize;"
        "from modeling_deepseekv3.fp8.kernels import fp8_matmul_reference;"
        "native.load(strict=True); q, s = block_quantize(torch.randn(130, 200)); x = torch.randn(2, 200);"
        "d = (native.linear(x, q, s, (128, 128)) - fp8_matmul_reference(x, q, s, (128, 128))).abs().max();"
        "assert d < 1e-4, d; print('ok')"
    )
    env = dict(os.environ, DEEPSEEKV3_CACHE_DIR=str(tmp_path))
    procs = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for _ in range(2)]
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    assert all(out.strip() == "ok" for out, _ in results)
    assert sum("building the FP8 CPU kernel" in err for _, err in results) == 1
    assert len(list(tmp_path.glob("*.so"))) == 1 and not list(tmp_path.glob("*.tmp"))
