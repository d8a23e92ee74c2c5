"""``from_pretrained`` hooks: checks before and after the skeleton is built, FP8 bookkeeping after loading.

Loading goes through transformers' own ``from_pretrained`` (mmap, zero-copy, Accelerate placement); this
module adds what transformers does not do for us:

* **Fail before building anything** on a broken checkout (:func:`~.headers.inspect_checkpoint_dir`).
* **Check every expected tensor** against the headers once the model skeleton exists (on the meta
  device): missing keys, an FP8 weight without its ``weight_scale_inv``, a scale of the wrong shape, a
  weight of the wrong shape or dtype. transformers would log a warning and random-initialize missing
  tensors, or silently cast a BF16 tensor into an FP8 parameter without any scale.
* **Keep FP8 as FP8** after loading (transformers re-wraps loaded float8 params with
  ``requires_grad=True``) and optionally dequantize (``dequantize_fp8=True``).
* **Check loaded values** (scales, router bias and weight, norms), those Accelerate's device maps offloaded to
  disk included: they are read from the offload store, where the forward will read them.
"""

from __future__ import annotations

import copy
import json
import os

import torch
from transformers import PreTrainedConfig
from transformers.utils import logging

from .headers import (
    INDEX_NAME,
    SCALE_SUFFIX,
    SIZE_FIELDS,
    CheckpointError,
    TensorInfo,
    check_sizes_against_keys,
    inspect_checkpoint_dir,
    read_checkpoint_tensors,
    stored_layers,
)
from .layout import mtp_layer_indices

logger = logging.get_logger(__name__)

__all__ = [
    "check_checkpoint_against_model",
    "check_dequantize_with_offload",
    "check_loaded_values",
    "prepare_from_pretrained",
    "report_fp8_backend",
    "resolve_config",
]

#: Task heads a checkpoint may legitimately lack (saved from the base model): initialized, not refused.
HEAD_KEYS = ("lm_head.weight",)


_HUB_KWARGS = ("cache_dir", "revision", "token", "local_files_only", "subfolder")


def _checkpoint_keys_for(path, kwargs) -> list[str] | None:
    """Tensor names of a local directory (full header check) or, for a Hub id, from its index."""
    if os.path.isdir(path):
        subfolder = kwargs.get("subfolder") or ""
        tensors = inspect_checkpoint_dir(os.path.join(path, subfolder))
        return None if tensors is None else list(tensors)
    try:
        from transformers.utils import cached_file

        download = {k: kwargs[k] for k in _HUB_KWARGS if k in kwargs}
        index = cached_file(path, INDEX_NAME, _raise_exceptions_for_missing_entries=False, **download)
    except Exception:  # a Hub problem here is reported properly by transformers a moment later
        return None
    if index is None:
        return None
    with open(index) as f:
        return list(json.load(f).get("weight_map", {}))


def _looks_local(path: str) -> bool:
    """A path meant for this disk rather than a Hub id: absolute, ./ ../ ~, or whose first folder exists here."""
    if path.startswith(("/", "./", "../", "~", ".\\")) or os.path.isabs(path):
        return True
    head = path.replace("\\", "/").split("/")[0]
    return "/" in path.replace("\\", "/") and os.path.isdir(head)


def check_local_checkout(path: str, subfolder: str = "") -> None:
    """Diagnose a local checkout before transformers does (its messages point at the Hub or at scales)."""
    if os.path.isfile(path):
        raise CheckpointError(
            f"{path} is a file; pass the checkpoint directory (the folder holding config.json and the shards)."
        )
    if not os.path.isdir(path):
        if _looks_local(path):
            raise CheckpointError(f"{path}: no such directory (it is not a Hub repo id either).")
        return
    directory = os.path.join(path, subfolder)
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise CheckpointError(f"{directory}: no config.json; a checkpoint directory needs the model's config.json.")
    try:
        with open(config_path, encoding="utf-8") as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{config_path}: not valid JSON ({exc}).") from None
    if not isinstance(raw, dict):
        raise CheckpointError(f"{config_path}: must hold a JSON object, got a {type(raw).__name__}.")
    absent = [k for k in ("hidden_size", "num_hidden_layers", "vocab_size") if k not in raw]
    if absent:
        raise CheckpointError(
            f"{config_path} lacks {', '.join(absent)}: without them it would describe the full 671B DeepSeek-V3 "
            "by default, not these weights. Restore the checkpoint's config.json."
        )
    names = os.listdir(directory)
    if not any(n.endswith(".safetensors") for n in names) and any(n.endswith((".bin", ".pt", ".pth")) for n in names):
        raise CheckpointError(
            f"{directory} holds PyTorch pickle weights (.bin) only. This package loads safetensors (no pickle is ever "
            "unpickled); convert them, e.g. with transformers' save_pretrained(safe_serialization=True)."
        )


