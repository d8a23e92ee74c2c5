"""Self-describing checkpoints: the ``auto_map`` and the two ``trust_remote_code`` shims in every directory we write.

Tools that resolve a model class by themselves (lm-eval's ``HFLM``, TRL's ``SFTTrainer(model="DIR")``,
``pipeline(model="DIR")``) never import this package; with ``trust_remote_code=True`` transformers follows the
``auto_map`` in ``config.json`` to ``configuration_deepseek.py`` / ``modeling_deepseek.py`` in the same directory,
copies them into its dynamic-module cache (``HF_MODULES_CACHE``) and imports them. Our shims import the installed
package, so such a tool gets this package's classes with FP8 kept. Without an ``auto_map`` the same call silently
builds transformers' built-in class, which cannot load partial FP8 blocks on CPU.

:func:`stamp_remote_code` is the one place that adds both; every writer (``save_pretrained``, ``convert``,
``make_tiny_checkpoint``, and through them pretrain's exports and merged LoRA models) calls it on its staging
directory after writing ``config.json``, so the published directory is complete or absent as before.
``deepseek-v3 install-hub-files`` calls it on a user's checkout after :func:`install_refusal` found no reason to
refuse.

The ``auto_map`` is the one DeepSeek publishes (same file and class names), so an official checkout keeps its
``config.json`` and only its two code files change.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path

from transformers.utils import logging

__all__ = [
    "AUTO_MAP",
    "REMOTE_CODE_FILES",
    "SHIM_FILES",
    "RemoteCodeError",
    "auto_map_conflicts",
    "install_refusal",
    "shim_source",
    "stamp_remote_code",
]

logger = logging.get_logger(__name__)

#: The code files ``auto_map`` names (as in DeepSeek's official repositories), shipped in ``hub_files/``.
SHIM_FILES = ("configuration_deepseek.py", "modeling_deepseek.py")
#: What :func:`stamp_remote_code` may leave in a directory besides config.json: the shims and replaced originals.
REMOTE_CODE_FILES = frozenset(SHIM_FILES) | {name + ".orig" for name in (*SHIM_FILES, "config.json")}
#: DeepSeek's own ``auto_map``; every value names a class the shim module defines (checked by the tests).
AUTO_MAP = {
    "AutoConfig": "configuration_deepseek.DeepseekV3Config",
    "AutoModel": "modeling_deepseek.DeepseekV3Model",
    "AutoModelForCausalLM": "modeling_deepseek.DeepseekV3ForCausalLM",
}
#: ``model_type`` values of the architecture our classes implement (Kimi-K2 keeps DeepSeek-V3's layout).
MODEL_TYPES = ("deepseek_v3", "kimi_k2")


class RemoteCodeError(ValueError):
    """A directory that cannot take the shims as it is (its reason says which file and what to do)."""


def shim_source(name: str) -> bytes:
    """The bytes of one shim as installed with this package (``modeling_deepseekv3/hub_files/<name>``)."""
    return (resources.files("modeling_deepseekv3.hub_files") / name).read_bytes()


def auto_map_conflicts(auto_map) -> list[str]:
    """Entries of an existing ``auto_map`` that would load code other than our shims, one line each.

    An entry is ours when it equals :data:`AUTO_MAP`'s value for its key. Keys we do not write are left alone
    unless they name a class in one of our two module files (the shims would replace the code they point at) or
    another repository's code (``repo--module.Class``)."""
    if not isinstance(auto_map, dict):
        return [f"auto_map is {type(auto_map).__name__}, not an object"]
    ours_modules = {name.removesuffix(".py") for name in SHIM_FILES}
    problems = []
    for key, value in auto_map.items():
        if key in AUTO_MAP:
            if value != AUTO_MAP[key]:
                problems.append(f"{key} -> {value!r} (ours: {AUTO_MAP[key]!r})")
            continue
        refs = value if isinstance(value, list | tuple) else [value]
        for ref in refs:
            if isinstance(ref, str) and ("--" in ref or ref.split(".", 1)[0] in ours_modules):
                problems.append(f"{key} -> {ref!r} (our shims do not provide it)")
    return problems


def _read_config(directory: Path) -> dict:
    path = directory / "config.json"
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RemoteCodeError(f"{path}: cannot read it as JSON ({exc}); restore the model's own config.json.") from None
    if not isinstance(config, dict):
        raise RemoteCodeError(f"{path}: holds a JSON {type(config).__name__}, not an object; restore the model's own.")
    return config


