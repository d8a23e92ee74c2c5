"""A compiled decode step: ``generate(cache_implementation="static", compile_config=...)`` compiles the model's
forward to one graph (``fullgraph=True``) on the CPU and gives eager ``generate()``'s tokens.

The routed experts run inside the graph as one opaque op (``torch.ops.deepseekv3.routed_experts``, calling back into
the eager paths): tested here with the FP8 native path and the plain dense path."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.configuration_utils import CompileConfig

from helpers import input_ids, load
from modeling_deepseekv3.core.moe import experts as experts_module


def _greedy(model, ids, mask=None, **kw):
    return model.generate(
        ids, attention_mask=mask, max_new_tokens=6, do_sample=False, eos_token_id=None, pad_token_id=0, **kw
    )


def _compiled(model, ids, mask=None, backend="aot_eager"):
    """Static-cache generate with a fullgraph compile config; asserts the decode step really ran compiled."""
    config = CompileConfig(fullgraph=True, dynamic=False, backend=backend, mode="default")
    torch._dynamo.reset()
    try:
        out = _greedy(model, ids, mask, cache_implementation="static", compile_config=config)
    finally:
        torch._dynamo.reset()
    assert hasattr(model, "_compiled_call"), "generate did not compile the decode step on the CPU"
    return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_fullgraph_static_decode_equals_eager_fp8(tiny_fp8, dtype):
    """FP8 weights on the native kernels: the compiled decode (fullgraph) gives eager generate()'s greedy tokens,
    for a batch with left padding."""
    model = load(tiny_fp8, dtype=dtype).eval()
    ids = input_ids(2, 7)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    eager = _greedy(model, ids, mask)
    compiled = _compiled(model, ids, mask)
    assert torch.equal(compiled, eager)


def test_fullgraph_static_decode_equals_eager_dense(tiny_fp8):
    """Dense (dequantized) fp32 weights: the experts' plain path, inside the graph through the same op."""
    model = load(tiny_fp8, dequantize_fp8=True).eval()
    ids = input_ids(1, 9)
    eager = _greedy(model, ids)
    compiled = _compiled(model, ids)
    assert torch.equal(compiled, eager)


@pytest.mark.slow
def test_inductor_compiled_decode_equals_eager(tiny_fp8):
    """The real compiler (inductor, C++ kernels for everything around the opaque ops) on the FP8 model."""
    model = load(tiny_fp8).eval()
    ids = input_ids(1, 9)
    eager = _greedy(model, ids)
    compiled = _compiled(model, ids, backend="inductor")
    assert torch.equal(compiled, eager)


def test_no_compile_without_a_compile_config(tiny_fp8):
    """A static cache alone does not compile on the CPU (no compile stall on first contact): compiling is asked for
    with ``compile_config``."""
    model = load(tiny_fp8).eval()
    _greedy(model, input_ids(1, 5), cache_implementation="static")
    assert not hasattr(model, "_compiled_call")


def test_routed_experts_op_is_a_well_formed_custom_op(tiny_fp8):
    """torch's own checks of the op (schema, fake kernel against the real one, no aliasing), on the FP8 layer."""
    experts = load(tiny_fp8).model.layers[1].mlp.experts
    counts_E = torch.tensor([3, 0, 5, 1, 0, 0, 9, 0, 0, 2, 0, 0, 0, 1, 0, 4])
    x_AD = torch.randn(int(counts_E.sum()), 256)
    name = experts_module._compiled_name(experts)
    with torch.no_grad():
        torch.library.opcheck(torch.ops.deepseekv3.routed_experts, (x_AD, counts_E, name))
        out = torch.ops.deepseekv3.routed_experts(x_AD, counts_E, name)
        assert torch.equal(out, experts._forward_eager(x_AD, counts_E))


def test_compiled_graph_calls_the_layer_by_name_and_copies_register(tiny_fp8):
    """A copy of the model is a layer the op can reach too; a name whose layer is gone is an error naming it."""
    import copy

    model = load(tiny_fp8).eval()
    twin = copy.deepcopy(model)
    for m in (model, twin):
        layer = m.model.layers[1].mlp.experts
        assert experts_module._COMPILED[experts_module._compiled_name(layer)] is layer
    with pytest.raises(RuntimeError, match="no longer exist"):
        torch.ops.deepseekv3.routed_experts(torch.randn(1, 256), torch.ones(16, dtype=torch.long), "experts@0")
