"""Tensor parallelism through transformers' own mechanism: ``from_pretrained(path, tp_plan="auto")`` under torchrun.

The plan itself is declared on the config (``base_model_tp_plan``: the SwiGLU MLPs, shared and routed experts
split their intermediate width; MLA stays replicated, as in native's plan), and ``FP8Linear`` asks for local
shards (``_hf_quantized_needs_local_tp``), so transformers shards an FP8 ``weight`` and its ``weight_scale_inv``
along the same dimension. That is only right when every rank's slice starts on a 128-block boundary: a
384-row weight over 2 ranks gives 192-row slices, and the second rank's rows 192-255 would be scaled by the
block that starts at 256. :func:`check_fp8_shards` refuses such a layout right after loading, on every rank,
before any forward; the per-call shape check of the FP8 kernel would otherwise fail on one rank only.
"""

from __future__ import annotations

import math

from torch.distributed.tensor import DTensor, Shard

__all__ = ["check_fp8_shards"]


def check_fp8_shards(model) -> None:
    """Raise ``ValueError`` naming the first FP8 linear whose tensor-parallel slices cut its scale blocks."""
    from ..fp8 import FP8Linear

    for name, module in model.named_modules():
        if not isinstance(module, FP8Linear) or not isinstance(module.weight, DTensor):
            continue
        weight = module.weight
        for placement, ranks in zip(weight.placements, weight.device_mesh.shape):
            if not isinstance(placement, Shard) or ranks == 1:
                continue
            dim = placement.dim % weight.ndim
            size, block = weight.shape[dim], module.block_size[dim]
            piece = math.ceil(size / ranks)
            if piece % block:
                what = ("rows", "output") if dim == 0 else ("columns", "input")
                raise ValueError(
                    f"tp_plan splits {name} ({size} {what[0]}, its {what[1]} width) over {ranks} ranks into "
                    f"{piece}-{what[0][:-1]} slices, which cut its {block}-wide FP8 scale blocks. Use a tensor-parallel "
                    f"size that divides {size} into multiples of {block} (DeepSeek-V3's 2048 / 18432 widths do for 2-16), "
                    "or convert the checkpoint to BF16 first (`deepseek-v3 convert SRC DST --to bf16`)."
                )
