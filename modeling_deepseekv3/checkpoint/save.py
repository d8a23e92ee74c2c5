"""``save_pretrained`` in the official layout: FP8 tensors as they are, router bias FP32, the rest in the
storage dtype, published atomically."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .atomic import atomic_directory
from .headers import INDEX_NAME, SCALE_SUFFIX, SINGLE_NAME
from .remote_code import stamp_remote_code

__all__ = ["official_state_dict", "save_official", "storage_dtype_for"]


def storage_dtype_for(model) -> torch.dtype:
    """Dtype of non-FP8 tensors on disk: BF16 for FP8 models (the published layout), else the embedding's."""
    if model.config.is_fp8:
        return torch.bfloat16
    return model.get_input_embeddings().weight.dtype


def official_state_dict(model, storage_dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The model's tensors with official dtypes: float8 weights and float32 scales/router bias untouched
    (no copy), every other floating tensor in ``storage_dtype`` (copy only if the dtype differs)."""
    out = {}
    for key, tensor in model.state_dict().items():
        if tensor.dtype in (torch.float8_e4m3fn, torch.float8_e5m2) or key.endswith(SCALE_SUFFIX):
            out[key] = tensor
        elif key.endswith("e_score_correction_bias"):
            out[key] = tensor.to(torch.float32)
        elif tensor.is_floating_point():
            out[key] = tensor.to(storage_dtype)
        else:
            out[key] = tensor
    return out


def is_weight_file(name: str) -> bool:
    """A file of the weights (shards or index): replaced as a whole by a new save, never carried over."""
    return name in (SINGLE_NAME, INDEX_NAME) or (name.endswith(".safetensors") and name.startswith("model"))


def save_official(model, save_directory, storage_dtype, args, kwargs):
    """``save_pretrained`` body (see ``DeepseekV3PreTrainedModel.save_pretrained``). PEFT adapters and
    explicit ``state_dict=`` saves go to transformers unchanged."""
    if getattr(model, "_hf_peft_config_loaded", False) or kwargs.get("state_dict") is not None:
        return model._save_pretrained_transformers(save_directory, *args, **kwargs)
    target = Path(save_directory)
    if target.is_file():
        raise ValueError(f"save_pretrained: {target} is a file; pass a directory.")
    storage_dtype = storage_dtype or storage_dtype_for(model)
    state_dict = official_state_dict(model, storage_dtype)
    kwargs.setdefault("max_shard_size", "5GB")
    saved_dtype = model.config.dtype
    try:
        # files of an earlier save that this one does not write (a tokenizer, a README) are kept
        with atomic_directory(target, keep=lambda name: not is_weight_file(name)) as staging:
            model._save_pretrained_transformers(staging, *args, state_dict=state_dict, **kwargs)
            config_path = staging / "config.json"
            if config_path.is_file():
                cfg = json.loads(config_path.read_text())
                dtype_name = str(storage_dtype).removeprefix("torch.")
                cfg["torch_dtype"] = dtype_name
                cfg["dtype"] = dtype_name
                config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
                stamp_remote_code(staging)  # auto_map + shims: trust_remote_code tools reach this package
    finally:
        model.config.dtype = saved_dtype