def install_refusal(directory: str | os.PathLike, overwrite: bool = False) -> str | None:
    """Why ``install-hub-files`` must leave ``directory`` alone, or ``None`` when it may proceed: no
    ``config.json`` (not a checkpoint), a config of another architecture, or (unless ``overwrite``) an
    ``auto_map`` that points at other code."""
    directory = Path(directory)
    if not directory.is_dir():
        return f"{directory} is not a directory; pass a checkpoint directory (the one holding config.json)."
    if not (directory / "config.json").is_file():
        return f"{directory} has no config.json, so it is not a checkpoint; pass the directory that holds config.json."
    try:
        config = _read_config(directory)
    except RemoteCodeError as exc:
        return str(exc)
    model_type = config.get("model_type")
    if model_type not in MODEL_TYPES:
        return (
            f"{directory / 'config.json'} has model_type {model_type!r} (architectures {config.get('architectures')}); "
            f"the shims load DeepSeek-V3-architecture checkpoints only (model_type {' or '.join(MODEL_TYPES)})."
        )
    conflicts = auto_map_conflicts(config.get("auto_map", {}))
    if conflicts and not overwrite:
        return (
            f"{directory / 'config.json'} has an auto_map that points at other code: {'; '.join(conflicts)}. "
            "Nothing was changed; pass --overwrite to replace those entries with ours (config.json is kept as "
            "config.json.orig)."
        )
    return None


def _write_atomically(path: Path, data: bytes) -> None:
    """Write via a hidden temporary file and a rename: a symlink at ``path`` (a Hugging Face cache snapshot links
    into ``blobs/`` shared with other snapshots) is replaced, never written through, and a reader never sees half
    a file."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_bytes(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _config_with_auto_map(config: dict) -> dict:
    """``config`` with :data:`AUTO_MAP` merged in (conflicting entries dropped, others such as a tokenizer's
    kept), placed where DeepSeek puts it (after ``architectures``), or in sorted position when the keys are
    sorted (``save_pretrained`` sorts them)."""
    old = config.get("auto_map") if isinstance(config.get("auto_map"), dict) else {}
    auto_map = {**{k: v for k, v in old.items() if not auto_map_conflicts({k: v})}, **AUTO_MAP}
    if "auto_map" in config:
        return {**config, "auto_map": auto_map}
    if list(config) == sorted(config):
        return dict(sorted({**config, "auto_map": auto_map}.items()))
    out = {}
    for key, value in config.items():
        out[key] = value
        if key == "architectures":
            out["auto_map"] = auto_map
    return out if "auto_map" in out else {"auto_map": auto_map, **out}


def _is_our_shim(data: bytes) -> bool:
    """A shim of this package (any version): never worth keeping as the "original" code."""
    return b"modeling_deepseekv3" in data


def stamp_remote_code(directory: str | os.PathLike, *, overwrite: bool | None = None) -> list[str]:
    """Give ``directory`` (holding ``config.json``) our ``auto_map`` and the two shims; return what changed.

    Writers call this on their staging directory with the default ``overwrite=None``: an ``auto_map`` that points
    elsewhere (carried over from a source checkpoint) is replaced with a logged warning, since the directory now
    holds our layout. ``install-hub-files`` passes the user's ``--overwrite``: ``True`` replaces such entries (the
    returned lines say so), ``False`` raises :class:`RemoteCodeError` before anything is written. What is replaced is kept once as
    ``<name>.orig`` (DeepSeek's own code files; a ``config.json`` whose ``auto_map`` pointed elsewhere); an
    existing ``.orig`` is never replaced and a shim of ours is never kept as an original. Every file is replaced
    by a rename (:func:`_write_atomically`)."""
    directory = Path(directory)
    config_path = directory / "config.json"
    config = _read_config(directory)
    conflicts = auto_map_conflicts(config.get("auto_map", {}))
    if conflicts and overwrite is False:
        raise RemoteCodeError(
            f"{config_path}: its auto_map points at other code ({'; '.join(conflicts)}); nothing was changed. "
            "Pass overwrite=True (--overwrite) to replace those entries with ours."
        )
    changes = []
    new_config = _config_with_auto_map(config)
    if list(new_config.items()) != list(config.items()):
        if conflicts:
            if overwrite is None:
                logger.warning(
                    "%s: replacing auto_map entries that point elsewhere: %s", config_path, "; ".join(conflicts)
                )
            backup = directory / "config.json.orig"
            if not (backup.exists() or backup.is_symlink()):
                _write_atomically(backup, config_path.read_bytes())
                changes.append(f"kept the original config.json as {backup}")
        _write_atomically(config_path, (json.dumps(new_config, indent=2, ensure_ascii=False) + "\n").encode("utf-8"))
        if conflicts:
            changes.append(f"replaced the auto_map entries {'; '.join(conflicts)} in {config_path}")
        else:
            what = "completed" if "auto_map" in config else "added"
            changes.append(
                f"{what} the auto_map in {config_path}: {', '.join(f'{k} -> {v}' for k, v in AUTO_MAP.items())}"
            )
    for name in SHIM_FILES:
        shim, dest = shim_source(name), directory / name
        present = dest.exists() or dest.is_symlink()
        current = dest.read_bytes() if present and dest.is_file() else None
        if current == shim and not dest.is_symlink():
            continue
        backup = directory / (name + ".orig")
        if (
            present
            and not (current is not None and _is_our_shim(current))
            and not (backup.exists() or backup.is_symlink())
        ):
            os.replace(dest, backup)  # moves a symlink itself, never the blob it points at
            changes.append(f"kept the original {name} as {backup}")
        _write_atomically(dest, shim)
        changes.append(f"wrote {dest}")
    return changes
