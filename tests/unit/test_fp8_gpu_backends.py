"""FP8 GPU backends (fp8/w8a16.py, fp8/scaled_mm.py) and the device policy of fp8/dispatch.py through their
twins: the W8A16 Triton kernel under Triton's interpreter on CPU tensors, the scaled_mm scale layouts through a
pure-torch emulation and torch's own meta-device checks, the backend choice with a simulated CUDA device. The
GPU-marked tests at the end run each backend for real."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import modeling_deepseekv3 as ds
from helpers import input_ids, load
from modeling_deepseekv3.checkpoint import TINY_CONFIG
from modeling_deepseekv3.fp8 import FP8Linear, block_dequantize, block_quantize, dispatch, scaled_mm, w8a16
from modeling_deepseekv3.fp8.dispatch import FP8BackendError, device_backend
from modeling_deepseekv3.fp8.reference import fp8_matmul_reference
from modeling_deepseekv3.fp8.training import _gemm_emulated

needs_triton = pytest.mark.skipif(not w8a16.triton_available(), reason="triton is not installed (pip install triton)")
BLOCK = (128, 128)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def fp8_weight(n: int, k: int, seed: int = 0):
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(seed)) / 16
    return block_quantize(w, BLOCK)


# ----------------------------------------------------------------------------------- W8A16 (interpreter)
@needs_triton
def test_every_e4m3_byte_decodes_like_torch():
    codes = torch.arange(256, dtype=torch.uint8)
    ours = w8a16.decode_e4m3_bits(codes)
    ref = codes.view(torch.float8_e4m3fn).float()
    nan = ref.isnan()
    assert nan.sum() == 2 and torch.equal(ours.isnan(), nan)  # 0x7F, 0xFF
    assert torch.equal(ours[~nan].view(torch.int32), ref[~nan].view(torch.int32))  # bit-exact, -0.0 included


@needs_triton
@pytest.mark.parametrize("rows", [1, 7, 128, 300])
@pytest.mark.parametrize("n,k", [(200, 300), (576, 160), (256, 384)])
def test_w8a16_kernel_equals_the_dequant_reference(rows, n, k):
    """Partial 128-blocks in N and K and partial row tiles: fp32 input to fp32 rounding; bf16 input against the
    fp32 reference of the same bf16 values, rounded to bf16 (the only difference left is summation order)."""
    q, s = fp8_weight(n, k, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    ref32 = fp8_matmul_reference(x, q, s, BLOCK)
    assert rel(w8a16.w8a16_matmul(x, q, s, BLOCK), ref32) < 1e-6
    xb = x.bfloat16()
    out = w8a16.w8a16_matmul(xb, q, s, BLOCK)
    ref = fp8_matmul_reference(xb.float(), q, s, BLOCK)
    assert out.dtype == torch.bfloat16 and out.shape == (rows, n)
    assert rel(out, ref.bfloat16()) <= 1e-3
    assert rel(out, ref) <= 4e-3  # bf16 output rounding itself


@needs_triton
def test_w8a16_grouped_kernel_equals_per_expert_reference():
    n_experts, n, k = 6, 192, 320
    weights = [fp8_weight(n, k, seed=e) for e in range(n_experts)]
    w_ENK = torch.stack([q for q, _ in weights])
    s_E = torch.stack([s for _, s in weights])
    for counts in ([3, 0, 40, 1, 0, 17], [0, 0, 0, 0, 1, 0], [1] * 6):
        counts_E = torch.tensor(counts)
        x = torch.randn(int(counts_E.sum()), k, generator=torch.Generator().manual_seed(2)).bfloat16()
        out = w8a16.w8a16_grouped_matmul(x, w_ENK, s_E, counts_E, BLOCK)
        parts, start = [], 0
        for e, c in enumerate(counts):
            parts.append(fp8_matmul_reference(x[start : start + c].float(), *weights[e], BLOCK))
            start += c
        ref = torch.cat(parts)
        assert rel(out, ref.bfloat16()) <= 1e-3


def test_group_tiles_cover_each_experts_rows_once():
    counts = torch.tensor([3, 0, 40, 1, 0, 17])
    bm = 16
    max_tiles = -(-61 // bm) + 6
    e, row0, row1 = w8a16.group_tiles(counts, bm, max_tiles)
    covered = torch.zeros(61, dtype=torch.int64)
    ends = counts.cumsum(0)
    for t in range(max_tiles):
        if row0[t] < row1[t]:
            rows = torch.arange(row0[t], min(row0[t] + bm, row1[t]))
            assert bool((rows >= ends[e[t]] - counts[e[t]]).all() and (rows < ends[e[t]]).all())
            covered[rows] += 1
    assert torch.equal(covered, torch.ones(61, dtype=torch.int64))


@needs_triton
def test_fp8_experts_grouped_path_equals_the_modules_path():
    """The stacked FP8 experts (weights re-homed, FP8 kept, names unchanged) run as three grouped kernels and
    give the per-expert modules' answer. On CPU this path is only reachable explicitly (interpreter)."""
    from modeling_deepseekv3.core.moe.experts import RoutedExperts

    quant = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    config = ds.DeepseekV3Config(**TINY_CONFIG, quantization_config=quant)
    assert config.is_fp8
    experts = RoutedExperts(config)
    for expert in experts:
        for proj in (expert.gate_proj, expert.up_proj, expert.down_proj):
            assert isinstance(proj, FP8Linear)
            proj.set_dense_weight(torch.randn(proj.out_features, proj.in_features) / 16)
    counts_E = torch.tensor([3, 0, 5, 1, 0, 0, 9, 0, 0, 2, 0, 0, 0, 1, 0, 4])
    x = torch.randn(int(counts_E.sum()), config.hidden_size)
    before = {k: v.clone() for k, v in experts.state_dict().items()}
    with torch.no_grad():
        ref = experts._run_modules(x, [(e, c) for e, c in enumerate(counts_E.tolist()) if c])
        assert experts.stack_fp8()
        assert experts[2].up_proj.weight.data_ptr() == experts._fp8_stack[0][1][2].data_ptr()
        assert all(torch.equal(before[k], v) for k, v in experts.state_dict().items())  # same names, same values
        assert experts._fp8_stack_intact(x, [0, 2])
        out = experts.run_fp8_grouped(x, counts_E)
    assert rel(out, ref) < 1e-5
    assert experts.fp8_grouped_backend(torch.device("cpu")) is None  # CPU keeps its own paths


