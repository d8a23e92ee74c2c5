"""``deepseek-v3 convert``: FP8 <-> BF16 conversion of an official-layout checkpoint, shard by shard."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from transformers.utils import logging

from ..core.configuration import DeepseekV3PluginConfig
from ..fp8.format import FP8_DTYPE, block_dequantize, block_quantize, check_scale_fmt
from .atomic import publish_directory
from .headers import (
    INDEX_NAME,
    SCALE_SUFFIX,
    SINGLE_NAME,
    CheckpointError,
    inspect_checkpoint_dir,
    read_safetensors_header,
)
from .layout import checkpoint_layout
from .remote_code import REMOTE_CODE_FILES, stamp_remote_code
from .tiny import FP8_QUANTIZATION_CONFIG

logger = logging.get_logger(__name__)

__all__ = ["convert_checkpoint"]


def _read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.is_file():
        raise CheckpointError(f"{src}: no config.json; `convert` needs it to know the layout.")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"{path}: not valid JSON ({exc}).") from None


def convert_checkpoint(
    src: str | os.PathLike,
    dst: str | os.PathLike,
    *,
    to: str,
    scale_fmt: str | None = None,
    block_size: tuple[int, int] = (128, 128),
    device: str = "cpu",
    overwrite: bool = False,
    progress: bool = True,
) -> Path:
    """Convert an official-layout checkpoint between FP8 and BF16, one shard at a time.

    ``to="bf16"``: every float8 weight is block-dequantized with its ``weight_scale_inv`` (found through
    the index, whichever shard holds it) and rounded to BF16, as DeepSeek's ``fp8_cast_bf16`` does; the
    scales and ``quantization_config`` are dropped. ``to="fp8"``: every tensor the official layout
    stores as FP8 is quantized to float8_e4m3fn with fresh ``block_size`` scales (``scale_fmt="ue8m0"``
    gives V3.1's power-of-two scales); the rest is copied unchanged.

    Memory is bounded by one shard (never the whole model). Work happens in ``<dst>.partial``: each
    finished shard is written to a temporary name and renamed, so re-running the same command after an
    interruption resumes with the next shard; ``<dst>`` appears (by rename) only when everything,
    index and config included, is written. ``device`` may be any torch device ("cuda" is fastest; no
    FP8-capable GPU is needed)."""
    if to not in ("bf16", "fp8"):
        raise ValueError(f"`to` must be 'bf16' or 'fp8', got {to!r}.")
    check_scale_fmt(scale_fmt)
    src, dst = Path(src), Path(dst)
    real_src, real_dst = src.resolve(), dst.resolve()
    if real_src == real_dst or real_src.is_relative_to(real_dst) or real_dst.is_relative_to(real_src):
        raise ValueError(
            f"convert writes a new checkpoint next to the source: `dst` ({dst}) must be neither `src` ({src}) nor "
            "a directory inside it or containing it (replacing it would delete the source)."
        )
    if dst.exists() and not overwrite:
        raise FileExistsError(f"{dst} already exists; pass overwrite=True (--overwrite) to replace it.")
    config_dict = _read_config(src)
    source_config = DeepseekV3PluginConfig.from_dict(dict(config_dict))
    if to == "bf16" and not source_config.is_fp8:
        raise ValueError(f"{src} is not an FP8 checkpoint (its config.json has no FP8 quantization_config).")
    if to == "fp8" and source_config.is_fp8:
        raise ValueError(f"{src} is already an FP8 checkpoint.")
    tensors = inspect_checkpoint_dir(src)
    if tensors is None:
        raise CheckpointError(f"{src}: no {INDEX_NAME} or {SINGLE_NAME} found.")
    weight_map = {key: Path(info.file).name for key, info in tensors.items()}

    new_config = dict(config_dict)
    if to == "bf16":
        new_config.pop("quantization_config", None)
    else:
        quant = dict(FP8_QUANTIZATION_CONFIG, weight_block_size=list(block_size))
        if scale_fmt:
            quant["scale_fmt"] = scale_fmt
        new_config["quantization_config"] = quant
    new_config["torch_dtype"] = "bfloat16"
    new_config.pop("dtype", None)
    fp8_keys: set[str] = set()
    if to == "fp8":
        layout = checkpoint_layout(DeepseekV3PluginConfig.from_dict(dict(new_config)))
        fp8_keys = {k for k, spec in layout.items() if spec.dtype == FP8_DTYPE}
        unknown = sorted(set(weight_map) - set(layout))
        if unknown:
            logger.warning(
                "convert: %d tensors are not in the official layout and are copied as they are (e.g. %s).",
                len(unknown),
                unknown[0],
            )

    work = dst.parent / f"{dst.name}.partial"
    # what identifies the source: a resumed conversion must continue the same source, not a replaced one
    source = {
        name: [os.path.getsize(src / name), os.stat(src / name).st_mtime_ns]
        for name in sorted(set(weight_map.values()))
    }
    params = {
        "src": str(src.resolve()),
        "to": to,
        "scale_fmt": scale_fmt,
        "block_size": list(block_size),
        "source_shards": source,
    }
    params_file = work / ".convert-params.json"
    work.mkdir(parents=True, exist_ok=True)
    lock = _exclusive_lock(work / ".convert.lock", dst)  # held: no live conversion is writing into `work`
    try:
        _prepare_work_dir(work, src, params, overwrite)
    except BaseException:
        lock.close()
        raise

    handles: dict[str, object] = {}

    def handle(file: str):
        if file not in handles:
            handles[file] = safe_open(str(src / file), framework="pt", device="cpu")
        return handles[file]

    shard_files = sorted(set(weight_map.values()))
    new_map: dict[str, str] = {}
    total = 0
    from transformers.utils.logging import tqdm

    for file in tqdm(shard_files, desc=f"convert -> {to}", unit="shard", disable=not progress):
        out_path = work / file
        keys = [k for k, f in weight_map.items() if f == file]
        if out_path.is_file():  # finished in an earlier run (renamed only when complete)
            header = read_safetensors_header(out_path)
            new_map.update({k: file for k in header})
            total += sum(_nbytes(info) for info in header.values())
            continue
        out: dict[str, torch.Tensor] = {}
        for key in keys:
            if key.endswith(SCALE_SUFFIX) and to == "bf16":
                continue
            tensor = handle(file).get_tensor(key)
            if to == "bf16" and tensor.dtype == FP8_DTYPE:
                scale_key = key[: -len("weight")] + SCALE_SUFFIX
                if scale_key not in weight_map:
                    raise CheckpointError(f"{src / file}: FP8 weight {key!r} has no {SCALE_SUFFIX!r} companion.")
                scale = handle(weight_map[scale_key]).get_tensor(scale_key)
                block = source_config.fp8_block_size
                out[key] = block_dequantize(tensor.to(device), scale.to(device), block, torch.bfloat16).cpu()
            elif key in fp8_keys:
                q, s = block_quantize(tensor.to(device), block_size, scale_fmt)
                out[key] = q.cpu()
                out[key[: -len("weight")] + SCALE_SUFFIX] = s.cpu()
            else:
                out[key] = tensor
        tmp = work / (file + ".tmp")
        save_file(out, str(tmp), metadata={"format": "pt"})
        os.replace(tmp, out_path)
        new_map.update({k: file for k in out})
        total += sum(t.numel() * t.element_size() for t in out.values())
        del out
    handles.clear()

    for item in src.iterdir():  # tokenizer, generation config, remote-code files, README, ...
        if item.name in weight_map.values() or item.name in (INDEX_NAME, "config.json") or item.name.startswith("."):
            continue
        if item.is_file():
            shutil.copy2(item, work / item.name)
    if (src / INDEX_NAME).is_file():
        (work / INDEX_NAME).write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(new_map.items()))}, indent=2)
        )
    (work / "config.json").write_text(json.dumps(new_config, indent=2) + "\n")
    stamp_remote_code(work)  # auto_map + shims: trust_remote_code tools reach this package
    publish_directory(work, dst)
    # until published, the work dir carries its params file: a copy stopped at any point never looks complete
    (dst / params_file.name).unlink()
    (dst / ".convert.lock").unlink(missing_ok=True)
    lock.close()
    return dst


def _prepare_work_dir(work: Path, src: Path, params: dict, overwrite: bool) -> None:
    """Resume, restart or refuse the staging folder ``work`` (its lock is held, so its writer is gone).

    Same source and settings: resume. An unfinished conversion of another source or settings (its
    ``.convert-params.json`` marker says it is this package's): refused, unless ``overwrite`` -- then it is
    discarded with one log line (pretrain's export re-exports its BF16 source every run, so its mtimes always
    differ and a killed export would otherwise block every rerun). Files convert did not write are never deleted."""
    params_file = work / ".convert-params.json"
    try:
        saved = json.loads(params_file.read_text()) if params_file.is_file() else None
    except (json.JSONDecodeError, UnicodeDecodeError):
        saved = {}
    saved = saved if isinstance(saved, dict) or saved is None else {}
    own = {params_file.name, ".convert.lock", INDEX_NAME, "config.json", *REMOTE_CODE_FILES}
    for shards in (params["source_shards"], (saved or {}).get("source_shards") or {}):
        own.update(shards)
        own.update(f"{name}.tmp" for name in shards)
    own.update(item.name for item in src.iterdir() if item.is_file() and not item.name.startswith("."))
    foreign = sorted(p.name for p in work.iterdir() if p.name not in own or p.is_symlink() or not p.is_file())
    if foreign:
        raise FileExistsError(
            f"{work} is convert's staging folder for this destination, but holds {', '.join(foreign[:5])}, which "
            f"convert did not write; move those out of it (or delete {work}) and rerun."
        )
    if saved is None:
        if any(p.suffix == ".safetensors" for p in work.iterdir()):
            raise FileExistsError(
                f"{work} holds shards without convert's .convert-params.json marker (not a conversion this package "
                f"can resume); delete {work} to start over."
            )
        params_file.write_text(json.dumps(params))
        return
    if saved == params:
        logger.info("convert: resuming the unfinished conversion in %s.", work)
        return
    what = (
        "source shards changed since"
        if saved.get("source_shards") != params["source_shards"]
        else "settings differ from"
    )
    if not overwrite:
        raise FileExistsError(
            f"{work} holds an unfinished conversion, but the {what} that run; rerun with the same source and "
            f"settings to resume, or pass overwrite=True (--overwrite) to discard it and start over."
        )
    logger.warning("convert: discarding %s (the %s that interrupted run); starting over.", work, what)
    for item in work.iterdir():
        if item.name != ".convert.lock":
            item.unlink()
    params_file.write_text(json.dumps(params))


def _exclusive_lock(path: Path, dst: Path):
    """Hold an exclusive lock on ``path`` for the conversion; a second conversion into the same ``dst`` gets a
    clear error instead of interleaving shards."""
    import fcntl

    handle = open(path, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise FileExistsError(
            f"another conversion into {dst} is running (lock {path}); wait for it to finish."
        ) from None
    return handle


def _nbytes(info) -> int:
    n = 1
    for d in info.shape:
        n *= d
    return n * (info.torch_dtype.itemsize if info.torch_dtype is not None else 1)
