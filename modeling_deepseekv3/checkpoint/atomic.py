"""Directories that appear complete or not at all: the one publishing helper every writer uses.

``save_pretrained``, ``make_tiny_checkpoint``, ``convert`` and training checkpoints write into a staging
directory next to the target (same filesystem, so renames are atomic) and publish it with
:func:`publish_directory`: the old target is renamed aside, the staging directory renamed into place, the
old one deleted. A crash at any point leaves either the old directory or the new one under the target's
name -- never a mix of old and new shards that loads silently -- plus hidden leftovers that the next write
to the same target removes.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = ["atomic_directory", "publish_directory", "staging_path"]


def staging_path(target: Path, kind: str = "partial") -> Path:
    """``<parent>/.<name>.<kind>-<pid>``: hidden, next to ``target``, unique per process."""
    return target.parent / f".{target.name}.{kind}-{os.getpid()}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_leftovers(target: Path) -> None:
    """Delete staging/aside directories of ``target`` left by writers that died (their pid is gone)."""
    if not target.parent.is_dir():
        return
    for kind in ("partial", "old"):
        for path in target.parent.glob(f".{target.name}.{kind}-*"):
            pid = path.name.rsplit("-", 1)[-1]
            if pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid)):
                shutil.rmtree(path, ignore_errors=True)


def publish_directory(staging: Path, target: Path, keep: Callable[[str], bool] | None = None) -> None:
    """Make the finished ``staging`` directory the new ``target``.

    Files of an existing ``target`` for which ``keep(name)`` is true and that ``staging`` lacks are carried
    over first (hard-linked where the filesystem allows, else copied): ``save_pretrained`` keeps a tokenizer
    saved into the same directory, while stale weight shards of an earlier save disappear."""
    staging, target = Path(staging), Path(target)
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{target} exists and is not a directory; pass a directory path.")
    if target.is_dir() and keep is not None:
        present = set(os.listdir(staging))
        for name in os.listdir(target):
            src = target / name
            if name in present or not keep(name) or not src.is_file():
                continue
            try:
                os.link(src, staging / name)
            except OSError:
                shutil.copy2(src, staging / name)
    aside = None
    if target.exists():
        aside = staging_path(target, "old")
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
    os.replace(staging, target)
    if aside is not None:
        shutil.rmtree(aside, ignore_errors=True)


@contextmanager
def atomic_directory(target: str | os.PathLike, keep: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """``with atomic_directory(dst) as tmp: write into tmp`` -- on success ``tmp`` becomes ``dst``
    (:func:`publish_directory`); on any error it is deleted and ``dst`` is left as it was."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_leftovers(target)
    staging = staging_path(target)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    try:
        yield staging
        publish_directory(staging, target, keep)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
