"""Official-layout checkpoint I/O: header checks before loading, the official state dict on saving.

Loading goes through transformers' own ``from_pretrained`` (mmap, zero-copy, Accelerate placement); this
module adds what transformers does not do for us:

* **Fail before building anything** on a broken checkout: a shard named by the index that is not on disk,
  a truncated or corrupt safetensors file, an index naming a tensor its shard does not hold. Only the
  safetensors *headers* are read (a few hundred KB for the 163-shard V3 checkpoint).
* **Check every expected tensor** against the headers once the model skeleton exists (on the meta
  device): missing keys, an FP8 weight without its ``weight_scale_inv``, a scale of the wrong shape, a
  weight of the wrong shape or dtype. transformers would log a warning and random-initialize missing
  tensors, or silently cast a BF16 tensor into an FP8 parameter without any scale.
* **Keep FP8 as FP8** after loading (transformers re-wraps loaded float8 params with
  ``requires_grad=True``) and optionally dequantize (``dequantize_fp8=True``).
* **Save the official layout**, staged in a temporary directory and moved into place only when complete.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers.utils import logging

logger = logging.get_logger(__name__)

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
SCALE_SUFFIX = "weight_scale_inv"

# safetensors dtype strings -> torch dtypes (the ones a DeepSeek checkpoint can hold)
SAFETENSORS_DTYPES = {
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "BF16": torch.bfloat16,
    "F16": torch.float16,
    "F32": torch.float32,
    "F64": torch.float64,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointError(ValueError):
    """A checkpoint on disk does not match what the config describes; the message says what and where."""


@dataclass(frozen=True)
class TensorInfo:
    dtype: str  # safetensors dtype string, e.g. "F8_E4M3"
    shape: tuple[int, ...]
    file: str

    @property
    def torch_dtype(self) -> torch.dtype | None:
        return SAFETENSORS_DTYPES.get(self.dtype)


# Headers parsed once per (file, size, mtime): a load reads them before and after building the model.
_HEADER_CACHE: dict[tuple[str, int, int], dict[str, TensorInfo]] = {}
_HEADER_CACHE_FILES = 1024


def read_safetensors_header(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Parse a safetensors header and verify the file is complete; raise ``CheckpointError`` if not.

    Checks: 8-byte length prefix, valid JSON header, every tensor's byte range consistent with its
    dtype and shape, and the data section exactly as long as the header says (truncated downloads are
    the common failure)."""
    path = os.fspath(path)
    stat = os.stat(path)
    cache_key = (path, stat.st_size, stat.st_mtime_ns)
    if cache_key in _HEADER_CACHE:
        return _HEADER_CACHE[cache_key]
    size = stat.st_size
    hint = "Re-download or re-convert this file."
    with open(path, "rb") as f:
        prefix = f.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{path}: not a safetensors file ({size} bytes, no header). {hint}")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > size - 8 or header_len > 512 * 1024 * 1024:
            raise CheckpointError(
                f"{path}: corrupt or truncated safetensors file (header claims {header_len} bytes, file has "
                f"{size}). {hint}"
            )
        raw = f.read(header_len)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupt safetensors header ({exc}). {hint}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: corrupt safetensors header (not a JSON object). {hint}")
    data_len = size - 8 - header_len
    tensors: dict[str, TensorInfo] = {}
    end_max = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}. {hint}") from None
        torch_dtype = SAFETENSORS_DTYPES.get(dtype)
        if torch_dtype is not None:
            numel = 1
            for d in shape:
                numel *= d
            if end - start != numel * torch_dtype.itemsize:
                raise CheckpointError(
                    f"{path}: tensor {name!r} ({dtype} {list(shape)}) has {end - start} bytes of data, expected "
                    f"{numel * torch_dtype.itemsize}. {hint}"
                )
        end_max = max(end_max, end)
        tensors[name] = TensorInfo(dtype, shape, path)
    if end_max != data_len:
        what = "truncated" if end_max > data_len else "has trailing bytes"
        raise CheckpointError(
            f"{path}: file is {what}: the header describes {end_max} bytes of tensor data, the file holds "
            f"{data_len}. {hint}"
        )
    if len(_HEADER_CACHE) >= _HEADER_CACHE_FILES:
        _HEADER_CACHE.clear()
    _HEADER_CACHE[cache_key] = tensors
    return tensors


