"""safetensors checkpoints on disk: header parsing and the pre-load checks of a checkout.

Only the safetensors *headers* are read (a few hundred KB for the 163-shard V3 checkpoint): a shard named by
the index that is not on disk, a truncated or corrupt file, or an index naming a tensor its shard does not
hold all fail here, naming the file, before any model is built.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import struct
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "INDEX_NAME",
    "SCALE_SUFFIX",
    "SINGLE_NAME",
    "SIZE_FIELDS",
    "CheckpointError",
    "StoredLayers",
    "TensorInfo",
    "check_sizes_against_keys",
    "inspect_checkpoint_dir",
    "read_checkpoint_tensors",
    "read_safetensors_header",
    "stored_layers",
]

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
                f"{path}: not a safetensors file, or a corrupt/truncated one (its header length does not fit the "
                f"{size}-byte file). {hint}"
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
    spans: list[tuple[int, int, str]] = []
    end_max = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{path}: corrupt header entry for tensor {name!r}. {hint}") from None
        if not 0 <= start <= end:
            raise CheckpointError(f"{path}: tensor {name!r} has invalid data offsets [{start}, {end}). {hint}")
        spans.append((start, end, name))
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
    spans.sort()
    for (_, prev_end, prev), (start, _, name) in itertools.pairwise(spans):
        if start < prev_end:
            raise CheckpointError(f"{path}: tensors {prev!r} and {name!r} overlap in the file's data section. {hint}")
    if end_max != data_len:
        what = "is truncated" if end_max > data_len else "has trailing bytes"
        raise CheckpointError(
            f"{path}: the file {what}: the header describes {end_max} bytes of tensor data, the file holds "
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
    single = directory / SINGLE_NAME
    if index_path.is_file() and single.is_file():
        raise CheckpointError(
            f"{directory} holds both {SINGLE_NAME} and {INDEX_NAME}: transformers would load the single file while "
            "the index describes other shards. Remove whichever is stale (a re-save leaves only one)."
        )
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
            if not isinstance(file, str) or not _is_local_name(file):
                raise CheckpointError(
                    f"{index_path} maps {key!r} to {file!r}, a path outside the checkout; shard names must be "
                    "file names inside the checkpoint directory. The index is corrupt or not from this checkpoint."
                )
            by_file.setdefault(file, []).append(key)
        tensors: dict[str, TensorInfo] = {}
        headers: dict[str, dict[str, TensorInfo]] = {}
        for file, keys in sorted(by_file.items()):
            shard = directory / file
            if not shard.is_file():
                raise CheckpointError(
                    f"{index_path} maps {len(keys)} tensors (e.g. {keys[0]!r}) to {file!r}, but {shard} does "
                    "not exist. The download is incomplete: fetch the missing shard."
                )
            header = headers[file] = read_safetensors_header(shard)
            for key in keys:
                if key not in header:
                    raise CheckpointError(
                        f"{index_path} says tensor {key!r} is in {file!r}, but that shard does not contain it. "
                        "The index and the shards come from different versions; re-download both."
                    )
                tensors[key] = header[key]
        for file, header in headers.items():  # a tensor in two shards: loaders disagree on which copy wins
            for key in header:
                named = weight_map.get(key)
                if named is not None and named != file:
                    raise CheckpointError(
                        f"tensor {key!r} is stored in both {directory / named} and {directory / file} (the index names "
                        f"{named!r}); which copy loads would depend on the loader. Re-download or re-save the checkpoint."
                    )
        return tensors
    if single.is_file():
        return dict(read_safetensors_header(single))
    return None


def _is_local_name(file: str) -> bool:
    """A shard name that stays inside the checkout: relative, no ``..`` (a symlinked shard, as in the Hugging
    Face cache, is fine: the link itself is inside)."""
    path = Path(file)
    return bool(file) and not path.is_absolute() and ".." not in path.parts and not file.startswith("~")


def read_checkpoint_tensors(files: list[str]) -> dict[str, TensorInfo]:
    tensors: dict[str, TensorInfo] = {}
    for file in files:
        if str(file).endswith(".safetensors"):
            tensors.update(read_safetensors_header(file))
    return tensors


# ----------------------------------------------------------------------------------------------
# Sizes from key names alone: a config.json whose layer or expert count the checkpoint cannot fill is refused
# before transformers builds the model skeleton (which, for a mistyped 100000 layers, takes minutes and
# gigabytes before the missing tensors are noticed).

# "model.layers.N.<part>" (causal LM) or "layers.N.<part>" (saved from the base model)
_LAYER_KEY = re.compile(r"(?:model\.)?layers\.(\d+)\.(.+)")
_EXPERT_PART = re.compile(r"mlp\.experts\.(\d+)\.")
# modules only an MTP layer has (spec: its input norms, the projection of [embedding; hidden], its head)
_MTP_PARTS = ("enorm.", "hnorm.", "eh_proj.", "shared_head.")


@dataclass(frozen=True)
class StoredLayers:
    """What a checkpoint's tensor names say about its depth and width; no tensor is read."""

    decoder: frozenset[int]  # indices of decoder layers
    mtp: frozenset[int]  # indices of MTP layers (those holding enorm / hnorm / eh_proj / shared_head)
    experts: int  # one past the highest routed-expert index any layer stores (0: no per-expert keys)

    @property
    def indices(self) -> frozenset[int]:
        return self.decoder | self.mtp

    def holds_any(self, first: int, count: int) -> bool:
        """Whether any layer ``first <= i < first + count`` is stored (where the config puts its MTP layers)."""
        if not (_is_count(first) and _is_count(count)):
            return False
        return any(first <= i < first + count for i in self.indices)

    @property
    def decoder_depth(self) -> int:
        """One past the highest decoder layer: what num_hidden_layers can be (gaps are reported after building)."""
        return max(self.decoder) + 1 if self.decoder else 0


