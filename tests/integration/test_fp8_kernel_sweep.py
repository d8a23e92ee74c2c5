"""The native FP8 CPU kernels against their reference twins, the full sweep (slow: ~470 cases): every ISA variant
this CPU can run (AVX-512 machines test the AVX2 path too) x both shapes of work (streaming the weight, chunked
dequantization + BLAS) x float32 / bfloat16 x shapes with partial 128-blocks x 1-300 rows, plus ue8m0 scales,
non-contiguous inputs and NaN/Inf on every variant. The checks and the fast subset that runs with the unit tests:
tests/helpers.py, tests/unit/test_fp8_kernel.py.
"""

from __future__ import annotations

import pytest

from helpers import (
    DTYPE_IDS,
    DTYPES,
    HEAD_PATHS,
    HEAD_ROWS,
    HEADS,
    ISAS,
    LINEAR_PATHS,
    LINEAR_ROWS,
    SHAPES,
    check_dequantize_is_bit_identical_to_block_dequantize,
    check_head_matmul,
    check_linear,
    check_linear_on_non_contiguous_inputs,
    check_linear_with_ue8m0_scales,
    check_nan_and_inf_propagate_as_in_the_reference,
)
from modeling_deepseekv3.fp8 import native

if not native.load():
    pytest.skip(f"native FP8 kernel unavailable here: {native._state.get('error')}", allow_module_level=True)

pytestmark = pytest.mark.slow


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("path", LINEAR_PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("rows", LINEAR_ROWS)
def test_linear_equals_the_reference(isa, path, dtype, shape, rows):
    check_linear(isa, path, dtype, shape, rows)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("path", LINEAR_PATHS)
def test_linear_with_ue8m0_scales(isa, path):
    check_linear_with_ue8m0_scales(isa, path)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("path", LINEAR_PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_linear_on_non_contiguous_inputs(isa, path, dtype):
    check_linear_on_non_contiguous_inputs(isa, path, dtype)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("path", LINEAR_PATHS)
def test_nan_and_inf_propagate_as_in_the_reference(isa, path):
    check_nan_and_inf_propagate_as_in_the_reference(isa, path)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
def test_dequantize_is_bit_identical_to_block_dequantize(isa, shape):
    check_dequantize_is_bit_identical_to_block_dequantize(isa, shape)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("path", HEAD_PATHS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("heads", list(HEADS), ids=list(HEADS))
@pytest.mark.parametrize("rows", HEAD_ROWS)
def test_head_matmul_equals_the_reference(isa, path, dtype, heads, rows):
    """The absorbed MLA's two kv_b products per head: q_nope @ W_UK (transpose) and o_latent @ W_UV^T."""
    check_head_matmul(isa, path, dtype, heads, rows)
