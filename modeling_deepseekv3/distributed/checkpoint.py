"""Training checkpoints with ``torch.distributed.checkpoint`` (DCP): model, optimizer and loop state.

DCP stores tensors by fully qualified name (``get_state_dict`` gives the optimizer state keyed by parameter
names, not by position), so a checkpoint written by one layout of ranks can be read by another; in a single
process it runs without a process group (``no_dist``). Each checkpoint is a directory
``checkpoints/step-NNNNNNN`` published atomically (``checkpoint.atomic``): a run killed while saving leaves
the previous checkpoint as the latest complete one, and a full disk fails the save, not the earlier state.
``meta.json`` beside the DCP files holds the human-readable identity of the run (config, data and tokenizer
fingerprints) that ``--resume`` checks before loading anything, and the sha256 of every file DCP wrote.

Loading trusts nothing it has not checked. Before DCP reads a byte, every file is hashed against ``meta.json``
(a flipped bit would otherwise resume silently with other weights), and the error names the newest checkpoint
that is still intact. DCP's own reader would then ``pickle.load`` its ``.metadata`` and ``torch.load`` the
non-tensor values with ``weights_only=False``; both would run code from a crafted folder. Here ``.metadata`` is
read by an unpickler that only builds DCP's metadata records (an allow-list: dataclasses of
``torch.distributed.checkpoint.metadata``, ``torch.Size``, dtypes, layouts, paths) and the values load with
``weights_only=True``. The checksums guard against damage, not against someone who can rewrite the folder
(they can rewrite ``meta.json`` too): such a person still chooses the weights, only not the code that runs.
"""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import re
import shutil
import warnings
from contextlib import contextmanager
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from ..checkpoint.atomic import atomic_directory, publish_directory, remove_stale_leftovers, staging_path

__all__ = [
    "TrainingCheckpointError",
    "TrainingCheckpointSaveError",
    "latest_checkpoint",
    "load_training_state",
    "newest_intact_checkpoint",
    "read_meta",
    "save_training_state",
    "verify_training_state",
]

META = "meta.json"
# optimizer state flattened to one key per parameter and field (``state.<fqn>.exp_avg``, ``param_groups.<fqn>.lr``):
# pipeline ranks hold different parameter groups, and only per-parameter keys reshard across layouts
_OPTIONS = StateDictOptions(flatten_optimizer_state_dict=True)
_STEP_DIR = re.compile(r"^step-(\d{7})$")


class TrainingCheckpointError(ValueError):
    """A training checkpoint that cannot be resumed here; the message says what differs."""


class TrainingCheckpointSaveError(TrainingCheckpointError, OSError):
    """Writing a checkpoint failed (full disk, I/O error, a rank's DCP failure). Also an ``OSError``, which is
    what callers catching disk trouble expect; the message names the step and the checkpoint to resume from."""


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
    steps = sorted(
        (int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / META).is_file()
    )
    return steps[-1][1] if steps else None


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _write_meta(staging: Path, meta: dict, step: int) -> None:
    """``meta.json`` last, with the sha256 of every file DCP wrote beside it (checked before any resume)."""
    files = {p.name: _sha256(p) for p in sorted(staging.iterdir()) if p.is_file() and _PLAIN_NAME.match(p.name)}
    record = {**meta, "step": step, "files": files}
    (staging / META).write_text(json.dumps(record, indent=1, sort_keys=True) + "\n")


def _failure_text(exc: BaseException) -> str:
    """One line for an error: DCP's ``CheckpointException`` carries each rank's exception with a traceback in
    its ``str``; only the ranks and their exceptions' first lines are kept."""
    if isinstance(exc, CheckpointException):
        parts = []
        for rank, failure in sorted(exc.failures.items()):
            inner = failure[0] if isinstance(failure, tuple) else failure
            parts.append(f"rank {rank}: {_failure_text(inner)}")
        return "; ".join(parts) or "DCP reported a failure"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}".rstrip(": ")


def _underlying(exc: BaseException) -> list[BaseException]:
    if isinstance(exc, CheckpointException):
        return [f[0] if isinstance(f, tuple) else f for f in exc.failures.values()]
    return [exc]


