"""Helpers shared by the tests (fixtures live in conftest.py)."""

from __future__ import annotations

import functools
import random
from pathlib import Path

import pytest
import torch
import transformers

import modeling_deepseekv3 as ds
from modeling_deepseekv3.checkpoint import TINY_CONFIG
from modeling_deepseekv3.core.attention import MLAttention
from modeling_deepseekv3.core.rope import RotaryEmbedding
from modeling_deepseekv3.fp8 import block_dequantize, block_quantize, native
from modeling_deepseekv3.fp8.reference import fp8_head_matmul_reference, fp8_matmul_reference

ROOT = Path(__file__).resolve().parents[1]


def load(path, **kwargs) -> ds.DeepseekV3ForCausalLM:
    """``from_pretrained`` in float32 unless told otherwise (tests compare numerics in fp32)."""
    kwargs.setdefault("dtype", torch.float32)
    return ds.DeepseekV3ForCausalLM.from_pretrained(path, **kwargs)


def oracle_model(path):
    """A model whose MTP layer predicts exactly what the main model will: every block's output projections
    are zero (each layer passes its input through), so the main model predicts from the current token alone,
    and the MTP layer is wired to the embedding of the token it is given (eh_proj = [I, 0], the same norms and
    head). Its drafts equal the target distribution."""
    model = load(path)
    d = model.config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                p.zero_()
        mtp = model.model.mtp_layers[0]
        mtp.eh_proj.weight.copy_(torch.cat((torch.eye(d), torch.zeros(d, d)), 1))
        mtp.enorm.weight.fill_(1.0)
        mtp.shared_head.norm.weight.copy_(model.model.norm.weight)
        mtp.shared_head.head.weight.copy_(model.lm_head.weight)
        mtp.embed_tokens.weight.copy_(model.model.embed_tokens.weight)
    return model


def input_ids(batch=2, seq=12, vocab=TINY_CONFIG["vocab_size"], seed=0):
    """Random token ids (never 0/1, the BOS/EOS ids), reproducible by ``seed``."""
    return torch.randint(2, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


def attention_layer(**overrides) -> tuple[MLAttention, RotaryEmbedding]:
    """One MLA layer of :data:`TINY_CONFIG` (``overrides`` applied) with seeded weights, and its rotary embedding."""
    cfg = ds.DeepseekV3Config(**{**TINY_CONFIG, **overrides})
    layer = MLAttention(cfg, layer_idx=0)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in layer.named_parameters():
            p.copy_(
                1 + 0.2 * torch.randn(p.shape, generator=g)
                if "layernorm" in name
                else torch.randn(p.shape, generator=g) / p.shape[-1] ** 0.5
            )
    return layer.eval(), RotaryEmbedding(cfg)


def native_from(model: ds.DeepseekV3ForCausalLM, tmp_path) -> transformers.DeepseekV3ForCausalLM:
    """transformers-native on our weights: dequantized by our code (fp32, exact), written by our
    save_pretrained in the official per-expert layout, loaded by native's own from_pretrained."""
    dense = ds.DeepseekV3ForCausalLM.from_pretrained(
        model.config.name_or_path, dtype=torch.float32, dequantize_fp8=True
    )
    dense.save_pretrained(tmp_path / "dense-fp32", storage_dtype=torch.float32)
    return transformers.DeepseekV3ForCausalLM.from_pretrained(tmp_path / "dense-fp32", dtype=torch.float32).eval()


WORDS = (
    "the king queen lord lady sword crown night day love death fair foul heart blood hand eye soul speak "
    "come go tell know see hear thou thee thy my our what why when where shall will must doth hath art"
).split()


def corpus(path, n_lines: int, seed: int):
    """A small text file of random sentences over :data:`WORDS` (pretraining tests: learnable, reproducible)."""
    rng = random.Random(seed)
    lines = []
    for _ in range(n_lines):  # sentences with a little structure: "WORD WORD, WORD." repeated patterns
        k = rng.randint(4, 9)
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)).capitalize() + rng.choice([".", "!", "?", ","]))
    path.write_text("\n".join(lines) + "\n")
    return path


# -- the native FP8 CPU kernels against their reference twins: the cases and the checks, shared by the fast subset
# (unit/test_fp8_kernel.py) and the full ISA x path x dtype x shape x rows sweep (integration/test_fp8_kernel_sweep.py,
# slow). fp32 results must match the spec formula to fp32 rounding (relative 1e-5); bf16 results may differ from the
# exactly rounded fp32 result by the bf16 rounding only. Each check forces one ISA variant (``_isa``); one the CPU
# lacks skips.

