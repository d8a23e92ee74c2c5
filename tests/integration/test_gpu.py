"""GPU twins of the CPU paths (run only where CUDA is present; CI has none). These pin the dequant path, which
is exact against the CPU; the GPU backends (scaled_mm, w8a16) are tested in tests/unit/test_fp8_gpu_backends.py."""

from __future__ import annotations

import pytest
import torch

import modeling_deepseekv3 as ds
from helpers import input_ids, load
from modeling_deepseekv3.fp8 import FP8Linear

pytestmark = pytest.mark.gpu


def test_fp8_linear_on_cuda_matches_cpu():
    layer = FP8Linear(576, 320, compute="dequant")
    layer.set_dense_weight(torch.randn(320, 576))
    x = torch.randn(4, 576)
    ref = layer(x)
    layer.to("cuda")
    assert layer.weight.dtype == torch.float8_e4m3fn and layer.weight.device.type == "cuda"
    torch.testing.assert_close(layer(x.cuda()).cpu(), ref, rtol=1e-4, atol=1e-4)


def test_convert_on_cuda_gives_the_cpu_bytes(tiny_fp8, tmp_path):
    from safetensors.torch import load_file

    cpu = ds.convert_checkpoint(tiny_fp8, tmp_path / "cpu", to="bf16", progress=False)
    gpu = ds.convert_checkpoint(tiny_fp8, tmp_path / "gpu", to="bf16", device="cuda", progress=False)
    for f in sorted(cpu.glob("*.safetensors")):
        a, b = load_file(f), load_file(gpu / f.name)
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_model_on_cuda_matches_cpu(tiny_fp8):
    model = load(tiny_fp8, fp8_compute="dequant")
    ids = input_ids()
    with torch.no_grad():
        ref = model(ids).logits
        model.to("cuda")
        out = model(ids.cuda()).logits.cpu()
    assert all(p.dtype == torch.float8_e4m3fn for n, p in model.named_parameters() if n.endswith("up_proj.weight"))
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)
