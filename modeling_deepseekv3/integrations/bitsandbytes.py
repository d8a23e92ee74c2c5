"""4-bit (bitsandbytes) bases for QLoRA, also from the FP8 checkpoints.

For a BF16 checkpoint, ``from_pretrained(path, quantization_config=BitsAndBytesConfig(load_in_4bit=True))``
is transformers' own bitsandbytes route: every ``nn.Linear`` -- the routed experts included, since they are
separate modules here -- becomes a ``Linear4bit``. FP8 checkpoints need one more step, because their
projections are ``FP8Linear`` (which bitsandbytes does not know): :func:`quantize_linears_4bit` replaces
them one at a time by ``Linear4bit`` holding the block-dequantized weight (so memory never holds more than
one dense layer extra). ``from_pretrained`` does this by itself when given a 4-bit ``BitsAndBytesConfig``
for an FP8 checkpoint. Router, embeddings, heads and MTP's ``eh_proj`` stay as they are, as in
transformers' own integration.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

from ..fp8 import FP8Linear

__all__ = ["is_4bit_request", "quantize_linears_4bit"]

_SKIP = ("lm_head", "shared_head", "eh_proj")


def is_4bit_request(quantization_config) -> bool:
    return quantization_config is not None and bool(getattr(quantization_config, "load_in_4bit", False))


@torch.no_grad()
def quantize_linears_4bit(model, quantization_config) -> int:
    """Replace every FP8 and dense projection inside the decoder blocks by a bitsandbytes ``Linear4bit``.
    Returns how many modules were replaced."""
    try:
        import bitsandbytes as bnb
    except ImportError as exc:
        raise ImportError("4-bit bases need bitsandbytes: pip install 'modeling_deepseekv3[bnb]'") from exc
    compute_dtype = getattr(quantization_config, "bnb_4bit_compute_dtype", None) or torch.float32
    quant_type = getattr(quantization_config, "bnb_4bit_quant_type", "nf4")
    double = bool(getattr(quantization_config, "bnb_4bit_use_double_quant", False))
    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, (FP8Linear, nn.Linear)) or any(s in name for s in _SKIP) or ".layers." not in name:
            continue
        if isinstance(module, bnb.nn.Linear4bit):
            continue
        if module.in_features % 64 or module.out_features % 32:
            # bitsandbytes' CPU kernels need whole 64-value blocks per row and rows in packs of 32 (every
            # DeepSeek-V3-family shape qualifies); keep such a projection dense
            warnings.warn(
                f"{name}: {module.out_features}x{module.in_features} does not fit bitsandbytes' 4-bit "
                "blocks (in % 64, out % 32); kept unquantized.",
                stacklevel=2,
            )
            if isinstance(module, FP8Linear):
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, module.to_dense(compute_dtype))
            continue
        weight = module.dequantized_weight(torch.float32) if isinstance(module, FP8Linear) else module.weight.float()
        device = weight.device
        layer = bnb.nn.Linear4bit(
            module.in_features,
            module.out_features,
            bias=module.bias is not None,
            compute_dtype=compute_dtype,
            quant_type=quant_type,
            compress_statistics=double,
            device="meta",
        )
        layer.weight = bnb.nn.Params4bit(
            weight.to(compute_dtype).cpu(), requires_grad=False, quant_type=quant_type, compress_statistics=double
        )
        if module.bias is not None:
            layer.bias = nn.Parameter(module.bias.detach().to(compute_dtype), requires_grad=False)
        layer = layer.to(device if device.type != "meta" else "cpu")
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, layer)
        count += 1
    model.config.fp8_quantization_config = None
    model.is_loaded_in_4bit = True
    return count