def resolve_config(cls, path, kwargs: dict):
    """The config ``from_pretrained(path, **kwargs)`` will build with: ``kwargs["config"]`` when it is a config
    object, else read from that path (or ``path``) with the call's download options."""
    config = kwargs.get("config")
    if config is None or isinstance(config, (str, os.PathLike)):
        config = cls.config_class.from_pretrained(config or path, **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
    return config


def prepare_from_pretrained(cls, path, kwargs: dict) -> dict:
    """Pre-load checks; decides ``load_mtp`` when the caller did not (load MTP only if present).

    A config asking for more layers or experts than the checkpoint's tensor names hold is refused here, from the
    index alone: transformers builds the whole skeleton before any tensor is matched, and for a mistyped
    ``num_hidden_layers: 100000`` that took minutes and gigabytes before the missing tensors were reported."""
    kwargs = dict(kwargs)
    if path is not None:
        check_local_checkout(os.fspath(path), kwargs.get("subfolder") or "")

    if path is None:  # from_pretrained(None, config=..., state_dict=...): nothing on disk to check
        return kwargs
    keys = _checkpoint_keys_for(os.fspath(path), kwargs)
    if keys is None:
        return kwargs
    config = resolve_config(cls, path, kwargs)
    stored = stored_layers(keys)
    # the sizes transformers will build: config.json's, or overrides such as from_pretrained(path,
    # num_hidden_layers=2) (which transformers applies to a config it loads, not to a config object passed in)
    overridable = not isinstance(kwargs.get("config"), PreTrainedConfig)
    sizes = {name: kwargs[name] if overridable and name in kwargs else getattr(config, name) for name in SIZE_FIELDS}
    has_mtp = stored.holds_any(sizes["num_hidden_layers"], sizes["num_nextn_predict_layers"])
    load_mtp = bool(kwargs["load_mtp"]) if "load_mtp" in kwargs else bool(config.load_mtp) and has_mtp
    check_sizes_against_keys(stored, os.path.join(os.fspath(path), kwargs.get("subfolder") or ""), load_mtp, **sizes)
    if "load_mtp" in kwargs:
        return kwargs
    if config.num_nextn_predict_layers and config.load_mtp and not has_mtp:
        logger.info(
            "Checkpoint has no MTP layer (model.layers.%d.*): building the model without it.", config.num_hidden_layers
        )
        if "config" in kwargs:
            kwargs["config"] = copy.deepcopy(config)
            kwargs["config"].load_mtp = False
        else:
            kwargs["load_mtp"] = False
    return kwargs


def _describe_dtype_mismatch(key: str, expected: torch.dtype, found: TensorInfo) -> str | None:
    fp8 = torch.float8_e4m3fn
    if expected == fp8 and found.dtype != "F8_E4M3":
        return (
            f"{found.file}: {key!r} is {found.dtype} but the config's `quantization_config` describes an FP8 "
            "checkpoint, so an float8_e4m3fn weight is expected. Remove `quantization_config` from config.json "
            "for a BF16 checkpoint, or convert the weights with `deepseek-v3 convert --to fp8`."
        )
    if expected != fp8 and found.dtype.startswith("F8_"):
        return (
            f"{found.file}: {key!r} is {found.dtype} but the model expects a dense tensor. An FP8 checkpoint "
            "needs `quantization_config` (quant_method fp8, weight_block_size) in config.json."
        )
    if key.endswith(SCALE_SUFFIX) and found.dtype != "F32":
        return f"{found.file}: {key!r} is {found.dtype}; FP8 block scales must be F32."
    if expected.is_floating_point and (found.torch_dtype is None or not found.torch_dtype.is_floating_point):
        return f"{found.file}: {key!r} is {found.dtype} but a floating-point tensor is expected."
    return None


def check_checkpoint_against_model(model, checkpoint_files: list[str], load_config) -> None:
    """Compare the (meta-device) model's expected tensors with the shard headers; raise on any mismatch."""
    adapters = [str(f) for f in checkpoint_files if os.path.basename(str(f)).startswith("adapter_model")]
    if adapters:  # transformers' own adapter loading; compared as base weights it reads as "176 scales missing"
        raise CheckpointError(_adapter_message(os.path.dirname(adapters[0]) or "."))
    tensors = read_checkpoint_tensors(checkpoint_files)
    weight_map = (getattr(load_config, "sharded_metadata", None) or {}).get("weight_map") or {}
    for key, file in weight_map.items():
        if key not in tensors:
            raise CheckpointError(
                f"the checkpoint index maps {key!r} to {file!r}, but that shard does not contain it. "
                "Re-download the index and the shards."
            )
    prefix = model.base_model_prefix + "."
    is_base = not hasattr(model, model.base_model_prefix)
    if is_base:  # a DeepseekV3Model loaded from a ForCausalLM checkpoint: drop "model."
        tensors = {k[len(prefix) :] if k.startswith(prefix) else k: v for k, v in tensors.items()}
    elif tensors and not any(k.startswith(prefix) for k in tensors):
        tensors = {prefix + k: v for k, v in tensors.items()}
    tied = set(getattr(model, "all_tied_weights_keys", {}) or {}) if model.config.tie_word_embeddings else set()
    missing = []
    for key, param in model.state_dict(keep_vars=True).items():
        if key in tied:
            continue
        found = tensors.get(key)
        if found is None:
            missing.append(key)
            continue
        if tuple(param.shape) != found.shape:
            raise CheckpointError(
                f"{found.file}: {key!r} has shape {list(found.shape)} but this config needs {list(param.shape)}. "
                "The config.json does not describe these weights (check hidden_size, head dims, ranks, expert "
                "counts) or the file is from another model."
            )
        problem = _describe_dtype_mismatch(key, param.dtype, found)
        if problem:
            raise CheckpointError(problem)
        if key.endswith("e_score_correction_bias") and found.dtype != "F32":
            logger.warning(
                "%s: %s is %s; the official checkpoints store it in FP32 and BF16 rounding can change expert choices.",
                found.file,
                key,
                found.dtype,
            )
    heads = [k for k in missing if k in HEAD_KEYS]
    if heads and len(heads) == len(missing) and not is_base:
        # a base-model (DeepseekV3Model) checkpoint under a causal-LM class: transformers' convention is a
        # freshly initialized head plus a warning (and the key in the load report), not a refusal
        logger.warning(
            "The checkpoint has no %s (it was saved from a base model); it is newly initialized: train it before use.",
            ", ".join(heads),
        )
        missing = []
    if missing:
        raise CheckpointError(_missing_message(missing, tensors, model.config))


def _adapter_message(folder: str) -> str:
    return (
        f"{folder} holds a PEFT adapter (adapter_config.json, adapter_model.safetensors): LoRA weights, not this "
        "model's, which transformers' built-in adapter loading cannot place on this model. Save adapters into a "
        "folder of their own, not the base model's (move those two files out of it), load the base from its "
        "folder, then the adapter with PeftModel.from_pretrained(model, adapter_dir)."
    )


def _missing_message(missing: list[str], tensors: dict[str, TensorInfo], config) -> str:
    mtp = [k for k in missing if any(f"layers.{i}." in k for i in mtp_layer_indices(config))]
    shown = ", ".join(repr(k) for k in missing[:5])
    if mtp and len(mtp) == len(missing):  # the decoder is complete; only the MTP layer is absent
        return (
            f"the checkpoint lacks {len(missing)} tensors this config needs (e.g. {shown}). They all belong to the "
            "MTP layer: pass load_mtp=False to build the model without it."
        )
    stored = {int(k.split(".")[2]) for k in tensors if k.startswith("model.layers.") and k.split(".")[2].isdigit()}
    expected = config.num_hidden_layers + config.num_mtp_modules
    if stored and max(stored) + 1 < expected:  # the most common cause: config.json of another size
        return (
            f"the checkpoint lacks {len(missing)} tensors: its shards hold layers 0..{max(stored)} but config.json asks "
            f"for num_hidden_layers={config.num_hidden_layers} (+{config.num_mtp_modules} MTP). config.json does not "
            "describe these weights; restore the checkpoint's own config.json."
        )
    scales = [k for k in missing if k.endswith(SCALE_SUFFIX)]
    if scales:
        weight_key = scales[0][: -len(SCALE_SUFFIX)] + "weight"
        where = tensors[weight_key].file if weight_key in tensors else "the checkpoint"
        return (
            f"{where}: FP8 weight {weight_key!r} has no {SCALE_SUFFIX!r} companion ({len(scales)} scales missing "
            "in total). Without the block scales the FP8 codes are meaningless; the shards are incomplete or "
            "were written by a tool that dropped the scales."
        )
    return (
        f"the checkpoint lacks {len(missing)} tensors this config needs (e.g. {shown}). The shards are incomplete "
        "or config.json describes a different model."
    )


def report_fp8_backend(model) -> None:
    """The load report's FP8 line: which backend each kind of FP8 linear computes with (``model.fp8_backend()``).
    A backend the weights' device cannot run is a warning here (the model may still be moved) and an error at
    the first forward."""
    from ..fp8 import FP8BackendError

    if not model.fp8_modules():
        return
    try:
        kinds = model.fp8_backend()
    except FP8BackendError as err:
        logger.warning("FP8 compute: %s", err)
        return
    counts: dict[str, int] = {}
    for backend in kinds.values():
        counts[backend] = counts.get(backend, 0) + 1
    summary = ", ".join(f"{b} ({n} module kinds)" for b, n in sorted(counts.items()))
    logger.info("FP8 compute (fp8_compute=%r): %s; model.fp8_backend() lists them.", model.config.fp8_compute, summary)


def _offload_store(module):
    """The weights map of Accelerate's offload hook on ``module`` (``device_map`` with ``"disk"``, or ``"cpu"``
    beside accelerators), or None. Offloaded tensors sit on the meta device; this map is where the hook reads
    them from before each forward (the checkpoint's own shard, or ``offload_folder``)."""
    hook = getattr(module, "_hf_hook", None)
    for h in getattr(hook, "hooks", None) or ([hook] if hook is not None else []):  # SequentialHook holds several
        if getattr(h, "offload", False) and getattr(h, "weights_map", None) is not None:
            return h.weights_map
    return None


def _loaded_value(module, name: str) -> torch.Tensor | None:
    """``module.<name>`` as the forward will see it: the resident tensor, or for an offloaded (meta) one its value
    read from the offload store -- one small tensor at a time, the read each forward does anyway. None only for a
    meta tensor no hook can supply (a skeleton that was never loaded): nothing to check there."""
    tensor = getattr(module, name)
    if not tensor.is_meta:
        return tensor
    store = _offload_store(module)
    if store is None:
        return None
    try:
        return store[name]
    except KeyError:
        return None


def check_loaded_values(model) -> None:
    """Values that load fine and give plausible but wrong logits: FP8 block scales that are zero, negative or
    not finite, a non-finite router bias (both refused, naming the tensor); non-finite norms or router weights
    (warned). Only the small tensors are read: scales are 1/16384 of the weights.

    Tensors Accelerate offloaded (``device_map`` with ``"disk"``: meta tensors plus a hook) are checked too, read
    from the offload store the hook will read them from: a corrupt shard fails here, not as NaN logits later. Runs
    just before ``dequantize_fp8`` is applied, so it also refuses that option on offloaded FP8 weights
    (:func:`check_dequantize_with_offload`)."""
    from ..core.moe import TopkRouter
    from ..fp8 import FP8Linear

    check_dequantize_with_offload(model)

    def finite(module, tensor_name: str, positive: bool = False) -> bool:
        value = _loaded_value(module, tensor_name)
        return value is None or bool(torch.isfinite(value).all() and (not positive or (value > 0).all()))

    nonfinite = []
    for name, module in model.named_modules():
        if isinstance(module, FP8Linear):
            if not finite(module, "weight_scale_inv", positive=True):
                raise CheckpointError(
                    f"{name}.weight_scale_inv holds zero, negative or non-finite block scales: the FP8 weights would "
                    "decode to wrong values. The shard is corrupt; re-download it."
                )
        elif isinstance(module, TopkRouter):
            if not finite(module, "e_score_correction_bias"):
                raise CheckpointError(
                    f"{name}.e_score_correction_bias is not finite: expert selection would be arbitrary. The shard is "
                    "corrupt; re-download it."
                )
            if not finite(module, "weight"):
                nonfinite.append(f"{name}.weight")
        elif name.endswith("norm") and isinstance(getattr(module, "weight", None), torch.Tensor):
            if not finite(module, "weight"):
                nonfinite.append(f"{name}.weight")
    if nonfinite:
        logger.warning(
            "non-finite values in %d tensors (e.g. %s): outputs will be NaN. The checkpoint is corrupt.",
            len(nonfinite),
            nonfinite[0],
        )


def check_dequantize_with_offload(model) -> None:
    """``dequantize_fp8=True`` swaps every FP8 linear for a dense one. One whose weights Accelerate offloaded (meta,
    read from the shard as FP8 by a hook at each forward) would become a dense layer of meta weights that nothing
    fills: refused here, before the swap, instead of failing at the first forward."""
    if not (model.config.dequantize_fp8 and model.config.is_fp8):
        return
    offloaded = [name for name, module in model.fp8_modules().items() if module.weight.is_meta]
    if offloaded:
        raise ValueError(
            f"dequantize_fp8=True cannot dequantize the {len(offloaded)} FP8 linears the device map offloaded (e.g. "
            f"{offloaded[0]!r}): their FP8 weights stay where they were offloaded and are read at each forward. "
            "Load without dequantize_fp8 (offloaded FP8 layers compute in the model's dtype), give max_memory room "
            "for every weight, or offload a BF16 copy (`deepseek-v3 convert --to bf16`)."
        )