def save_training_state(root: str | Path, step: int, model, optimizer, loop: dict, meta: dict) -> Path:
    """Write ``root/step-NNNNNNN``: DCP shards of the model, the optimizer, the RNG state and ``loop`` (the
    training loop's own JSON-serializable state: step, data position, history), plus ``meta.json``.

    A failure (full disk, I/O error, DCP's ``CheckpointException`` -- a ``BaseException`` that would escape
    ordinary handlers as a multi-line traceback) becomes one :class:`TrainingCheckpointSaveError` naming the
    step and the newest intact checkpoint; the earlier checkpoints are untouched (the write was staged)."""
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    target = step_dir(root, step)
    state = {"model": model_sd, "optim": optim_sd, "rng": torch.get_rng_state(), "loop": json.dumps(loop)}
    try:
        if _single_process():
            with atomic_directory(target) as staging:
                with _quiet_single_process():
                    dcp.save(state, checkpoint_id=staging, no_dist=True)
                _write_meta(staging, meta, step)
            return target
        return _save_distributed(target, state, meta, step)
    except (OSError, CheckpointException) as exc:
        intact = newest_intact_checkpoint(root)
        raise TrainingCheckpointSaveError(
            f"saving the checkpoint of step {step} ({target}) failed: {_failure_text(exc)}. Nothing of it was kept; "
            f"the newest intact checkpoint is {intact or 'none (nothing saved yet)'}"
            + (" (--resume continues from it)." if intact else ".")
        ) from exc


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
                _write_meta(staging, meta, step)
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


def _damage(path: Path) -> str | None:
    """Why the checkpoint at ``path`` is not the one its ``meta.json`` describes (None: every file matches)."""
    try:
        meta = read_meta(path)
    except (OSError, ValueError) as exc:
        return f"{path / META} cannot be read ({_failure_text(exc)})"
    files = meta.get("files") if isinstance(meta, dict) else None
    if not isinstance(files, dict) or ".metadata" not in files:
        return (
            f"{path / META} records no sha256 of the checkpoint's files (written by an older version, or edited), "
            "so nothing proves its bytes are the ones saved"
        )
    for name, digest in sorted(files.items()):
        file = path / name
        if not _PLAIN_NAME.match(name) or not isinstance(digest, str):
            return f"{path / META} lists {name!r}, which is not a file this checkpoint writes"
        if file.is_symlink() or not file.is_file():
            return f"{file} is missing"
        if _sha256(file) != digest:
            return f"{file} changed since it was written (its sha256 differs from the one in {path / META})"
    return None


def newest_intact_checkpoint(root: str | Path, below: int | None = None) -> Path | None:
    """The highest-step checkpoint under ``root`` (below step ``below``, if given) whose files all match."""
    root = Path(root)
    if not root.is_dir():
        return None
    steps = sorted(
        ((int(m.group(1)), p) for p in root.iterdir() if (m := _STEP_DIR.match(p.name)) and (p / META).is_file()),
        reverse=True,
    )
    for step, path in steps:
        if (below is None or step < below) and _damage(path) is None:
            return path
    return None


def verify_training_state(path: str | Path) -> None:
    """Raise :class:`TrainingCheckpointError` unless every file of the checkpoint matches its recorded sha256;
    the message names the damaged file and the newest older checkpoint that is intact."""
    path = Path(path)
    problem = _damage(path)
    if problem is None:
        return
    m = _STEP_DIR.match(path.name)
    older = newest_intact_checkpoint(path.parent, below=int(m.group(1))) if m else None
    if older is not None:
        hint = (
            f"the newest intact checkpoint is {older} (step {int(_STEP_DIR.match(older.name).group(1))}): move "
            f"{path.name} and any newer step folder out of {path.parent} to resume from it"
        )
    else:
        hint = "no older checkpoint is intact; start over without --resume (with --overwrite, or in a new --output)"
    raise TrainingCheckpointError(f"--resume: {problem}. Refusing to load {path}; {hint}.")


