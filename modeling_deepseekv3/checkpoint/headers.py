"""safetensors checkpoints on disk: header parsing and the pre-load checks of a checkout.

Only the safetensors *headers* are read (a few hundred KB for the 163-shard V3 checkpoint): a shard named by
the index that is not on disk, a truncated or corrupt file, or an index naming a tensor its shard does not
hold all fail here, naming the file, before any model is built.
"""

from __future__ import annotations

import itertools
import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = [
    "INDEX_NAME",
    "SCALE_SUFFIX",
    "SINGLE_NAME",
    "CheckpointError",
    "TensorInfo",
    "inspect_checkpoint_dir",
    "read_checkpoint_tensors",
    "read_safetensors_header",
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
