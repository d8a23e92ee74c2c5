"""Official-layout loading and saving, attached to the model from outside (``modeling.py`` mixes it in).

transformers' ``from_pretrained`` does the loading (mmap, zero-copy, Accelerate placement); this feature wraps
it with what the official DeepSeek checkpoints need and transformers does not do:

* before the skeleton is built: the checkout's index, shards and headers are checked
  (:func:`~.checkpoint.load.prepare_from_pretrained`), so a broken download fails naming the file;
* once the skeleton exists (meta device): every expected tensor against the headers
  (:func:`~.checkpoint.load.check_checkpoint_against_model`), so no half-random model is returned;
* after loading: FP8 stays FP8 and frozen, checked values, ``dequantize_fp8``, CPU-placed experts computing on
  the CPU, the FP8 backend in the load report (:func:`finalize_loaded_model`);
* ``save_pretrained`` writes the official layout back (:func:`~.checkpoint.save.save_official`).

``_load_pretrained_model`` is a private transformers method; ``PRIVATE_API`` records the signature it was
written against (checked by ``tests/unit/test_layout.py``).
"""

from __future__ import annotations

import torch

from .checkpoint import load as checkpoint_load
from .checkpoint.layout import skipped_mtp_key_patterns
from .checkpoint.save import save_official
from .fp8.cpu import use_native_heads
from .integrations.bitsandbytes import is_4bit_request, quantize_linears_4bit
from .placement import compute_cpu_experts_on_cpu

__all__ = ["PRIVATE_API", "OfficialCheckpointLoading", "finalize_loaded_model"]

PRIVATE_API = {
    "PreTrainedModel._load_pretrained_model": (
        "model",
        "state_dict",
        "checkpoint_files",
        "load_config",
        "expected_keys",
    ),
}


class OfficialCheckpointLoading:
    """``from_pretrained`` / ``save_pretrained`` for the official layout (module docstring)."""

    def post_init(self):
        # an MTP layer the config does not build (load_mtp=False) is skipped silently, not reported as unexpected;
        # post_init gathers these patterns from the submodels, so they are set before it runs
        self._keys_to_ignore_on_load_unexpected = skipped_mtp_key_patterns(self.config)
        super().post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' ``from_pretrained`` with the checkpoint checked first and FP8 kept as FP8.

        Before anything is built, a local checkout's index, shard files and safetensors headers are
        checked (missing or truncated shards fail here, naming the file). After the model skeleton
        exists, every expected tensor is checked against the shard headers (missing keys, FP8 weights
        without ``weight_scale_inv``, wrong shapes or dtypes) -- so no half-built model is returned.
        ``load_mtp`` defaults to loading the MTP layer only when the checkpoint has it."""
        kwargs = checkpoint_load.prepare_from_pretrained(cls, pretrained_model_name_or_path, kwargs)
        deferred_4bit = None
        if (
            is_4bit_request(kwargs.get("quantization_config"))
            and checkpoint_load.resolve_config(cls, pretrained_model_name_or_path, kwargs).is_fp8
        ):
            # transformers' bitsandbytes quantizer would cast the FP8 weights without their scales: load FP8, then
            # dequantize and 4-bit each projection ourselves
            deferred_4bit = kwargs.pop("quantization_config")
        loaded = super().from_pretrained(pretrained_model_name_or_path, *model_args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded  # output_loading_info=True: (model, info)
        finalize_loaded_model(model)
        if deferred_4bit is not None:  # FP8 checkpoint -> QLoRA base
            quantize_linears_4bit(model, deferred_4bit)
        return loaded

    @staticmethod
    def _load_pretrained_model(model, state_dict, checkpoint_files, load_config, expected_keys=None):
        if state_dict is None and checkpoint_files:
            checkpoint_load.check_checkpoint_against_model(model, checkpoint_files, load_config)
        parent = super(OfficialCheckpointLoading, type(model))._load_pretrained_model
        return parent(model, state_dict, checkpoint_files, load_config, expected_keys)

    def save_pretrained(self, save_directory, *args, storage_dtype: torch.dtype | None = None, **kwargs):
        """Write the official layout: FP8 weights and their FP32 scales as they are (untouched tensors
        are byte-identical), router bias FP32, everything else in ``storage_dtype`` (BF16 for FP8
        models, as published; otherwise the embedding's dtype), ``quantization_config`` and the legacy
        ``rope_scaling`` in config.json. Files are staged and moved into place only when complete."""
        return save_official(self, save_directory, storage_dtype, args, kwargs)

    def _save_pretrained_transformers(self, save_directory, *args, **kwargs):
        return super().save_pretrained(save_directory, *args, **kwargs)


def finalize_loaded_model(model) -> None:
    """After transformers loaded the weights: FP8 tensors never require grad (transformers re-wraps loaded params
    with ``requires_grad=True``) and compute in the embedding's dtype; tensor-parallel FP8 shards checked; values
    that would give plausible but wrong logits refused; ``dequantize_fp8`` honoured; CPU-mapped experts computing
    on the CPU in GPU+CPU layouts; dense output heads on the CPU streaming their weight at decode
    (:func:`~.fp8.cpu.use_native_heads`); the FP8 backend reported."""
    model.freeze_fp8_storage()
    compute_dtype = model.get_input_embeddings().weight.dtype
    for module in model.fp8_modules().values():
        module.compute_dtype = compute_dtype
    if (getattr(model, "_tp_size", None) or 1) > 1 and model.config.is_fp8:  # from_pretrained(tp_plan=...)
        from .distributed.tensor_parallel import check_fp8_shards  # torch.distributed.tensor: only under TP

        check_fp8_shards(model)
    checkpoint_load.check_loaded_values(model)
    if model.config.dequantize_fp8 and model.config.is_fp8:
        model.dequantize_fp8()
    compute_cpu_experts_on_cpu(model)
    use_native_heads(model)
    checkpoint_load.report_fp8_backend(model)
