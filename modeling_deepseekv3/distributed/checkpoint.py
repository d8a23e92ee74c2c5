"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP): model, optimizer and loop state.

DCP stores tensors by fully qualified name (``get_state_dict`` gives the optimizer state keyed by parameter
names, not by position), so a checkpoint written by one layout of ranks can be read by another; in a single
process it runs without a process group (``no_dist``). Each checkpoint is a directory
``checkpoints/step-NNNNNNN`` published atomically (``checkpoint.atomic``): a run killed while saving leaves
the previous checkpoint as the latest complete one, and a full disk fails the save, not the earlier state.
``meta.json`` beside the DCP files holds the human-readable identity of the run (config, data and tokenizer
fingerprints) that ``--resume`` checks before loading anything.
"""

from __future__ import annotations

import json
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..checkpoint.atomic import atomic_directory, publish_directory, remove_stale_leftovers, staging_path

__all__ = ["TrainingCheckpointError", "latest_checkpoint", "load_training_state", "read_meta", "save_training_state"]

META = "meta.json"
# optimizer state flattened to one key per parameter and field (``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``):
# pipeline ranks hold different parameter groups, and only per-parameter keys reshard across layouts
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_STEP_DIR = re.compile(r"^step-(\d{7})$")


class TrainingCheckpointError(ValueError):
    """A training checkpoint that cannot be resumed here; the message says what differs."""


def _single_process() -> bool:
    return not (dist.is_available() and dist.is_initialized())


@contextmanager
def _quiet_single_process():
    """DCP warns that it "assumes the intent is to save in a single process" -- which is the intent here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        yield


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"step-{step:07d}"


def latest_checkpoint(root: str | Path) -> Path | None:
    """The complete checkpoint with the highest step under ``root`` (unpublished staging dirs are hidden)."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = sorted((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / META).is_file())
    return steps[-1][1] if steps else None


def save_training_state(root: str | Path, step: int, model, optimizer, loop: dict, meta: dict) -> Path:
    """Write ``root/step-NNNNNNN``: DCP shards of the model, the optimizer, the RNG state and ``loop`` (the
    training loop's own JSON-serializable state: step, data position, history), plus ``meta.json``."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    target = step_dir(root, step)
    state = {"model": model_sd, "optim": optim_sd, "rng": torch.get_rng_state(), "loop": json.dumps(loop)}
    if _single_process():
        with atomic_directory(target) as staging:
            with _quiet_single_process():
                dcp.save(state, checkpoint_id=staging, no_dist=True)
            (staging / META).write_text(json.dumps({**meta, "step": step}, indent=1, sort_keys=True) + "\n")
        return target
    return _save_distributed(target, state, meta, step)


def _save_distributed(target: Path, state: dict, meta: dict, step: int) -> Path:
    """Every rank writes its shards into one staging directory (named by rank 0); rank 0 adds ``meta.json``
    and publishes it once all ranks are done. Any rank's failure fails the save on every rank, and the
    previous checkpoint stays the latest complete one."""
    rank0 = dist.get_rank() == 0
    staging = None
    if rank0:
        target.parent.mkdir(parents=True, exist_ok=True)
        remove_stale_leftovers(target)
        staging = staging_path(target)
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
    box = [str(staging) if staging else None]
    dist.broadcast_object_list(box, src=0)
    staging = Path(box[0])
    try:
        dcp.save(state, checkpoint_id=staging)  # collective: raises on every rank if any rank failed
        error = None
        if rank0:
            try:
                (staging / META).write_text(json.dumps({**meta, "step": step}, indent=1, sort_keys=True) + "\n")
                publish_directory(staging, target)
            except OSError as exc:
                error = f"{type(exc).__name__}: {exc}"
        box = [error]
        dist.broadcast_object_list(box, src=0)
        if box[0]:
            raise OSError(f"saving {target} failed on rank 0 ({box[0]}); the previous checkpoint is kept.")
    finally:
        if rank0:
            shutil.rmtree(staging, ignore_errors=True)
    return target


def read_meta(path: str | Path) -> dict:
    return json.loads((Path(path) / META).read_text())


def load_training_state(path: str | Path, model, optimizer) -> dict:
    """Load a checkpoint into ``model`` and ``optimizer`` in place, restore the RNG state, and return the
    loop state saved with it."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd, "rng": torch.get_rng_state(), "loop": ""}
    try:
        with _quiet_single_process():
            dcp.load(state, checkpoint_id=str(path), no_dist=_single_process())
    except Exception as exc:
        raise TrainingCheckpointError(
            f"{path}: cannot load this training checkpoint into the current model/optimizer ({type(exc).__name__}: "
            f"{exc}). It was written for another model config; start a new --output or drop --resume."
        ) from exc
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_OPTIONS)
    torch.set_rng_state(state["rng"])
    return json.loads(state["loop"])
