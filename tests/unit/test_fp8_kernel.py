"""The native FP8 CPU kernels (fp8/native.py, fp8/csrc/fp8_cpu.cpp) against their reference twins, fast subset.

Each entry point (linear on both shapes of work -- streaming the weight and chunked dequantization + BLAS --, the
per-head products, dequantize), float32 and bfloat16, edge shapes (partial 128-blocks, blocks that are not 128,
1-300 rows), ue8m0 scales, non-contiguous inputs and NaN/Inf, on the widest ISA variant this CPU runs, and every
other variant it runs on one case per entry point; the torch path a CPU without the kernels takes. The full ISA x
path x dtype x shape x rows sweep: tests/integration/test_fp8_kernel_sweep.py (slow); the checks: tests/helpers.py.
fp32 results must match the spec formula to fp32 rounding (relative 1e-5); bf16 results may differ from
the exactly rounded fp32 result by the bf16 rounding only.
"""

from __future__ import annotations

import os
import re
import warnings

import pytest
import torch
import torch.nn.functional as F

from helpers import (
    DTYPE_IDS,
    DTYPES,
    HEAD_PATHS,
    ISAS,
    LINEAR_PATHS,
    best_isa,
    check_dequantize_is_bit_identical_to_block_dequantize,
    check_head_matmul,
    check_linear,
    check_linear_on_non_contiguous_inputs,
    check_linear_with_ue8m0_scales,
    check_nan_and_inf_propagate_as_in_the_reference,
    need,
    quantized,
    rel_err,
)
from modeling_deepseekv3.fp8 import FP8_DTYPE, FP8Linear, block_dequantize, native
from modeling_deepseekv3.fp8.reference import fp8_matmul_reference

if not native.load():
    pytest.skip(f"native FP8 kernel unavailable here: {native._state.get('error')}", allow_module_level=True)

BEST = best_isa()
LINEAR_CASES = [
    ("partial_both", 1),
    ("partial_both", 5),
    ("odd", 3),
    ("tiny_blocks", 17),
    ("aligned", 64),
    ("kv_a_576", 300),
]  # (shape, rows): decode and prefill rows, 4-row tiles and their tails
HEAD_CASES = [("tiny_partial", 1), ("blocks_cross_heads", 9), ("odd", 5), ("v3_dims", 2)]  # (heads, rows)