def inspect_checkpoint_dir(directory: str | os.PathLike) -> dict[str, TensorInfo] | None:
    """Check a local checkout's index and shards; return ``{key: TensorInfo}`` for every tensor.

    Returns None when the directory holds no safetensors weights (transformers then reports what it
    finds). Raises ``CheckpointError`` for a corrupt index, a missing shard, a corrupt/truncated shard,
    or an index entry whose shard lacks that tensor."""
    directory = Path(directory)
    index_path = directory / INDEX_NAME
    if index_path.is_file():
        try:
            index = json.loads(index_path.read_text())
            weight_map = index["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError
        except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError):
            raise CheckpointError(
                f"{index_path}: not a valid safetensors index (needs a JSON object with a `weight_map`)."
            ) from None
        by_file: dict[str, list[str]] = {}
        for key, file in weight_map.items():
            by_file.setdefault(file, []).append(key)
        tensors: dict[str, TensorInfo] = {}
        for file, keys in sorted(by_file.items()):
            shard = directory / file
            if not shard.is_file():
                raise CheckpointError(
                    f"{index_path} maps {len(keys)} tensors (e.g. {keys[0]!r}) to {file!r}, but {shard} does "
                    "not exist. The download is incomplete: fetch the missing shard."
                )
            header = read_safetensors_header(shard)
            for key in keys:
                if key not in header:
                    raise CheckpointError(
                        f"{index_path} says tensor {key!r} is in {file!r}, but that shard does not contain it. "
                        "The index and the shards come from different versions; re-download both."
                    )
                tensors[key] = header[key]
        return tensors
    single = directory / SINGLE_NAME
    if single.is_file():
        return dict(read_safetensors_header(single))
    return None


def read_checkpoint_tensors(files: list[str]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        if str(file).endswith(".safetensors"):
            tensors.update(read_safetensors_header(file))
    return tensors


# ----------------------------------------------------------------------------------------------------
# from_pretrained hooks


def mtp_layer_indices(config) -> range:
    return range(config.num_hidden_layers, config.num_hidden_layers + config.num_nextn_predict_layers)


def skipped_mtp_key_patterns(config) -> list[str]:
    """Regexes for checkpoint keys of MTP layers this model does not build (silently skipped on load)."""
    built = config.num_mtp_modules
    return [rf"layers\.{i}\." for i in mtp_layer_indices(config) if i >= config.num_hidden_layers + built]


def _has_mtp_keys(keys, config) -> bool:
    prefixes = tuple(f"model.layers.{i}." for i in mtp_layer_indices(config))
    return any(k.startswith(prefixes) for k in keys)


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


def prepare_from_pretrained(cls, path, kwargs: dict) -> dict:
    """Pre-load checks; decides ``load_mtp`` when the caller did not (load MTP only if present); sets
    aside a 4-bit bitsandbytes request for an FP8 checkpoint (applied after loading, see qlora.py)."""
    from .qlora import is_4bit_request

    kwargs = dict(kwargs)
    config = kwargs.get("config")

    def resolved_config():
        nonlocal config
        if config is None or isinstance(config, (str, os.PathLike)):
            config = cls.config_class.from_pretrained(config or path, **{k: kwargs[k] for k in _HUB_KWARGS if k in kwargs})
        return config

    if is_4bit_request(kwargs.get("quantization_config")) and resolved_config().is_fp8:
        kwargs["_deferred_4bit"] = kwargs.pop("quantization_config")
    keys = _checkpoint_keys_for(os.fspath(path), kwargs)
    if keys is None or "load_mtp" in kwargs:
        return kwargs
    config = resolved_config()
    if config.num_nextn_predict_layers and config.load_mtp and not _has_mtp_keys(keys, config):
        logger.info("Checkpoint has no MTP layer (model.layers.%d.*): building the model without it.", config.num_hidden_layers)
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
        tensors = {k[len(prefix):] if k.startswith(prefix) else k: v for k, v in tensors.items()}
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
                "%s: %s is %s; the official checkpoints store it in FP32 and BF16 rounding can change expert "
                "choices.", found.file, key, found.dtype
            )
    if missing:
        raise CheckpointError(_missing_message(missing, tensors, model.config))


def _missing_message(missing: list[str], tensors: dict[str, TensorInfo], config) -> str:
    scales = [k for k in missing if k.endswith(SCALE_SUFFIX)]
    if scales:
        weight_key = scales[0][: -len(SCALE_SUFFIX)] + "weight"
        where = tensors[weight_key].file if weight_key in tensors else "the checkpoint"
        return (
            f"{where}: FP8 weight {weight_key!r} has no {SCALE_SUFFIX!r} companion ({len(scales)} scales missing "
            "in total). Without the block scales the FP8 codes are meaningless; the shards are incomplete or "
            "were written by a tool that dropped the scales."
        )
    mtp = [k for k in missing if any(f"layers.{i}." in k for i in mtp_layer_indices(config))]
    shown = ", ".join(repr(k) for k in missing[:5])
    msg = f"the checkpoint lacks {len(missing)} tensors this config needs (e.g. {shown})."
    if len(mtp) == len(missing):
        msg += " They all belong to the MTP layer: pass load_mtp=False to build the model without it."
    else:
        msg += " The shards are incomplete or config.json describes a different model."
    return msg


