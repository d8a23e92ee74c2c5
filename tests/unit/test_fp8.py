"""FP8 block format: exact dequantization with partial edge blocks, quantization error bound, FP8Linear."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

import modeling_deepseekv3 as ds
from modeling_deepseekv3.fp8 import FP8_DTYPE, FP8Linear, block_dequantize, block_quantize, scale_shape


def naive_dequant(q, s, block):
    """Element by element, straight from the spec formula W[i, j] = float32(Wq[i, j]) * S[i // bm, j // bn]."""
    bm, bn = block
    out = torch.empty(q.shape, dtype=torch.float32)
    qf = q.float()
    for i in range(q.shape[0]):
        rows = s[i // bm]
        out[i] = qf[i] * rows[torch.arange(q.shape[1]) // bn]
    return out


@pytest.mark.parametrize(
    "shape,block",
    [
        ((576, 256), (128, 128)),
        ((192, 160), (128, 128)),
        ((256, 256), (128, 128)),
        ((40, 64), (16, 16)),
        ((7, 5), (4, 2)),
    ],
    ids=["kv_a_576_rows", "192x160", "aligned", "b16", "odd"],
)
def test_dequant_matches_spec_formula_with_partial_blocks(shape, block):
    q = (torch.randn(shape) * 100).clamp(-448, 448).to(FP8_DTYPE)
    s = torch.rand(scale_shape(shape, block)) + 0.01
    assert tuple(s.shape) == tuple(math.ceil(a / b) for a, b in zip(shape, block))
    torch.testing.assert_close(block_dequantize(q, s, block), naive_dequant(q, s, block), rtol=0, atol=0)


def test_v3_kv_a_proj_scale_row_four_covers_only_64_rows():
    q = torch.ones(576, 128).to(FP8_DTYPE)
    s = torch.tensor([[1.0], [2.0], [3.0], [4.0], [5.0]])
    w = block_dequantize(q, s)
    assert w[511, 0] == 4.0 and w[512, 0] == 5.0 and w[575, 0] == 5.0


@pytest.mark.parametrize("scale_fmt", [None, "ue8m0"])
@pytest.mark.parametrize("shape", [(300, 200), (128, 256), (576, 130)])
def test_quantize_error_bound(shape, scale_fmt):
    w = torch.randn(shape) * torch.logspace(-3, 1, shape[1])  # columns spanning 4 decades
    q, s = block_quantize(w, (128, 128), scale_fmt)
    assert q.dtype == FP8_DTYPE and s.dtype == torch.float32 and tuple(s.shape) == scale_shape(shape)
    if scale_fmt == "ue8m0":
        assert torch.equal(torch.exp2(torch.log2(s).round()), s)  # powers of two
    dq = block_dequantize(q, s)
    s_full = s.repeat_interleave(128, 0).repeat_interleave(128, 1)[: shape[0], : shape[1]]
    bound = torch.maximum(w.abs() / 16, s_full / 1024)
    assert bool(((w - dq).abs() <= bound * (1 + 1e-6)).all())
    # the block max maps to +-448 (plain scales), so the format's range is used fully
    if scale_fmt is None:
        assert q.float().abs().amax() == 448


def test_quantize_zero_block_is_finite():
    q, s = block_quantize(torch.zeros(130, 130))
    assert torch.isfinite(s).all() and (block_dequantize(q, s) == 0).all()


def test_fp8_linear_equals_linear_on_dequantized_weight():
    layer = FP8Linear(160, 176, compute="dequant")
    layer.set_dense_weight(torch.randn(176, 160))
    x = torch.randn(3, 5, 160)
    torch.testing.assert_close(layer(x), F.linear(x, block_dequantize(layer.weight, layer.weight_scale_inv)))
    xb = x.bfloat16()
    ref = F.linear(xb, block_dequantize(layer.weight, layer.weight_scale_inv).bfloat16())  # official: BF16 weight
    torch.testing.assert_close(layer(xb), ref, rtol=0, atol=0)


@pytest.mark.parametrize("shape", [(176, 160), (256, 384)], ids=["partial_blocks", "aligned"])
@pytest.mark.parametrize("rows", [1, 5, 24, 40])
def test_fast_cpu_path_equals_the_reference(shape, rows):
    """``fp8_compute="auto"`` (the native kernel: streaming for few rows, chunked dequantization + BLAS for
    more; the torch path where it cannot be built) against the ``"dequant"`` reference, in fp32 (tight)
    and bf16 (the fast path accumulates in fp32, the reference rounds the dequantized weight to BF16 first).
    The kernel's own exactness tests are in test_fp8_kernel.py."""
    from modeling_deepseekv3.fp8.reference import fp8_matmul_reference

    fast = FP8Linear(shape[1], shape[0])
    fast.set_dense_weight(torch.randn(shape))
    ref = FP8Linear(shape[1], shape[0], compute="dequant")
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, rows, shape[1])
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-4)
        a, b = fast(x.bfloat16()).float(), ref(x.bfloat16()).float()
        assert ((a - b).norm() / b.norm()) < 1e-2
    expected = fp8_matmul_reference(x[0], fast.weight, fast.weight_scale_inv, fast.block_size)
    torch.testing.assert_close(expected, ref(x[0]), rtol=1e-4, atol=1e-4)


def test_fast_path_not_used_for_training():
    layer = FP8Linear(160, 176)
    layer.set_dense_weight(torch.randn(176, 160))
    x = torch.randn(3, 160, requires_grad=True)
    layer(x).sum().backward()
    expected = block_dequantize(layer.weight, layer.weight_scale_inv).sum(0)
    torch.testing.assert_close(x.grad, expected.expand(3, -1))


@pytest.mark.parametrize("cast", ["to_bf16", "half", "float", "to_float64"])
def test_dtype_casts_keep_fp8(cast):
    layer = FP8Linear(64, 64, block_size=(32, 32))
    layer.set_dense_weight(torch.randn(64, 64))
    before = layer.weight.detach().clone()
    scales = layer.weight_scale_inv.detach().clone()
    {
        "to_bf16": lambda m: m.to(torch.bfloat16),
        "half": lambda m: m.half(),
        "float": lambda m: m.float(),
        "to_float64": lambda m: m.to(dtype=torch.float64),
    }[cast](layer)
    assert layer.weight.dtype == FP8_DTYPE and layer.weight_scale_inv.dtype == torch.float32
    assert torch.equal(layer.weight.view(torch.uint8), before.view(torch.uint8))
    assert torch.equal(layer.weight_scale_inv, scales)
    assert not layer.weight.requires_grad and not layer.weight_scale_inv.requires_grad


def test_model_to_dtype_keeps_fp8_and_computes(tiny_fp8):
    from helpers import input_ids, load

    model = load(tiny_fp8)
    model.to(torch.bfloat16)
    kinds = {p.dtype for n, p in model.named_parameters() if n.endswith("proj.weight") and "eh_proj" not in n}
    assert kinds == {FP8_DTYPE}
    assert all(p.dtype == torch.float32 for n, p in model.named_parameters() if n.endswith("weight_scale_inv"))
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    logits = model(input_ids()).logits
    assert logits.dtype == torch.bfloat16 and torch.isfinite(logits).all()


def test_set_dense_weight_rejects_wrong_shape():
    with pytest.raises(ValueError, match="shape"):
        FP8Linear(8, 8, block_size=(4, 4)).set_dense_weight(torch.zeros(4, 8))


def test_dequantize_rejects_wrong_scale_shape():
    with pytest.raises(ValueError, match=r"needs \(5, 2\)"):
        ds.block_dequantize(torch.zeros(576, 256).to(FP8_DTYPE), torch.ones(4, 2))


# ------------------------------------------------------------------------------------------- backend choice
def _fp8_parts():
    """An FP8 kv_b_proj, a plain FP8 linear and FP8 routed experts with set weights, named as in a model."""
    from torch import nn

    from modeling_deepseekv3.checkpoint import FP8_QUANTIZATION_CONFIG, TINY_CONFIG
    from modeling_deepseekv3.core.attention import KVBFP8Linear
    from modeling_deepseekv3.core.moe.experts import RoutedExperts

    config = ds.DeepseekV3Config(**TINY_CONFIG, quantization_config=FP8_QUANTIZATION_CONFIG)
    experts = RoutedExperts(config)
    for expert in experts:
        for proj in (expert.gate_proj, expert.up_proj, expert.down_proj):
            proj.set_dense_weight(torch.randn(proj.out_features, proj.in_features) / 16)
    kv_b = KVBFP8Linear(160, 4 * 64)
    kv_b.configure_heads(4, 32, 32)
    kv_b.set_dense_weight(torch.randn(256, 160))
    o_proj = FP8Linear(160, 176)
    o_proj.set_dense_weight(torch.randn(176, 160))
    layer = nn.ModuleDict({"experts": experts, "kv_b_proj": kv_b, "o_proj": o_proj})
    return nn.ModuleDict({"layers": nn.ModuleList([layer])}), experts, kv_b, o_proj


def test_every_fp8_caller_follows_the_one_dispatch_function(monkeypatch):
    """The plain linear, the absorbed kv_b heads and its dense copy, the grouped experts and the fp8_backends
    report all do what ``dispatch.choose_backend`` answers, even answers no device policy would give on a CPU."""
    from modeling_deepseekv3.fp8 import cpu, dispatch, fp8_backends, scaled_mm, w8a16
    from modeling_deepseekv3.fp8.reference import fp8_head_matmul_reference, fp8_matmul_reference

    model, experts, kv_b, o_proj = _fp8_parts()
    forced: dict[str, str] = {}
    asked: list[str] = []
    real = dispatch.choose_backend

    def choose(mode, weight, scale_inv, block_size, x=None, *, kind="linear", module=None):
        asked.append(kind)
        return forced.get(kind) or real(mode, weight, scale_inv, block_size, x, kind=kind, module=module)

    ran: list[str] = []

    def spy(name, fn):
        return lambda *a, **k: ran.append(name) or fn(*a, **k)

    def grouped_ref(x, w_ENK, s_E, counts_E, block):
        parts, start = [], 0
        for e, c in enumerate(counts_E.tolist()):
            parts.append(fp8_matmul_reference(x[start : start + c], w_ENK[e], s_E[e], block))
            start += c
        return torch.cat(parts)

    monkeypatch.setattr(dispatch, "choose_backend", choose)
    monkeypatch.setattr(cpu, "native_linear", spy("native", lambda x, w, s, b: fp8_matmul_reference(x, w, s, b)))
    monkeypatch.setattr(cpu, "native_head_matmul", spy("heads", fp8_head_matmul_reference))
    zeros = spy("scaled_mm", lambda x, w, s, fmt: x.new_zeros(len(x), len(w)))  # scaled_mm quantizes x: inexact
    monkeypatch.setattr(scaled_mm, "scaled_mm_linear", zeros)
    monkeypatch.setattr(w8a16, "w8a16_matmul", spy("w8a16", lambda x, w, s, b: fp8_matmul_reference(x, w, s, b)))
    monkeypatch.setattr(w8a16, "w8a16_grouped_matmul", spy("grouped", grouped_ref))

    x = torch.randn(3, 160)
    reference = F.linear(x, block_dequantize(o_proj.weight, o_proj.weight_scale_inv))
    with torch.no_grad():
        for answer in ("native", "scaled_mm", "w8a16", "dequant"):  # scaled_mm / w8a16 would raise on CPU unforced
            forced["linear"], ran[:] = answer, []
            out = o_proj(x)
            assert ran == ([] if answer == "dequant" else [answer])
            if answer != "scaled_mm":
                torch.testing.assert_close(out, reference, rtol=1e-4, atol=1e-4)
        forced.clear()

        def attend(q_latent):
            return q_latent * 0.5

        q_nope = torch.randn(1, 4, 2, 32)
        forced.update(heads="native", dense="dense")  # the heads kernel, though "dequant" is asked for
        kv_b.compute, ran[:] = "dequant", []
        expected = kv_b(q_nope, latent_attention=attend)
        assert ran == ["heads", "heads"]
        forced["heads"], ran[:] = "dense", []
        torch.testing.assert_close(kv_b(q_nope, latent_attention=attend), expected, rtol=1e-4, atol=1e-4)
        assert ran == [] and "_dense_cache" in kv_b.__dict__  # kept, though "dequant" keeps nothing unforced
        del kv_b.__dict__["_dense_cache"]
        forced["dense"] = "dequant"
        kv_b.compute = "auto"
        kv_b(q_nope, latent_attention=attend)
        assert "_dense_cache" not in kv_b.__dict__
        forced.clear()

        counts_E = torch.tensor([3, 0, 5, 1, 0, 0, 9, 0, 0, 2, 0, 0, 0, 1, 0, 4])
        x_AD = torch.randn(int(counts_E.sum()), 256)
        by_modules = experts(x_AD, counts_E)
        assert experts.fp8_grouped_backend() is None and experts._fp8_stack is None  # CPU: the modules path
        forced["grouped"], ran[:] = "w8a16_grouped", []
        torch.testing.assert_close(experts(x_AD, counts_E), by_modules, rtol=1e-4, atol=1e-4)
        assert ran == ["grouped"] * 3 and experts._fp8_stack is not None

    forced.update(linear="scaled_mm", grouped="w8a16_grouped")
    kinds = fp8_backends(model)
    assert kinds == {
        **{f"layers.*.experts.*.{p}": "w8a16_grouped" for p in ("gate_proj", "up_proj", "down_proj")},
        "layers.*.kv_b_proj": "scaled_mm",
        "layers.*.o_proj": "scaled_mm",
    }
    del forced["grouped"]
    assert set(fp8_backends(model).values()) == {"scaled_mm"}
    assert {"linear", "heads", "dense", "grouped"} <= set(asked)


def test_choose_backend_answers_on_cpu():
    """The per-call conditions, the device policy and the per-weight checks of the one function, unpatched."""
    from types import SimpleNamespace

    from modeling_deepseekv3.fp8 import FP8BackendError, choose_backend, native

    _, _, kv_b, o_proj = _fp8_parts()
    args = (o_proj.weight, o_proj.weight_scale_inv, o_proj.block_size)
    kernel = "native" if native.available() else "dequant"
    with torch.no_grad():
        assert choose_backend("auto", *args) == kernel
        assert choose_backend("auto", *args, torch.randn(2, 160)) == kernel
        assert choose_backend("auto", *args, torch.randn(2, 160).half()) == "dequant"  # the kernel takes fp32/bf16
        assert choose_backend("auto", *args, torch.randn(0, 160)) == "dequant"
        assert choose_backend("dequant", *args, torch.randn(2, 160)) == "dequant"
        with pytest.raises(FP8BackendError, match="device cpu"):
            choose_backend("w8a16", *args, torch.randn(2, 160))
        assert choose_backend("auto", *args, torch.randn(2, 160), kind="grouped") == "modules"
        assert choose_backend("auto", *args, kind="dense", module=kv_b) == "dense"
        assert choose_backend("dequant", *args, kind="dense", module=kv_b) == "dequant"
        kv_b._hf_hook = SimpleNamespace(offload=True)  # Accelerate lends the weights for the call only
        assert choose_backend("auto", *args, torch.randn(2, 160), kind="heads", module=kv_b) == "dequant"
        del kv_b._hf_hook
        heads = "native" if native.available() else "dense"  # without the kernels: the kept dense copy
        assert choose_backend("auto", *args, torch.randn(2, 160), kind="heads", module=kv_b) == heads
    x = torch.randn(2, 160, requires_grad=True)
    assert choose_backend("w8a16", *args, x) == "autograd"  # training never reaches a kernel, so nothing raises
    assert choose_backend("auto", *args, kind="dense", module=kv_b) == "dequant"
    with pytest.raises(ValueError, match="kind must be one of"):
        choose_backend("auto", *args, kind="conv")


def test_set_fp8_compute_checks_every_device_before_switching():
    from modeling_deepseekv3.fp8 import FP8BackendError, fp8_backends, set_fp8_compute

    model, *_ = _fp8_parts()
    with pytest.raises(FP8BackendError, match="device cpu"):
        set_fp8_compute(model, "scaled_mm")
    assert {m.compute for m in model.modules() if isinstance(m, FP8Linear)} == {"auto"}  # nothing changed
    with pytest.raises(ValueError, match="fp8_compute must be one of"):
        set_fp8_compute(model, "fast")
    assert set_fp8_compute(model, "dequant") is model
    assert set(fp8_backends(model).values()) == {"dequant"}