# ---------------------------------------------------------------------------- scaled_mm layouts (pure torch)
@pytest.mark.parametrize("m,n,k", [(1, 256, 384), (7, 576, 160), (300, 200, 512)])
def test_scaled_mm_scale_layouts_reproduce_the_reference(m, n, k):
    """Scales prepared for cuBLAS, read back by the emulated blockwise GEMM, give the dequant reference of the
    same FP8 operands: 1x128 x 128x128 (inference Fprop, training Fprop/Dgrad) and 1x128 x 1x128 (Wgrad)."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(m))
    x_q, x_s = block_quantize(x, (1, 128))
    w_q, w_s = fp8_weight(n, k)
    a_scale = scaled_mm.prepare_scales(x_s, (1, 128))
    assert a_scale.shape == x_s.shape and a_scale.stride() == (1, m)
    b_scale = scaled_mm.prepare_scales(w_s, (128, 128))
    l4 = -(-w_s.shape[1] // 4) * 4
    assert b_scale.shape == (l4, w_s.shape[0]) and b_scale.stride() == (1, l4)
    out = scaled_mm.blockwise_scaled_mm_emulated(x_q, a_scale, w_q, b_scale, (128, 128), torch.float32)
    ref = _gemm_emulated(x_q, x_s, (1, 128), w_q, w_s, (128, 128), torch.float32)
    assert rel(out, ref) < 1e-6
    assert rel(out, fp8_matmul_reference(block_dequantize(x_q, x_s, (1, 128)), w_q, w_s, BLOCK)) < 1e-6
    b_q, b_s = block_quantize(torch.randn(n, k), (1, 128))
    b_scale = scaled_mm.prepare_scales(b_s, (1, 128))
    assert b_scale.shape == b_s.shape and b_scale.stride() == (1, n)
    out = scaled_mm.blockwise_scaled_mm_emulated(x_q, a_scale, b_q, b_scale, (1, 128), torch.float32)
    assert rel(out, _gemm_emulated(x_q, x_s, (1, 128), b_q, b_s, (1, 128), torch.float32)) < 1e-6


@pytest.mark.parametrize("b_block", [(128, 128), (1, 128)])
def test_scaled_mm_layouts_pass_torchs_own_checks(b_block):
    """torch's meta kernel for scaled_mm (the shape/stride rules ATen's CUDA code enforces) accepts the
    prepared layouts. Multiples of 128 only: torch 2.13's meta rules floor-divide where CUDA rounds up."""
    m, n, k = 64, 384, 640
    x_q, x_s = block_quantize(torch.randn(m, k), (1, 128))
    w_q, w_s = block_quantize(torch.randn(n, k), b_block)

    def meta(t):
        return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device="meta")

    a_scale, b_scale = scaled_mm.prepare_scales(x_s, (1, 128)), scaled_mm.prepare_scales(w_s, b_block)
    out = scaled_mm.blockwise_scaled_mm(meta(x_q), meta(a_scale), meta(w_q), meta(b_scale), b_block, torch.bfloat16)
    assert out.shape == (m, n) and out.dtype == torch.bfloat16
    with pytest.raises(RuntimeError):  # and refuses the scales as the checkpoint / quantizer store them
        scaled_mm.blockwise_scaled_mm(meta(x_q), meta(a_scale), meta(w_q), meta(w_s), b_block, torch.bfloat16)