def stored_layers(keys: Iterable[str]) -> StoredLayers:
    """Layer indices (decoder vs MTP) and routed experts per layer named by ``keys`` (an index's weight_map)."""
    layers: set[int] = set()
    mtp: set[int] = set()
    experts = -1
    for key in keys:
        match = _LAYER_KEY.match(key)
        if match is None:
            continue
        index, part = int(match.group(1)), match.group(2)
        layers.add(index)
        if part.startswith(_MTP_PARTS):
            mtp.add(index)
        expert = _EXPERT_PART.match(part)
        if expert is not None:
            experts = max(experts, int(expert.group(1)))
    return StoredLayers(decoder=frozenset(layers - mtp), mtp=frozenset(mtp), experts=experts + 1)


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


#: The config fields :func:`check_sizes_against_keys` compares with the checkpoint.
SIZE_FIELDS = ("num_hidden_layers", "num_nextn_predict_layers", "n_routed_experts")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")


def _span(indices: frozenset[int]) -> str:
    return f"{min(indices)}..{max(indices)}" if len(indices) > 1 else str(min(indices))


def check_sizes_against_keys(
    stored: StoredLayers,
    where: str | os.PathLike,
    load_mtp: bool,
    *,
    num_hidden_layers: int,
    num_nextn_predict_layers: int,
    n_routed_experts: int,
) -> None:
    """Raise ``CheckpointError`` when the config asks for more decoder layers, MTP layers or routed experts per
    layer than the checkpoint stores; each message names the config.json field, both numbers and the fix.

    Fewer is left to the checks after the skeleton exists (cheap then, and a shallower model is a legitimate
    request). A checkpoint with no layer keys at all is not judged here (its names are not this layout's), nor
    are sizes that are not integers (config validation names those)."""
    sizes = (num_hidden_layers, num_nextn_predict_layers, n_routed_experts)
    if not stored.indices or not all(_is_count(v) for v in sizes):
        return
    where = os.path.normpath(where)
    elsewhere = "or load the directory these weights belong to. Refused before building the model."
    if num_hidden_layers > stored.decoder_depth:
        decoder = f"layers.{_span(stored.decoder)}" if stored.decoder else "none"
        mtp = f" and {_count(len(stored.mtp), 'MTP layer')} (layers.{_span(stored.mtp)})" if stored.mtp else ""
        raise CheckpointError(
            f"{where}: its shards hold layers 0..{max(stored.indices)} but config.json asks for "
            f"num_hidden_layers={num_hidden_layers}: the checkpoint has {_count(stored.decoder_depth, 'decoder layer')} "
            f"({decoder}){mtp}. config.json's `num_hidden_layers` does not describe these weights: set it to "
            f"{stored.decoder_depth} (restore the checkpoint's own config.json), {elsewhere}"
        )
    wanted_mtp = num_nextn_predict_layers if load_mtp else 0
    if wanted_mtp > len(stored.mtp):
        held = f"{_count(len(stored.mtp), 'MTP layer')} (layers.{_span(stored.mtp)})" if stored.mtp else "no MTP layer"
        raise CheckpointError(
            f"{where}: config.json's `num_nextn_predict_layers` is {num_nextn_predict_layers} but the checkpoint "
            f"stores {held}. Pass load_mtp=False to build the model without MTP, set `num_nextn_predict_layers` to "
            f"{len(stored.mtp)} (restore the checkpoint's own config.json), {elsewhere}"
        )
    if stored.experts and n_routed_experts > stored.experts:
        raise CheckpointError(
            f"{where}: config.json's `n_routed_experts` is {n_routed_experts} but the checkpoint stores "
            f"{_count(stored.experts, 'routed expert')} per MoE layer (mlp.experts.0..{stored.experts - 1}). "
            f"config.json does not describe these weights: set `n_routed_experts` to {stored.experts} (restore the "
            f"checkpoint's own config.json), {elsewhere}"
        )