ISAS = list(native.ISAS)  # every variant the library has; those this CPU lacks skip
DTYPES = [torch.float32, torch.bfloat16]
DTYPE_IDS = ["fp32", "bf16"]
LINEAR_PATHS = ["stream", "chunked"]
HEAD_PATHS = ["kernels", "blas"]
SHAPES = {  # (M, N), block
    "partial_both": ((176, 160), (128, 128)),
    "kv_a_576": ((576, 300), (128, 128)),
    "aligned": ((256, 384), (128, 128)),
    "tiny_blocks": ((40, 64), (16, 16)),
    "odd": ((7, 5), (4, 2)),
}
LINEAR_ROWS = [1, 3, 4, 5, 17, 64, 300]
HEADS = {  # heads, nope, v, rank, block
    "v3_dims": (3, 128, 128, 512, (128, 128)),
    "tiny_partial": (4, 32, 32, 160, (128, 128)),
    "blocks_cross_heads": (5, 40, 24, 130, (16, 16)),
    "odd": (2, 7, 5, 9, (4, 2)),
}
HEAD_ROWS = [1, 2, 5, 9, 40]


def best_isa() -> str | None:
    """The widest variant this CPU runs (None without the library)."""
    have = native.supported_isas()
    return max(have, key=native.ISAS.__getitem__) if have else None


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


def max_stream_rows(path: str) -> int:
    return 10**6 if path == "stream" else 0


@functools.lru_cache(maxsize=16)
def linear_case(shape: str, rows: int, dtype: torch.dtype):
    """Weights, input and the exact fp32 result of one case, shared by the ISA/path variants."""
    (m, n), block = SHAPES[shape]
    q, s = quantized((m, n), block)
    x = torch.randn(rows, n, generator=torch.Generator().manual_seed(rows)).to(dtype)
    return x, q, s, block, fp8_matmul_reference(x.float(), q, s, block)


def check_linear(isa, path, dtype, shape, rows):
    need(isa)
    x, q, s, block, exact = linear_case(shape, rows, dtype)
    out = native.linear(x, q, s, block, max_stream_rows=max_stream_rows(path), _isa=isa)
    assert_matches(out, x, q, s, block, exact)


def check_linear_with_ue8m0_scales(isa, path):
    need(isa)
    q, s = quantized((576, 300), (128, 128), "ue8m0")
    assert torch.equal(torch.exp2(torch.log2(s).round()), s)
    x = torch.randn(6, 300)
    assert_matches(
        native.linear(x, q, s, (128, 128), max_stream_rows=max_stream_rows(path), _isa=isa), x, q, s, (128, 128)
    )


def check_linear_on_non_contiguous_inputs(isa, path, dtype):
    need(isa)
    q, s = quantized((176, 160), (128, 128))
    wide = torch.randn(5, 320).to(dtype)
    for x in (wide[:, ::2], torch.randn(160, 5).to(dtype).t(), wide[1:4, 7:167]):
        assert not x.is_contiguous()
        out = native.linear(x, q, s, (128, 128), max_stream_rows=max_stream_rows(path), _isa=isa)
        assert_matches(out, x, q, s, (128, 128))


def check_nan_and_inf_propagate_as_in_the_reference(isa, path):
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
    out = native.linear(x, q, s, (128, 128), max_stream_rows=max_stream_rows(path), _isa=isa)
    ref = fp8_matmul_reference(x, q, s, (128, 128))
    assert torch.isnan(ref).any() and torch.isinf(ref).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isposinf(out), torch.isposinf(ref)) and torch.equal(
        torch.isneginf(out), torch.isneginf(ref)
    )
    finite = torch.isfinite(ref)
    torch.testing.assert_close(out[finite], ref[finite], rtol=1e-5, atol=1e-5 * ref[finite].abs().max().item())


def check_dequantize_is_bit_identical_to_block_dequantize(isa, shape):
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


def check_head_matmul(isa, path, dtype, heads, rows):
    """The absorbed MLA's two kv_b products per head: q_nope @ W_UK (transpose) and o_latent @ W_UV^T."""
    need(isa)
    blas = {"blas_min_rows": 0 if path == "blas" else 10**6}
    h, nope, v, r, block = HEADS[heads]
    q, s = quantized((h * (nope + v), r), block)
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    for x, offset, n_rows, transpose in (
        (torch.randn(h, rows, nope), 0, nope, True),
        (torch.randn(h, rows, r), nope, v, False),
    ):
        x = x.to(dtype)
        out = native.head_matmul(x, q, s, block, nope + v, offset, n_rows, transpose, _isa=isa, **blas)
        ref = fp8_head_matmul_reference(x, q, s, block, nope + v, offset, n_rows, transpose)
        assert out.dtype == dtype and out.shape == ref.shape
        assert (
            rel_err(out, fp8_head_matmul_reference(x.float(), q, s, block, nope + v, offset, n_rows, transpose)) <= tol
        )
        # strided input (as the attention hands it over: heads moved to the front)
        xs = x.transpose(0, 1).contiguous().transpose(0, 1)
        torch.testing.assert_close(
            native.head_matmul(xs, q, s, block, nope + v, offset, n_rows, transpose, _isa=isa, **blas), out
        )
