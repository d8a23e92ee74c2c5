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
    [((576, 256), (128, 128)), ((192, 160), (128, 128)), ((256, 256), (128, 128)), ((40, 64), (16, 16)), ((7, 5), (4, 2))],
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
    import modeling_deepseekv3.fp8.kernels as fp8

    fast = FP8Linear(shape[1], shape[0])
    fast.set_dense_weight(torch.randn(shape))
    ref = FP8Linear(shape[1], shape[0], compute="dequant")
    ref.load_state_dict(fast.state_dict())
    x = torch.randn(2, rows, shape[1])
    with torch.no_grad():
        torch.testing.assert_close(fast(x), ref(x), rtol=1e-4, atol=1e-4)
        a, b = fast(x.bfloat16()).float(), ref(x.bfloat16()).float()
        assert ((a - b).norm() / b.norm()) < 1e-2
    expected = fp8.fp8_matmul_reference(x[0], fast.weight, fast.weight_scale_inv, fast.block_size)
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
    {"to_bf16": lambda m: m.to(torch.bfloat16), "half": lambda m: m.half(), "float": lambda m: m.float(),
     "to_float64": lambda m: m.to(dtype=torch.float64)}[cast](layer)
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