@pytest.mark.parametrize("path", LINEAR_PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape,rows", LINEAR_CASES, ids=[f"{s}-{r}" for s, r in LINEAR_CASES])
def test_linear_equals_the_reference(path, dtype, shape, rows):
    check_linear(BEST, path, dtype, shape, rows)


@pytest.mark.parametrize("path", LINEAR_PATHS)
def test_linear_with_ue8m0_scales(path):
    check_linear_with_ue8m0_scales(BEST, path)


@pytest.mark.parametrize("path", LINEAR_PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_linear_on_non_contiguous_inputs(path, dtype):
    check_linear_on_non_contiguous_inputs(BEST, path, dtype)


@pytest.mark.parametrize("path", LINEAR_PATHS)
def test_nan_and_inf_propagate_as_in_the_reference(path):
    check_nan_and_inf_propagate_as_in_the_reference(BEST, path)


@pytest.mark.parametrize("shape", ["partial_both", "tiny_blocks", "odd"])
def test_dequantize_is_bit_identical_to_block_dequantize(shape):
    check_dequantize_is_bit_identical_to_block_dequantize(BEST, shape)


@pytest.mark.parametrize("path", HEAD_PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads,rows", HEAD_CASES, ids=[f"{h}-{r}" for h, r in HEAD_CASES])
def test_head_matmul_equals_the_reference(path, dtype, heads, rows):
    """The absorbed MLA's two kv_b products per head: q_nope @ W_UK (transpose) and o_latent @ W_UV^T."""
    check_head_matmul(BEST, path, dtype, heads, rows)


@pytest.mark.parametrize("isa", ISAS)
def test_every_isa_variant_on_each_entry_point(isa):
    """One partial-block case per entry point, path and dtype on each variant (those this CPU lacks skip)."""
    for dtype in DTYPES:
        for path in LINEAR_PATHS:
            check_linear(isa, path, dtype, "partial_both", 5)
        for path in HEAD_PATHS:
            check_head_matmul(isa, path, dtype, "tiny_partial", 2)
    check_dequantize_is_bit_identical_to_block_dequantize(isa, "partial_both")


def every_code_weight(rows=12, cols=300):
    """Each of the 256 e4m3 codes (subnormals, both NaN codes) in every row, shuffled per row; scales 2^-12..2^3."""
    g = torch.Generator().manual_seed(0)
    codes = torch.stack(
        [torch.arange(cols, dtype=torch.int64)[torch.randperm(cols, generator=g)] % 256 for _ in range(rows)]
    )
    q = codes.to(torch.uint8).view(FP8_DTYPE)
    nan_rows = [2, 7]  # only these keep the NaN codes 0x7F / 0xFF; elsewhere they become +-0
    keep = torch.zeros(rows, 1, dtype=torch.bool)
    keep[nan_rows] = True
    q.view(torch.uint8)[((codes & 0x7F) == 0x7F) & ~keep] = 0
    s = torch.exp2(torch.randint(-12, 4, (1, 3), generator=g).float()).expand(1, 3).contiguous()
    return q, s, nan_rows


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("rows", [1, 2, 3, 4])
def test_decode_tiles_read_every_code_exactly(isa, rows):
    """The decode tiles (direct codes) on all 256 codes, subnormals included, at every decode row count: NaN
    exactly where the reference has it (rows holding a NaN code), the rest equal to the reference; then with
    denormals-are-zero on, which the direct tiles cannot honour (they fall back to the half tiles)."""
    if isa not in native.supported_isas():
        pytest.skip(f"this CPU has no {isa}")
    q, s, nan_rows = every_code_weight()
    x = torch.randn(rows, 300, generator=torch.Generator().manual_seed(rows))
    ref = fp8_matmul_reference(x, q, s, (128, 128))
    assert set(torch.isnan(ref).any(0).nonzero().flatten().tolist()) == set(nan_rows)
    for flush in (False, True):
        torch.set_flush_denormal(flush)
        try:
            out = native.linear(x, q, s, (128, 128), _isa=isa)
        finally:
            torch.set_flush_denormal(False)
        assert torch.equal(torch.isnan(out), torch.isnan(ref))
        finite = ~torch.isnan(ref)
        assert rel_err(out[finite], ref[finite]) <= 1e-5


@pytest.mark.parametrize("isa", ISAS)
def test_decode_tiles_keep_large_products_finite(isa):
    """Inputs and scales whose products reach 2^20 and more (the direct tiles scale the input by 2^(120 - d))."""
    if isa not in native.supported_isas():
        pytest.skip(f"this CPU has no {isa}")
    q, s = quantized((256, 384), (128, 128))
    for x_scale, s_scale in ((1e6, 1.0), (1.0, 2.0**20), (3e4, 2.0**10), (1e-30, 2.0**-20)):
        x = torch.randn(2, 384, generator=torch.Generator().manual_seed(1)) * x_scale
        out = native.linear(x, q, s * s_scale, (128, 128), _isa=isa)
        ref = fp8_matmul_reference(x, q, s * s_scale, (128, 128))
        assert torch.isfinite(out).all() and torch.isfinite(ref).all()
        assert rel_err(out, ref) <= 1e-5, (x_scale, s_scale)


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
    assert not any(
        isinstance(v, torch.Tensor) and v.dtype != FP8_DTYPE and v.numel() >= 256 * 160 for v in vars(layer).values()
    )  # no dense copy hangs off the module


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("weight_dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dense_linear_equals_the_reference(isa, weight_dtype, dtype):
    """The dense tiles (a decode step's output head): every row count a tile takes and past it (1-5: 4-row and
    1-row weight tiles, 1-4-row input tiles), widths with a tail (31, 33, 1000) and without, against the exact
    product of the same values, for bf16 and fp32 weights and inputs."""
    need(isa)
    g = torch.Generator().manual_seed(0)
    for m, n in [(7, 33), (130, 256), (5, 31), (66, 1000)]:
        w = (torch.randn(m, n, generator=g) * torch.logspace(-2, 1, n)).to(weight_dtype)
        for rows in (1, 2, 3, 4, 5):
            x = torch.randn(rows, n, generator=g).to(dtype)
            out = native.dense_linear(x, w, _isa=isa)
            exact = x.double() @ w.double().T
            assert out.dtype == dtype and out.shape == (rows, m)
            if dtype == torch.float32:
                assert rel_err(out, exact) <= 1e-5
            else:  # the exact result rounded to bf16, give or take the fp32 sums' rounding
                assert bool(((out.double() - exact).abs() <= exact.abs() * 2**-8 + 1e-5 * exact.abs().max()).all())
    w = torch.randn(9, 40).to(weight_dtype)
    w[3, 17] = float("nan")
    out = native.dense_linear(torch.randn(2, 40), w, _isa=isa)
    assert out[:, 3].isnan().all() and not out[:, [0, 1, 2, 4, 5, 6, 7, 8]].isnan().any()


def test_dense_linear_rejects_what_it_cannot_read():
    with pytest.raises(RuntimeError, match="bfloat16 or float32"):
        native.dense_linear(torch.randn(1, 8), torch.randn(4, 8).half())
    with pytest.raises(RuntimeError, match="contiguous"):
        native.dense_linear(torch.randn(1, 8), torch.randn(8, 4).t())
    with pytest.raises(RuntimeError, match=r"x must be \[T, 8\]"):
        native.dense_linear(torch.randn(1, 9), torch.randn(4, 8))


def test_native_head_equals_nn_linear_and_steps_aside_for_autograd():
    """``NativeHeadLinear`` (the output heads on the CPU): decode-sized calls stream the weight, its twin is
    ``nn.Linear.forward`` (more rows, autograd), and both give the same product."""
    from modeling_deepseekv3.fp8.cpu import DENSE_MAX_ROWS, NativeHeadLinear

    head = torch.nn.Linear(96, 300, bias=False).to(torch.bfloat16)
    plain = torch.nn.Linear(96, 300, bias=False).to(torch.bfloat16)
    plain.weight = head.weight
    head.__class__ = NativeHeadLinear
    calls = []
    real = native.dense_linear
    try:
        native.dense_linear = lambda *a, **k: calls.append(a[0].shape) or real(*a, **k)
        x = torch.randn(2, 1, 96).to(torch.bfloat16)
        with torch.no_grad():
            out, ref = head(x), plain(x)
        assert calls == [(2, 96)] and out.shape == ref.shape == (2, 1, 300)
        assert rel_err(out, ref) <= 2**-7
        with torch.no_grad():
            head(torch.randn(1, DENSE_MAX_ROWS + 1, 96).to(torch.bfloat16))  # more rows: BLAS
            with pytest.raises(RuntimeError):  # a float32 input on a bf16 head: refused, as by nn.Linear
                head(torch.randn(1, 96))
        y = head(torch.randn(1, 96, dtype=torch.bfloat16, requires_grad=True))  # autograd: nn.Linear's forward
        y.float().sum().backward()
        assert calls == [(2, 96)] and head.weight.grad is not None
    finally:
        native.dense_linear = real


def test_loaded_model_decodes_through_the_native_heads(tiny_fp8):
    """``from_pretrained`` on the CPU gives ``lm_head`` and the MTP head the native decode product; the greedy
    tokens (plain and with MTP drafts) and the logits equal those of the same model with plain ``nn.Linear``
    heads."""
    from helpers import input_ids, load

    model = load(tiny_fp8, dtype=torch.bfloat16)
    heads = sorted(name for name, m in model.named_modules() if type(m).__name__ == "NativeHeadLinear")
    assert heads == ["lm_head", "model.layers.3.shared_head.head"]
    ids = input_ids(1, 6)
    with torch.no_grad():
        logits = model(ids).logits
    fast = model.generate(ids, max_new_tokens=8, do_sample=False)
    fast_mtp = model.generate(ids, max_new_tokens=8, do_sample=False, use_mtp=True)
    for name in heads:
        model.get_submodule(name).__class__ = torch.nn.Linear
    with torch.no_grad():
        assert rel_err(model(ids).logits[:, -1], logits[:, -1]) <= 2**-7
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False), fast)
    assert torch.equal(model.generate(ids, max_new_tokens=8, do_sample=False, use_mtp=True), fast_mtp)


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fp8_experts_run_without_their_module_calls_and_equal_them(tiny_fp8, monkeypatch, dtype):
    """FP8 experts on the CPU kernels at inference: the three products per expert are called directly (the
    "plain fp8" path), bit-identical to the per-expert modules (their twin); a hook on an active expert, a
    wrapped projection or autograd send the layer back to the modules."""
    from helpers import load

    experts = load(tiny_fp8, dtype=dtype).model.layers[1].mlp.experts
    counts_E = torch.tensor([3, 0, 5, 1, 0, 0, 9, 0, 0, 2, 0, 0, 0, 1, 0, 4])
    x_AD = torch.randn(int(counts_E.sum()), 256).to(dtype)
    slices = [(e, int(c)) for e, c in enumerate(counts_E) if c]
    with torch.no_grad():
        by_modules = experts._run_modules(x_AD, slices)
        ran_modules = []
        real = type(experts)._run_modules
        monkeypatch.setattr(type(experts), "_run_modules", lambda *a: ran_modules.append(1) or real(*a))
        fused = []
        real_experts = native.experts
        monkeypatch.setattr(native, "experts", lambda *a, **k: fused.append(1) or real_experts(*a, **k))
        assert torch.equal(experts(x_AD, counts_E), by_modules) and not ran_modules and fused == [1]
        silu = experts[2].act_fn
        experts[2].act_fn = torch.nn.GELU()  # another activation: the products one by one, still not the modules
        expected = real(experts, x_AD, slices)
        assert torch.equal(experts(x_AD, counts_E), expected) and not ran_modules and fused == [1]
        experts[2].act_fn = silu
        handle = experts[6].register_forward_hook(lambda *a: None)
        assert torch.equal(experts(x_AD, counts_E), by_modules) and ran_modules == [1]
        handle.remove()
        experts[1].up_proj.compute = "dequant"  # an inactive expert: still the plain path
        experts(x_AD, counts_E)
        experts[3].up_proj.compute = "dequant"  # an active one asks for the reference: the modules
        experts(x_AD, counts_E)
        assert ran_modules == [1, 1]
    experts(x_AD.requires_grad_(), counts_E)
    assert ran_modules == [1, 1, 1]


def test_experts_op_refuses_what_does_not_chain():
    """The experts op checks its lists before computing: counts that do not add up to the rows, a missing weight,
    and projections whose shapes do not chain are errors naming the problem; experts with no rows are skipped."""
    layers = [FP8Linear(256, 128), FP8Linear(256, 128), FP8Linear(128, 256)]
    for layer in layers:
        layer.set_dense_weight(torch.randn(layer.out_features, layer.in_features))
    w = [layer.weight for layer in layers]
    s = [layer.weight_scale_inv for layer in layers]
    x = torch.randn(3, 256)
    with torch.no_grad():
        alone = native.experts(x, [3], w, s, (128, 128))
        assert torch.equal(native.experts(x, [0, 3, 0], w * 3, s * 3, (128, 128)), alone)
        with pytest.raises(RuntimeError, match="counts add up to 2, x has 3 rows"):
            native.experts(x, [2], w, s, (128, 128))
        with pytest.raises(RuntimeError, match="3 weights and 3 scales per expert"):
            native.experts(x, [3], w[:2], s[:2], (128, 128))
        with pytest.raises(RuntimeError, match="do not chain"):
            native.experts(x, [3], [w[0], w[1], w[0]], [s[0], s[1], s[0]], (128, 128))


@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_fp8_autograd_dequantizes_on_the_native_kernel(monkeypatch, dtype):
    """Training through an FP8 linear (LoRA over an FP8 base): forward and backward dequantize with the native
    kernel, and output and input gradient are exactly those of the reference dequantization."""
    layer = FP8Linear(160, 176)
    layer.set_dense_weight(torch.randn(176, 160))
    dense = block_dequantize(layer.weight, layer.weight_scale_inv, layer.block_size, dtype)
    calls = []
    real = native.dequantize
    monkeypatch.setattr(native, "dequantize", lambda *a, **k: calls.append(1) or real(*a, **k))
    x = torch.randn(3, 160, dtype=dtype, requires_grad=True)
    y = layer(x)
    y.backward(torch.ones_like(y))
    assert len(calls) == 2
    assert torch.equal(y, F.linear(x.detach(), dense))
    assert torch.equal(x.grad, torch.ones(3, 176, dtype=dtype) @ dense)


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
    assert torch.ops.deepseekv3_fp8.dense_linear(x, torch.empty(7, 160, device="meta"), 0).shape == (3, 7)


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


# -- packaging: fallback without a compiler or without the ISA, failed builds (the ones in fresh processes, concurrent
# builds included: tests/integration/test_fp8_kernel_processes.py) ------------------------------------------------


def fallback_matches_the_reference(notice: str):
    """An FP8 linear on the torch path after exactly one notice matching ``notice``, with the reference's answer."""
    layer = FP8Linear(160, 176)
    layer.set_dense_weight(torch.randn(176, 160))
    x = torch.randn(3, 160)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad():
        warnings.simplefilter("always")
        out = layer(x)
        layer(x)
    notes = [str(w.message) for w in caught if "FP8 CPU kernel unavailable" in str(w.message)]
    assert len(notes) == 1 and re.search(notice, notes[0]) and "torch path" in notes[0], notes
    torch.testing.assert_close(out, F.linear(x, block_dequantize(layer.weight, layer.weight_scale_inv)))
    assert not native.available()


def test_isa_environment_variable_turns_the_kernel_off(monkeypatch):
    monkeypatch.setattr(native, "_state", {})  # as in a new process
    monkeypatch.setenv("DEEPSEEKV3_FP8_ISA", "off")
    fallback_matches_the_reference(r"disabled by DEEPSEEKV3_FP8_ISA=off")
    monkeypatch.setattr(native, "_state", {})
    monkeypatch.setenv("DEEPSEEKV3_FP8_ISA", "neon")
    fallback_matches_the_reference(r"DEEPSEEKV3_FP8_ISA must be auto, avx2, avx512, avx512gfni or off, got 'neon'")


def test_a_cpu_without_the_isa_gets_the_torch_path_and_one_notice(monkeypatch):
    """The library reports no variant this CPU runs (its cpuid mask is 0): one notice naming AVX2, the torch path."""
    state = {}
    monkeypatch.setattr(native, "_state", state)
    monkeypatch.setattr(native, "_dlopen", lambda fd, so: lambda: 0)
    try:
        fallback_matches_the_reference(r"this CPU has no AVX2\+FMA\+F16C")
    finally:
        if "fd" in state:
            os.close(state["fd"])


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
