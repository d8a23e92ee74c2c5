"""The package's shape, enforced: the intra-package import graph is a DAG (imports inside functions count); the
core (``core/``) imports only the FP8 format and linear layer of this package, so every feature attaches from
outside; ``fp8/`` imports nothing above it; only ``distributed/`` imports ``torch.distributed``; the private
transformers methods the features override still have the signatures they were written against."""

from __future__ import annotations

import ast
import importlib
import inspect
from pathlib import Path

import pytest
import transformers

from helpers import ROOT

PACKAGE = ROOT / "modeling_deepseekv3"
NAME = "modeling_deepseekv3"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def imports_of(path: Path) -> set[str]:
    """Every module of the package that ``path`` imports, at module level or inside functions."""
    tree = ast.parse(path.read_text())
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            found.update(f"{target}.{a.name}" for a in node.names)  # `from . import x` imports a module
    modules = {module_name(p) for p in PACKAGE.rglob("*.py")}
    return {m for m in found if m in modules and m != me}


def graph() -> dict[str, set[str]]:
    return {module_name(p): imports_of(p) for p in PACKAGE.rglob("*.py") if "hub_files" not in p.parts}


def find_cycle(g: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(n: str) -> list[str] | None:
        state[n] = 1
        stack.append(n)
        for m in sorted(g.get(n, ())):
            # a package's __init__ re-exporting its submodules is not a dependency of those submodules
            if m == n.rpartition(".")[0] or n.startswith(m + "."):
                continue
            if state.get(m) == 1:
                return stack[stack.index(m) :] + [m]
            if m not in state and (c := visit(m)):
                return c
        stack.pop()
        state[n] = 2
        return None

    for n in sorted(g):
        if n not in state and (c := visit(n)):
            return c
    return None


def test_import_graph_is_a_dag():
    g = graph()
    assert len(g) > 30 and f"{NAME}.modeling" in g
    assert f"{NAME}.loading" in g[f"{NAME}.modeling"]  # the checker sees real edges
    cycle = find_cycle(g)
    assert cycle is None, " -> ".join(cycle)


def test_find_cycle_reports_a_cycle():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_only_distributed_imports_torch_distributed():
    offenders = []
    for path in PACKAGE.rglob("*.py"):
        if "distributed" in path.relative_to(PACKAGE).parts[:1]:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
            if any(n == "torch.distributed" or n.startswith("torch.distributed.") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert not offenders, offenders


#: what the core may import from this package: itself and the FP8 format, linear layer and its backend decision
CORE_MAY_IMPORT = ("core", "fp8", "fp8.format", "fp8.linear", "fp8.dispatch")


def test_core_imports_no_feature():
    g = graph()
    allowed = {f"{NAME}.{m}" for m in CORE_MAY_IMPORT}
    core = {m: deps for m, deps in g.items() if m == f"{NAME}.core" or m.startswith(f"{NAME}.core.")}
    assert len(core) >= 10
    offenders = {
        m: sorted(d for d in deps if not d.startswith(f"{NAME}.core") and d not in allowed) for m, deps in core.items()
    }
    offenders = {m: d for m, d in offenders.items() if d}
    assert not offenders, f"the core imports features (move the code out, or attach it from outside): {offenders}"


def test_fp8_imports_nothing_above_it():
    g = graph()
    offenders = {
        m: sorted(d for d in deps if not d.startswith(f"{NAME}.fp8"))
        for m, deps in g.items()
        if m.startswith(f"{NAME}.fp8")
    }
    offenders = {m: d for m, d in offenders.items() if d}
    assert not offenders, offenders


def test_public_classes_module_is_assembly():
    """``modeling.py`` lists the core and the features: no function bodies, no methods beyond class attributes."""
    tree = ast.parse((PACKAGE / "modeling.py").read_text())
    assert not [n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef)]
    assert len((PACKAGE / "modeling.py").read_text().splitlines()) <= 150


FEATURES_WITH_PRIVATE_OVERRIDES = ("generation.hooks", "generation.mtp_batching", "loading", "distributed.ep_inference")


#: features that call (not override) private transformers methods: their signatures are checked too
FEATURES_USING_PRIVATE_API = ("generation.paged_latents",)


@pytest.mark.parametrize("feature", FEATURES_WITH_PRIVATE_OVERRIDES + FEATURES_USING_PRIVATE_API)
def test_private_transformers_api_unchanged(feature):
    """Each private transformers method a feature overrides or calls still takes the parameters the feature was
    written for; when an upgrade changes one, this names the method, the transformers version and the file."""
    module = importlib.import_module(f"{NAME}.{feature}")
    for qualname, expected in module.PRIVATE_API.items():
        owner, method = qualname.split(".")
        found = tuple(inspect.signature(getattr(_transformers_class(owner), method)).parameters)
        assert found == expected, (
            f"transformers {transformers.__version__} changed the private {qualname}: parameters {found}, "
            f"{NAME}/{feature.replace('.', '/')}.py was written for {expected}. Update it there."
        )


def _transformers_class(name):
    from transformers.generation.continuous_batching import cache, continuous_api, input_outputs, requests, scheduler
    from transformers.generation.continuous_batching.cache_allocators import compressed_latents

    cb_modules = (cache, compressed_latents, continuous_api, input_outputs, requests, scheduler)
    for module in (transformers, transformers.generation.utils, *cb_modules):
        if hasattr(module, name):
            return getattr(module, name)
    raise AssertionError(f"transformers {transformers.__version__} no longer has {name}")


def test_private_overrides_live_only_in_their_feature_files():
    """No other module of the package defines a method with the name of a private transformers method it would
    override (one deletable file per feature)."""
    overridden = {
        q.split(".")[1]
        for f in FEATURES_WITH_PRIVATE_OVERRIDES
        for q in importlib.import_module(f"{NAME}.{f}").PRIVATE_API
    }
    homes = {str(PACKAGE / (f.replace(".", "/") + ".py")) for f in FEATURES_WITH_PRIVATE_OVERRIDES}
    strays = []
    for path in PACKAGE.rglob("*.py"):
        if str(path) in homes:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef) and node.name in overridden:
                strays.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    assert not strays, strays


