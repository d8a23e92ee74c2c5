"""Public names that load their module on first use (PEP 562), for the package and its heavy subpackages: the CLI
builds its parser without importing torch, and ``import modeling_deepseekv3`` costs nothing until a name is used.
Imports nothing itself."""

from __future__ import annotations

import importlib
import sys


def lazy_exports(package: str, exports: dict[str, str]):
    """``(__getattr__, __dir__)`` for ``package``, whose public ``name`` lives in the module ``exports[name]``
    (relative to ``package``, e.g. ``".checkpoint"``). A loaded name is kept in the package's namespace, so
    later lookups do not come back here."""
    namespace = sys.modules[package].__dict__

    def __getattr__(name: str):
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module, package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *exports})

    return __getattr__, __dir__