@pytest.mark.parametrize("b_block", [(128, 128), (1, 128)])
@pytest.mark.parametrize("m,n,k", [(1, 256, 384), (5, 256, 384), (16, 256, 384), (17, 2048, 2133), (40, 100, 384)])
def test_scaled_mm_pads_what_cublas_refuses(monkeypatch, m, n, k, b_block):
    """What torch / cuBLASLt refused on an H200: a one-row ``A`` (decode at batch 1: CUBLAS_STATUS_NOT_SUPPORTED)
    and ``K`` not a multiple of 16 (a routed expert's Wgrad over its 2133 tokens: ValueError). The wrapper hands
    cuBLAS multiples of 16 everywhere, zero-padded, scales in cuBLAS's layout, and returns the unpadded product."""
    shapes = []

    def cublas(a, b_t, scale_a, recipe_a, scale_b, recipe_b, output_dtype, use_fast_accum):
        shapes.append((*a.shape, b_t.shape[1]))
        assert scale_a.shape == (a.shape[0], -(-a.shape[1] // 128)) and scale_a.stride() == (1, a.shape[0])
        block = (1, 128) if recipe_b == F.ScalingType.BlockWise1x128 else (128, 128)
        return scaled_mm.blockwise_scaled_mm_emulated(a, scale_a, b_t.t(), scale_b, block, output_dtype)

    monkeypatch.setattr(F, "scaled_mm", cublas)
    gen = torch.Generator().manual_seed(m)
    x_q, x_s = block_quantize(torch.randn(m, k, generator=gen), (1, 128))
    w_q, w_s = block_quantize(torch.randn(n, k, generator=gen) / 16, b_block)
    a_scale, b_scale = scaled_mm.prepare_scales(x_s, (1, 128)), scaled_mm.prepare_scales(w_s, b_block)
    out = scaled_mm.blockwise_scaled_mm(x_q, a_scale, w_q, b_scale, b_block, torch.float32)
    assert out.shape == (m, n) and len(shapes) == 1 and all(d % 16 == 0 for d in shapes[0])
    ref = _gemm_emulated(x_q, x_s, (1, 128), w_q, w_s, b_block, torch.float32)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)  # the same sums, blocked differently by BLAS


def test_training_cuda_gemm_goes_through_the_shared_wrapper(monkeypatch):
    """The training recipe's CUDA GEMM is the inference wrapper: with scaled_mm swapped for its emulation,
    all three of the recipe's GEMM shapes equal the emulated backend."""
    from modeling_deepseekv3.fp8 import training

    monkeypatch.setattr(scaled_mm, "blockwise_scaled_mm", scaled_mm.blockwise_scaled_mm_emulated)
    x_q, x_s = block_quantize(torch.randn(40, 384), (1, 128))
    for b_block in ((128, 128), (1, 128)):
        b_q, b_s = block_quantize(torch.randn(256, 384), b_block)
        ours = training._gemm_cuda(x_q, x_s, (1, 128), b_q, b_s, b_block, torch.float32)
        assert rel(ours, _gemm_emulated(x_q, x_s, (1, 128), b_q, b_s, b_block, torch.float32)) < 1e-6


# ------------------------------------------------------------------------------------------ backend choice
def test_auto_on_cpu_is_the_native_kernel_and_gpu_backends_refuse_cpu():
    assert device_backend("auto", "cpu") == "native"
    assert device_backend("native", "cpu") == "native"
    assert device_backend("dequant", "cpu") == "dequant"
    for backend in ("scaled_mm", "w8a16"):
        with pytest.raises(FP8BackendError, match=r"on device cpu.*fp8_compute='auto'"):
            device_backend(backend, "cpu")
    with pytest.raises(ValueError, match="fp8_compute must be one of"):
        device_backend("fast", "cpu")


@pytest.fixture
def fake_cuda(monkeypatch):
    """A simulated CUDA device of a chosen capability (only the queries device_backend makes)."""

    def make(capability, triton=True, cuda_version="12.9"):
        monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
        monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
        monkeypatch.setattr(torch.version, "cuda", cuda_version)
        monkeypatch.setattr(torch.version, "hip", None)
        monkeypatch.setattr(scaled_mm, "cuda_capability", lambda device: capability)
        monkeypatch.setattr(w8a16, "triton_available", lambda: triton)
        dispatch._device_policy.cache_clear()

    yield make
    dispatch._device_policy.cache_clear()


def test_auto_picks_by_capability(fake_cuda):
    fake_cuda((9, 0))
    assert device_backend("auto", "cuda:0") == "scaled_mm"
    fake_cuda((9, 0), cuda_version="12.4")  # torch refuses the block-scaled recipe below cuBLASLt 12.9
    assert device_backend("auto", "cuda:0") == "w8a16"
    fake_cuda((8, 9))  # Ada: FP8 tensor cores, but torch's 1x128/128x128 recipe is SM90-only
    assert device_backend("auto", "cuda:0") == "w8a16"
    fake_cuda((8, 0))
    assert device_backend("auto", "cuda:0") == "w8a16"
    with pytest.raises(FP8BackendError, match=r"Fake GPU, compute capability 8\.0.*'w8a16'"):
        device_backend("scaled_mm", "cuda:0")
    with pytest.raises(FP8BackendError, match="CPU kernel"):
        device_backend("native", "cuda:0")
    fake_cuda((8, 0), triton=False)
    assert device_backend("auto", "cuda:0") == "dequant"
    with pytest.raises(FP8BackendError, match="triton is not installed"):
        device_backend("w8a16", "cuda:0")


def test_model_reports_its_fp8_backend(tiny_fp8):
    model = load(tiny_fp8)
    kinds = model.fp8_backend()
    assert "model.layers.*.mlp.experts.*.down_proj" in kinds and "model.layers.*.self_attn.kv_b_proj" in kinds
    from modeling_deepseekv3.fp8 import native

    assert set(kinds.values()) == ({"native"} if native.available() else {"dequant"})
    assert set(model.set_fp8_compute("dequant").fp8_backend().values()) == {"dequant"}
    with pytest.raises(FP8BackendError, match="device cpu"):
        model.set_fp8_compute("scaled_mm")
    assert model.config.fp8_compute == "dequant"  # a refused switch changes nothing
    asked = load(tiny_fp8, fp8_compute="w8a16")
    assert asked.config.fp8_compute == "w8a16"
    with torch.no_grad(), pytest.raises(FP8BackendError, match="w8a16"):
        asked(input_ids())
    with pytest.raises(ValueError, match="fp8_compute"):
        ds.DeepseekV3Config(fp8_compute="fp8_gemm")


# ------------------------------------------------------------------------------------------------- GPU
V3_SHAPES = [(7168, 2048), (2048, 7168), (576, 7168), (24576, 1536), (7168, 16384), (32768, 512)]  # (N, K)


def _gpu_backends():
    return [b for b in ("scaled_mm", "w8a16") if _runs(b)]


def _runs(backend):
    try:
        device_backend(backend, "cuda")
    except FP8BackendError:
        return False
    return True


@pytest.mark.gpu
@pytest.mark.parametrize("n,k", V3_SHAPES)
@pytest.mark.parametrize("rows", [1, 16, 512])
def test_each_gpu_backend_equals_its_twin_on_v3_shapes(n, k, rows):
    q, s = fp8_weight(n, k)
    q, s = q.cuda(), s.cuda()
    x = torch.randn(rows, k, device="cuda").bfloat16()
    ref = fp8_matmul_reference(x.float(), q, s, BLOCK)  # exact weight, fp32
    for backend in _gpu_backends():
        layer = FP8Linear(k, n, compute=backend, device="cuda")
        layer.weight.data.copy_(q)
        layer.weight_scale_inv.data.copy_(s)
        with torch.no_grad():
            out = layer(x)
        assert out.dtype == torch.bfloat16
        if backend == "w8a16":
            assert rel(out, ref.bfloat16()) <= 1e-3
        else:  # activation quantized per 1x128 tile: compare with the emulation of exactly that
            x_q, x_s = block_quantize(x, (1, 128))
            twin = _gemm_emulated(x_q, x_s, (1, 128), q, s, BLOCK, torch.float32)
            assert rel(out, twin) <= 5e-3 and rel(out, ref) <= 5e-2
        assert "_scaled_mm_scales" in layer.__dict__ or backend != "scaled_mm"  # prepared once, cached


@pytest.mark.gpu
def test_auto_on_this_gpu_and_grouped_fp8_experts(tiny_fp8, monkeypatch):
    """The model on this GPU's own backends, one layer at a time against each backend's twin. Layer by layer
    because a whole random-weight MoE model amplifies any rounding difference through near-tied routing (on an
    H200 the whole model's logits moved by 10% between scaled_mm and its exact twin, each GEMM by < 0.5%)."""
    model = load(tiny_fp8, dtype=torch.bfloat16).cuda()
    kinds = model.fp8_backend()
    expected = device_backend("auto", "cuda")
    assert kinds["model.layers.*.self_attn.o_proj"] in (expected, "dequant")
    with torch.no_grad():
        assert model(input_ids().cuda()).logits.isfinite().all()
        h = torch.randn(2, 12, model.config.hidden_size, device="cuda", dtype=torch.bfloat16)
        dense, moe = model.model.layers[0].mlp, model.model.layers[1].mlp
        if expected == "scaled_mm":  # activations quantized per 1x128 tile: twin = the same quantization in torch
            out = dense(h)
            monkeypatch.setattr(scaled_mm, "blockwise_scaled_mm", scaled_mm.blockwise_scaled_mm_emulated)
            assert rel(out, dense(h)) < 1e-2, "scaled_mm against its plain-torch twin"
            monkeypatch.undo()
        if w8a16.triton_available():  # weight-only: twin = dequant
            model.set_fp8_compute("w8a16")
            assert model.fp8_backend()["model.layers.*.mlp.experts.*.gate_proj"] == "w8a16_grouped"
            out = moe(h)
            assert model.model.layers[1].mlp.experts._fp8_stack is not None
            model.set_fp8_compute("dequant")
            assert rel(out, moe(h)) < 1e-2, "W8A16 with grouped experts against dequant"


@pytest.mark.gpu
def test_scaled_mm_runs_with_the_prepared_layouts_on_cuda():
    if not _runs("scaled_mm"):
        pytest.skip("no SM90 GPU with CUDA >= 12.9")
    x_q, x_s = block_quantize(torch.randn(256, 1024, device="cuda"), (1, 128))
    w_q, w_s = fp8_weight(768, 1024)
    w_q, w_s = w_q.cuda(), w_s.cuda()
    a = scaled_mm.prepare_scales(x_s, (1, 128))
    out = scaled_mm.blockwise_scaled_mm(x_q, a, w_q, scaled_mm.prepare_scales(w_s, BLOCK), BLOCK, torch.float32)
    twin = scaled_mm.blockwise_scaled_mm_emulated(
        x_q, a, w_q, scaled_mm.prepare_scales(w_s, BLOCK), BLOCK, torch.float32
    )
    assert rel(out, twin) < 5e-3
    assert F.scaled_mm is not None