_PLAIN_NAME = re.compile(r"^(\.metadata|__\d+_\d+\.distcp)$")
# what DCP's ``.metadata`` pickle may build: its own records and the torch/pathlib values inside them
_METADATA_CLASSES = {
    "torch.distributed.checkpoint.metadata": {
        "Metadata",
        "TensorStorageMetadata",
        "BytesStorageMetadata",
        "TensorProperties",
        "ChunkStorageMetadata",
        "MetadataIndex",
        "StorageMeta",
        "_MEM_FORMAT_ENCODING",
    },
    "torch.distributed.checkpoint.filesystem": {"_StorageInfo"},
    "torch": {"Size"},
    "torch.serialization": {"_get_layout"},
    "pathlib": {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath"},
    "collections": {"OrderedDict"},
}


class _MetadataUnpickler(pickle.Unpickler):
    """Builds only the classes in :data:`_METADATA_CLASSES` (and torch dtypes); anything else -- ``os.system``,
    ``builtins.eval``, a class whose ``__reduce__`` runs code -- is refused before it is called."""

    def find_class(self, module: str, name: str):
        if name in _METADATA_CLASSES.get(module, ()):
            return super().find_class(module, name)
        if module == "torch" and isinstance(vars(torch).get(name), torch.dtype):  # (no lazy submodule import)
            return vars(torch)[name]
        raise pickle.UnpicklingError(
            f"{module}.{name} is not part of a DCP checkpoint's metadata; refused without running it"
        )


class _CheckedReader(FileSystemReader):
    """DCP's file reader with the restricted unpickler, reading only the files whose sha256 was checked."""

    def __init__(self, path: Path, checked: set[str]):
        super().__init__(path)
        self._checked = checked
        self.refused: str | None = None  # why a metadata file was refused (DCP re-wraps the error in its own)

    def read_metadata(self, *args, **kwargs):
        try:
            return self._read_metadata(kwargs.get("rank"))
        except pickle.UnpicklingError as exc:
            self.refused = self.refused or str(exc)
            raise

    def _read_metadata(self, rank: int | None):
        path = Path(self._get_metadata_path(rank))
        if path.name not in self._checked:  # (DCP falls back to per-rank metadata files, which we never write)
            raise FileNotFoundError(f"{path} is not a checked file of this checkpoint")
        with open(path, "rb") as f:
            metadata = _MetadataUnpickler(io.BytesIO(f.read())).load()
        from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

        if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
            raise pickle.UnpicklingError(f"{self.path}/.metadata does not hold DCP metadata")
        for info in metadata.storage_data.values():
            if getattr(info, "relative_path", None) not in self._checked:
                raise pickle.UnpicklingError(
                    f"{self.path}/.metadata points at {getattr(info, 'relative_path', info)!r}, not one of the "
                    "checked files of this checkpoint"
                )
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """The default planner, but non-tensor values (optimizer hyper-parameters, the loop state string) load with
    ``torch.load(weights_only=True)``: plain values only, no arbitrary objects."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        plain = torch.load(value, weights_only=True)  # refuses anything but tensors and plain values
        again = io.BytesIO()
        torch.save(plain, again)  # the default planner places it (its own load now reads what we just wrote)
        again.seek(0)
        super().load_bytes(read_item, again)


def _verify_on_rank0(path: Path) -> None:
    """Every rank needs the verdict; rank 0 hashes the files once (they are shared) and tells the others."""
    if _single_process():
        verify_training_state(path)
        return
    error = None
    if dist.get_rank() == 0:
        try:
            verify_training_state(path)
        except TrainingCheckpointError as exc:
            error = str(exc)
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0]:
        raise TrainingCheckpointError(box[0])


def load_training_state(path: str | Path, model, optimizer) -> dict:
    """Load a checkpoint into ``model`` and ``optimizer`` in place, restore the RNG state, and return the
    loop state saved with it. Every file is checked against ``meta.json`` first (:func:`verify_training_state`),
    and nothing in it is unpickled beyond DCP's metadata records and plain values."""
    path = Path(path)
    _verify_on_rank0(path)
    reader = _CheckedReader(path, set(read_meta(path)["files"]))
    model_sd, optim_sd = get_state_dict(model, optimizer, options=_OPTIONS)
    state = {"model": model_sd, "optim": optim_sd, "rng": torch.get_rng_state(), "loop": ""}
    try:
        with _quiet_single_process():
            dcp.load(state, storage_reader=reader, planner=_WeightsOnlyPlanner(), no_dist=_single_process())
    except (Exception, CheckpointException) as exc:
        causes = _underlying(exc)
        refused = reader.refused or next((str(c) for c in causes if isinstance(c, pickle.UnpicklingError)), None)
        if refused:
            raise TrainingCheckpointError(
                f"--resume: {path} holds objects no checkpoint of this command contains ({refused}); nothing was "
                "run or loaded. Point --resume only at your own runs' folders."
            ) from exc
        if any(isinstance(c, OSError) for c in causes):
            intact = newest_intact_checkpoint(path.parent)
            raise TrainingCheckpointError(
                f"--resume: reading {path} failed ({_failure_text(exc)}); the newest intact checkpoint is "
                f"{intact or 'none'}."
            ) from exc
        raise TrainingCheckpointError(
            f"{path}: cannot load this training checkpoint into the current model/optimizer ({_failure_text(exc)}). "
            "It was written for another model config; start a new --output or drop --resume."
        ) from exc
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"], options=_OPTIONS)
    torch.set_rng_state(state["rng"])
    return json.loads(state["loop"])