#: The package's layers, bottom up: a module may import its own layer and the ones below it, never above.
#: Entries are folders or modules (the longest match places a module).
LAYERS = (
    ("_lazy", "fp8"),  # _lazy: PEP 562 exports, imports nothing
    ("core",),
    ("checkpoint", "integrations.tokenizer"),  # make-tiny writes a tokenizer beside the weights
    ("generation", "integrations", "placement", "loading", "distributed", "hub_files"),
    ("modeling", "registration"),
    ("training",),
    ("cli", "__main__", "integrations.serve", ""),  # "" = the package's __init__; serve: the CLI's launcher
)


def _layer_of(module: str) -> int:
    name = module.removeprefix(NAME).lstrip(".")
    matches = [
        (len(entry), i)
        for i, entries in enumerate(LAYERS)
        for entry in entries
        if name == entry or name.startswith(entry + ".") or (entry == "" and name == "")
    ]
    if matches:
        return max(matches)[1]
    raise AssertionError(f"{module} is in no layer of LAYERS: add its folder to the table in {__file__}")


def test_no_import_runs_upward():
    upward = sorted(
        f"{m} -> {d}"
        for m, deps in graph().items()
        for d in deps
        if _layer_of(d) > _layer_of(m) and not (m == NAME or d.startswith(m + "."))
    )
    assert not upward, upward


def test_the_cli_starts_without_torch():
    """``deepseek-v3 <any subcommand> --help`` used to import torch, transformers and the whole model (6-10 s on
    this machine); the package, ``training`` and ``distributed`` load their modules on first use, so building the
    parser (every subcommand's flags and defaults) imports neither."""
    import subprocess
    import sys

    code = (
        "import sys, modeling_deepseekv3.cli as cli; cli.build_parser(); "
        "print(sorted(m for m in ('torch', 'transformers', 'numpy') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]", out