def finalize_loaded_model(model) -> None:
    """FP8 tensors never require grad (transformers re-wraps loaded params with requires_grad=True);
    honour ``dequantize_fp8``; keep CPU-mapped experts computing on the CPU in GPU+CPU layouts."""
    compute_dtype = model.get_input_embeddings().weight.dtype
    for module in model.fp8_modules().values():
        module.weight.requires_grad_(False)
        module.weight_scale_inv.requires_grad_(False)
        module.compute_dtype = compute_dtype
    if getattr(model.config, "dequantize_fp8", False) and model.config.is_fp8:
        model.dequantize_fp8()
    compute_cpu_experts_on_cpu(model)


_EXPERT_KEY = re.compile(r"\.mlp\.experts\.\d+$")


def compute_cpu_experts_on_cpu(model) -> int:
    """In a device map that mixes GPUs and ``"cpu"``, Accelerate treats CPU entries as offloaded: their
    weights are copied to the GPU for every forward. For routed experts that is the wrong trade (V3: 8
    experts x 44 MB per token per layer over PCIe); instead each CPU-mapped expert gets its weights back
    in CPU RAM and a hook that runs it on the CPU (the activations move: 2 x 7168 values per token).
    Returns the number of experts changed."""
    device_map = getattr(model, "hf_device_map", None) or {}
    has_gpu = any(isinstance(d, int) or (isinstance(d, str) and d.startswith(("cuda", "xpu"))) for d in device_map.values())
    targets = [name for name, dev in device_map.items() if dev == "cpu" and _EXPERT_KEY.search(name)]
    if not has_gpu or not targets:
        return 0
    from accelerate.hooks import AlignDevicesHook, add_hook_to_module, remove_hook_from_module
    from accelerate.utils import set_module_tensor_to_device

    for name in targets:
        module = model.get_submodule(name)
        values = {}
        for sub_name, sub in module.named_modules():
            hook = getattr(sub, "_hf_hook", None)
            weights_map = getattr(hook, "weights_map", None)
            for pname, param in sub.named_parameters(recurse=False):
                full = f"{sub_name}.{pname}" if sub_name else pname
                if param.device.type == "meta":
                    if weights_map is None:
                        raise RuntimeError(f"{name}.{full} is on the meta device and its offload hook has no weights.")
                    values[full] = weights_map[pname]
                else:
                    values[full] = param.data
        remove_hook_from_module(module, recurse=True)
        for full, value in values.items():
            set_module_tensor_to_device(module, full, "cpu", value=value.to("cpu"))
        add_hook_to_module(module, AlignDevicesHook(execution_device=torch.device("cpu"), io_same_device=True))
    for module in model.fp8_modules().values():
        module.weight.requires_grad_(False)
        module.weight_scale_inv.requires_grad_(False)
    return len(targets)


# ----------------------------------------------------------------------------------------------------
# save_pretrained


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


def save_official(model, save_directory, storage_dtype, args, kwargs):
    if getattr(model, "_hf_peft_config_loaded", False) or kwargs.get("state_dict") is not None:
        return model._save_pretrained_transformers(save_directory, *args, **kwargs)
    target = Path(save_directory)
    if target.is_file():
        raise ValueError(f"save_pretrained: {target} is a file; pass a directory.")
    storage_dtype = storage_dtype or storage_dtype_for(model)
    state_dict = official_state_dict(model, storage_dtype)
    kwargs.setdefault("max_shard_size", "5GB")
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    saved_dtype = model.config.dtype
    try:
        model._save_pretrained_transformers(staging, *args, state_dict=state_dict, **kwargs)
        config_path = staging / "config.json"
        if config_path.is_file():
            cfg = json.loads(config_path.read_text())
            dtype_name = str(storage_dtype).removeprefix("torch.")
            cfg["torch_dtype"] = dtype_name
            cfg["dtype"] = dtype_name
            config_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        publish_directory(staging, target)
    finally:
        model.config.dtype = saved_dtype
        shutil.rmtree(staging, ignore_errors=True)


def publish_directory(staging: Path, target: Path) -> None:
    """Move a finished save from ``staging`` into ``target``: weights first, then the index, then the
    config, so an interrupted move never leaves a loadable-looking but incomplete checkout. Stale shards
    of an earlier save in ``target`` are removed."""
    target.mkdir(parents=True, exist_ok=True)
    new_files = sorted(p.name for p in staging.iterdir())
    for name in os.listdir(target):
        is_weights = name == SINGLE_NAME or name == INDEX_NAME or (name.startswith("model-") and name.endswith(".safetensors"))
        if is_weights and name not in new_files:
            os.remove(target / name)

    def rank(name: str) -> int:
        if name.endswith(".safetensors"):
            return 0
        if name == INDEX_NAME:
            return 1
        return 3 if name == "config.json" else 2

    for name in sorted(new_files, key=rank):
        os.replace(staging / name, target / name)
