"""Conformance run: transformers' own DeepSeek-V3 model tests, against transformers' classes and against ours.

    python benchmarks/conformance.py [--tests-dir DIR] [--json out.json] [--only native|ours] [-k EXPR]

transformers' ``tests/models/deepseek_v3/test_modeling_deepseek_v3.py`` (``ModelTesterMixin``,
``GenerationTesterMixin``, ``PipelineTesterMixin`` ...) and the common files it imports are taken, at run time,
from ``--tests-dir`` (a transformers checkout, or its ``tests/`` tree; also ``$DSV3_CONFORMANCE_TESTS_DIR``),
else downloaded from the public repository at the tag of the installed transformers (``v<version>``) into
``--cache-dir``. Nothing of them is kept in this repository: they are copied into a temporary run directory
next to a generated ``conftest.py`` that loads this module's pytest hooks.

The suite runs twice, unmodified for transformers' native classes, then with the minimum adapter for ours
(:func:`adapt_module`): our ``DeepseekV3Config`` / ``DeepseekV3Model`` / ``DeepseekV3ForCausalLM`` in place of the
native ones in the test module and the model tester, no classification heads (tests that build them are skipped
with that reason), and ``topk_group`` 2 in the tester (top-8 routing of 8 experts in 2 groups needs both groups;
our config refuses a routing that cannot be satisfied, transformers' takes it). Prints passed / failed / skipped
side by side and every test native passes that ours does not, with a one-line reason; those that assume
transformers' internals are in :data:`INTERNALS` with why. Exit status: 0 when every such test is listed there,
1 otherwise, 2 when the tests could not be had (the message says what to pass).
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

ENTRY = "tests/models/deepseek_v3/test_modeling_deepseek_v3.py"
SEEDS = (
    ENTRY,
    "tests/test_modeling_common.py",
    "tests/generation/test_utils.py",
    "tests/test_configuration_common.py",
    "tests/test_pipeline_mixin.py",
    "tests/utils/tiny_model_summary.json",  # read by test_pipeline_mixin at import
)
RAW_URL = "https://raw.githubusercontent.com/huggingface/transformers/v{version}/{path}"
HEADS = ("DeepseekV3ForSequenceClassification", "DeepseekV3ForTokenClassification")
NO_SOURCES = 2

#: Tests native passes that ours does not, because they check transformers' implementation rather than
#: what a user of the model sees. Name (without parameters) -> why.
_NO_FULLGRAPH = (
    "listed by the last run, while `_can_compile_fullgraph` was False (routed experts with data-dependent shapes);"
    " it is True since the experts became one opaque op in a compiled graph (tests/integration/test_compiled_decode.py),"
    " and the static-cache tests also expect transformers' StaticCache class: a test that passes now is reported"
    " as listed but passing"
)
_MAPPING = (
    "transformers' weight-conversion mapping (its fused gate_up expert tensors); our parameters carry the"
    " official checkpoint's names, so there is no conversion to reverse"
)
_EXPERTS_API = (
    "transformers' experts-implementation switch (`@use_experts_implementation`); ours has moe_grouped_experts"
)
INTERNALS: dict[str, str] = {
    "test_can_load_from_already_mapped_keys": _MAPPING,
    "test_reverse_loading_mapping": _MAPPING,
    "test_eager_matches_batched_and_grouped_inference": _EXPERTS_API,
    "test_moe_models_record_router_logits": _EXPERTS_API + " (the test greps the modeling source for the decorator)",
    "test_moe_parallel_plans_shard_experts": "looks for transformers' fused expert weight names in the TP plan",
    "test_can_init_all_missing_weights": "reads the copyright year in the modeling file's header (skips pre-2023 and"
    " header-less files)",
    "test_model_rope_scaling_frequencies": "calls transformers' rotary-embedding module API (forward(x, position_ids),"
    " an inv_freq tensor attribute, YaRN without original_max_position_embeddings); ours computes"
    " cos/sin from position ids (linear and dynamic scaling work: test_linear_and_dynamic_rope_scaling_work)",
    "test_model_weights_reload_no_missing_tied_weights": "deliberate: strict loading refuses a checkpoint without the"
    " decoder's weights (CheckpointError names them) instead of"
    " initializing them randomly; only absent heads are initialized",
    "test_past_key_values_format": "deliberate: the cache holds MLA's compressed latent (kv_lora_rank + rope dims, one"
    " head), not expanded per-head keys and values",
    "test_training_gradient_checkpointing_use_reentrant_true": "deliberate: a balance loss with reentrant checkpointing"
    " is refused (the routers would get no gradient);"
    " non-reentrant, or frozen routers, train",
    "test_custom_4d_attention_mask": _NO_FULLGRAPH + "; the test itself passes with the flag set",
    "test_generate_compilation_all_outputs": _NO_FULLGRAPH,
    "test_generate_compile_model_forward_fullgraph": _NO_FULLGRAPH,
    "test_generate_from_inputs_embeds_with_static_cache": _NO_FULLGRAPH,
    "test_generate_with_static_cache": _NO_FULLGRAPH,
    "test_static_cache_no_recompile_with_smaller_length": _NO_FULLGRAPH,
}

#: Skipped for ours by the adapter itself (not counted against us).
NOT_APPLICABLE = "adapter: builds a classification head (DeepseekV3ForSequenceClassification/TokenClassification), which this package does not have"


# ---- getting the test files ----------------------------------------------------------------------------------
class SourcesUnavailable(RuntimeError):
    pass


_IMPORT = re.compile(r"^\s*from\s+(\.+|tests\.)([\w.]*)\s+import\s+(.+)$", re.M)
_UTILS_IMPORT = re.compile(r"^\s*from\s+(test_module(?:\.\w+)+)\s+import", re.M)  # on sys.path as utils/


def _imports_of(path: str, text: str) -> list[str]:
    """Repository paths of the test modules ``path`` imports (relative imports and ``tests.`` absolute ones)."""
    out = []
    package = Path(path).parent.parts
    for dots, module, names in _IMPORT.findall(text):
        if dots == "tests.":
            base, parts = ("tests",), module.split(".") if module else []
        else:
            base, parts = package[: len(package) - (len(dots) - 1)], module.split(".") if module else []
        target = "/".join(base + tuple(parts))
        if parts:
            out.append(target + ".py")
        else:  # ``from . import x``: x may be a module
            out += [f"{target}/{n.strip()}.py" for n in names.strip("() ").split(",") if n.strip().isidentifier()]
    out += ["utils/" + module.replace(".", "/") + ".py" for module in _UTILS_IMPORT.findall(text)]
    return out


def gather(read, seeds=SEEDS) -> dict[str, str]:
    """Follow the imports from ``seeds`` through ``read(path) -> text | None``; seeds must exist."""
    files, todo = {}, list(seeds)
    while todo:
        path = todo.pop()
        if path in files:
            continue
        text = read(path)
        if text is None:
            if path in seeds:
                raise SourcesUnavailable(f"{path} not found")
            continue  # an import inside a function or try block that this tree does not have
        files[path] = text
        if path.endswith(".py"):
            todo += [p for p in _imports_of(path, text) if p not in files]
    return files


def _dir_reader(tests_dir: Path):
    root = tests_dir.parent if (tests_dir / "models").is_dir() and tests_dir.name == "tests" else tests_dir
    if not (root / "tests").is_dir():
        raise SourcesUnavailable(f"{tests_dir} holds neither tests/ nor models/deepseek_v3/")

    def read(path):
        p = root / path
        return p.read_text() if p.is_file() else None

    return read, str(root)


def _url_reader(version: str, cache: Path):
    def read(path):
        local = cache / path
        if local.is_file():
            return local.read_text()
        url = RAW_URL.format(version=version, path=path)
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                text = response.read().decode()
        except urllib.error.HTTPError as err:
            if err.code == 404:
                return None
            raise SourcesUnavailable(f"{url}: {err}") from err
        except (urllib.error.URLError, OSError) as err:
            raise SourcesUnavailable(f"{url}: {err}") from err
        local.parent.mkdir(parents=True, exist_ok=True)
        local.write_text(text)
        return text

    return read, f"https://github.com/huggingface/transformers/tree/v{version} (cache {cache})"


def fetch_tests(tests_dir: str | None, cache_dir: str | None) -> tuple[dict[str, str], str]:
    import transformers

    version = transformers.__version__
    if tests_dir:
        read, where = _dir_reader(Path(tests_dir).expanduser().resolve())
        return gather(read), where
    cache = Path(cache_dir or Path.home() / ".cache" / "modeling_deepseekv3" / "conformance") / f"v{version}"
    read, where = _url_reader(version, cache)
    return gather(read), where


def write_run_dir(files: dict[str, str], run: Path) -> None:
    for path, text in files.items():
        target = run / path
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
    for folder in {Path(p).parent for p in files}:  # transformers' test packages have empty __init__ files
        packages = [folder, *folder.parents][:-1] if folder.parts[0] == "tests" else [folder]
        for part in packages:
            init = run / part / "__init__.py"
            if not init.exists():
                init.write_text("")
    import transformers

    (run / "src").mkdir(exist_ok=True)  # test_pipeline_mixin imports transformers from the checkout's src/
    (run / "src" / "transformers").symlink_to(Path(transformers.__file__).parent, target_is_directory=True)
    (run / "pytest.ini").write_text("[pytest]\n")  # keeps pytest off our pyproject's settings
    (run / "conftest.py").write_text(
        f"import sys\nsys.path.insert(0, {str(Path(__file__).resolve().parent)!r})\n"
        "import conformance\nconformance.environment_shims()\n"
        "from conformance import pytest_collection_modifyitems, pytest_runtest_logreport, pytest_sessionfinish  # noqa\n"
    )


def environment_shims() -> None:
    """huggingface_hub 2 ships its HTTP client as ``httpx2``; the tests' ``import httpx`` gets the one the hub
    exposes when no ``httpx`` is installed."""
    try:
        import httpx
    except ImportError:
        try:
            from huggingface_hub.utils import httpx
        except ImportError:
            return
        sys.modules["httpx"] = httpx


# ---- the adapter (runs inside the pytest process) ----------------------------------------------------------
def _ours():
    import modeling_deepseekv3 as ds

    return {
        "DeepseekV3Config": ds.DeepseekV3Config,
        "DeepseekV3Model": ds.DeepseekV3Model,
        "DeepseekV3ForCausalLM": ds.DeepseekV3ForCausalLM,
    }


def _swap(value, ours):
    """A native DeepSeek-V3 class -> ours (None for a head we lack); tuples, lists and dicts element-wise."""
    if isinstance(value, type) and value.__module__.startswith("transformers.models.deepseek_v3"):
        return ours.get(value.__name__)
    if isinstance(value, (tuple, list)) and any(isinstance(v, type) for v in value):
        swapped = [s for s in (_swap(v, ours) for v in value) if s is not None]
        return type(value)(swapped)
    if isinstance(value, dict) and any(isinstance(v, type) for v in value.values()):
        return {k: s for k, v in value.items() if (s := _swap(v, ours)) is not None}
    return value


def adapt_module(module) -> None:
    """Point a transformers test module at our classes: module globals, test-class and tester attributes,
    ``topk_group`` 2 in the model tester."""
    import modeling_deepseekv3 as ds

    ds.register()  # Auto* mappings know our config class (pipelines, AutoModel.from_config)
    ours = _ours()
    for name in list(vars(module)):
        value = getattr(module, name)
        if name in ours or name in HEADS:
            setattr(module, name, ours.get(name))
        elif isinstance(value, type) and value.__module__ == module.__name__:
            for attr, attr_value in list(vars(value).items()):
                if not attr.startswith("__") and (swapped := _swap(attr_value, ours)) is not attr_value:
                    setattr(value, attr, swapped)
            if hasattr(value, "get_config") and "topk_group" in inspect.signature(value.__init__).parameters:
                _force_topk_group(value)


def _force_topk_group(tester) -> None:
    init = tester.__init__
    if getattr(init, "_dsv3_adapted", False):
        return

    def __init__(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.topk_group = 2

    __init__._dsv3_adapted = True
    tester.__init__ = __init__


def _uses_heads(item) -> bool:
    try:
        source = inspect.getsource(getattr(item.obj, "__func__", item.obj))
    except (OSError, TypeError):
        return False
    return any(h in source for h in HEADS)


def pytest_collection_modifyitems(session, config, items):
    if os.environ.get("DSV3_CONFORMANCE_TARGET") != "ours":
        return
    import pytest

    for module in {item.module for item in items if getattr(item, "module", None) is not None}:
        adapt_module(module)
    for item in items:
        if _uses_heads(item):
            item.add_marker(pytest.mark.skip(reason=NOT_APPLICABLE))


_results: dict[str, dict] = {}


def _reason(report) -> str:
    if report.skipped and isinstance(report.longrepr, tuple):
        return str(report.longrepr[2]).removeprefix("Skipped: ")
    crash = getattr(report.longrepr, "reprcrash", None)
    text = crash.message if crash is not None else str(report.longrepr)
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return (lines[0] if lines else "")[:300]


def pytest_runtest_logreport(report):
    """One outcome per test: a failure anywhere (setup, call, teardown, any subtest) fails it; a skip of the test
    itself skips it; a skipped subtest alone does not."""
    entry = _results.setdefault(report.nodeid, {"outcome": "passed", "reason": ""})
    if entry["outcome"] in ("failed", "error"):
        return  # keep the first failure
    subtest = hasattr(report, "context")
    if report.failed:
        entry.update(outcome="failed" if report.when == "call" else "error", reason=_reason(report))
        if subtest:
            entry["reason"] = f"{report._sub_test_description()}: {entry['reason']}"[:300]
    elif report.skipped and not subtest:
        entry.update(outcome="skipped", reason=_reason(report))


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("DSV3_CONFORMANCE_OUT")
    if out:
        Path(out).write_text(json.dumps(_results, indent=1))


# ---- driving the two runs and comparing ---------------------------------------------------------------------
def run_suite(run: Path, target: str, extra: list[str], timeout: float) -> dict[str, dict]:
    out = run / f"results-{target}.json"
    env = dict(os.environ, DSV3_CONFORMANCE_TARGET=target, DSV3_CONFORMANCE_OUT=str(out))
    env.setdefault("HF_HUB_OFFLINE", "1")  # the pipeline tests' tiny Hub models: skipped, not downloaded
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    cmd = [
        sys.executable,
        "-m",
        "pytest",
        ENTRY,
        "-q",
        "-rfE",
        "-p",
        "no:cacheprovider",
        "-W",
        "ignore::pytest.PytestUnknownMarkWarning",
        "--rootdir",
        str(run),
        "-c",
        str(run / "pytest.ini"),
        *extra,
    ]
    proc = subprocess.run(cmd, cwd=run, env=env, timeout=timeout, capture_output=True, text=True)
    (run / f"pytest-{target}.log").write_text(proc.stdout + proc.stderr)
    tail = "\n".join(proc.stdout.splitlines()[-1:])
    print(f"[{target}] pytest exit {proc.returncode}: {tail.strip()}", file=sys.stderr)
    if proc.returncode not in (0, 1) or not out.exists():  # 2-4: collection error, interrupted, usage
        raise RuntimeError(f"{target} run produced no results:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def base_name(nodeid: str) -> str:
    """``...::DeepseekV3ModelTest::test_x_0_random`` -> ``test_x`` for parameterized variants we know."""
    name = nodeid.rsplit("::", 1)[-1]
    return re.sub(r"(_\d+(_\w+)?)$", "", name) if re.search(r"_\d+(_\w+)?$", name) else name


def compare(native: dict, ours: dict) -> list[dict]:
    diffs = []
    for nodeid, result in native.items():
        if result["outcome"] != "passed":
            continue
        theirs = ours.get(nodeid, {"outcome": "missing", "reason": "not collected for ours"})
        if theirs["outcome"] == "passed":
            continue
        name = nodeid.rsplit("::", 1)[-1]
        known = INTERNALS.get(name) or INTERNALS.get(base_name(nodeid))
        if theirs["outcome"] == "skipped" and theirs["reason"] == NOT_APPLICABLE:
            known = NOT_APPLICABLE
        diffs.append(
            {"test": name, "nodeid": nodeid, "ours": theirs["outcome"], "reason": theirs["reason"], "listed": known}
        )
    return diffs


def counts(results: dict) -> dict[str, int]:
    c = dict.fromkeys(("passed", "failed", "error", "skipped"), 0)
    for r in results.values():
        c[r["outcome"]] = c.get(r["outcome"], 0) + 1
    return c


def report(native: dict | None, ours: dict | None, where: str) -> list[dict]:
    import transformers

    print(f"\ntransformers {transformers.__version__} DeepSeek-V3 model tests from {where}\n")
    columns = [(n, r) for n, r in (("native", native), ("ours", ours)) if r is not None]
    print(f"{'':10}" + "".join(f"{n:>9}" for n, _ in columns))
    tallies = [counts(r) for _, r in columns]
    for key in ("passed", "failed", "error", "skipped"):
        print(f"{key:10}" + "".join(f"{t[key]:>9}" for t in tallies))
    print(f"{'total':10}" + "".join(f"{sum(t.values()):>9}" for t in tallies))
    if native is None or ours is None:
        return []
    diffs = compare(native, ours)
    listed = [d for d in diffs if d["listed"]]
    unlisted = [d for d in diffs if not d["listed"]]
    print(
        f"\nnative passes, ours does not: {len(diffs)} ({len(listed)} listed as assuming native internals or"
        f" not applicable, {len(unlisted)} not)"
    )
    for d in unlisted:
        print(f"  {d['test']:60} {d['ours']:8} {d['reason']}")
    for d in listed:
        print(f"  [listed] {d['test']:51} {d['ours']:8} {d['listed']}\n{'':72}({d['reason'][:120]})")
    passing = sorted({base_name(n) for n, r in ours.items() if r["outcome"] == "passed" and base_name(n) in INTERNALS})
    if passing:
        print(f"\nlisted in INTERNALS but passing for ours (the entry can go): {', '.join(passing)}")
    return diffs


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--tests-dir",
        default=os.environ.get("DSV3_CONFORMANCE_TESTS_DIR"),
        help="a transformers checkout (or its tests/ tree) at the installed version",
    )
    parser.add_argument(
        "--cache-dir", help="where downloaded test files are kept (default ~/.cache/modeling_deepseekv3/conformance)"
    )
    parser.add_argument("--json", help="write per-test results and the differences here")
    parser.add_argument("--only", choices=("native", "ours"), help="run one side only")
    parser.add_argument("-k", dest="keyword", help="pytest -k expression (a subset, for quick checks)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per side")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (printed)")
    args = parser.parse_args(argv)

    try:
        import parameterized  # noqa: F401  (transformers' tests import it)
    except ImportError:
        print("transformers' tests need `parameterized`: pip install parameterized", file=sys.stderr)
        return NO_SOURCES
    try:
        files, where = fetch_tests(args.tests_dir, args.cache_dir)
    except SourcesUnavailable as err:
        import transformers

        v = transformers.__version__
        print(
            f"could not get transformers' tests for v{v}: {err}\nPass --tests-dir (or set DSV3_CONFORMANCE_TESTS_DIR) "
            f"to a transformers checkout at v{v} (git clone --depth 1 --branch v{v} "
            f"https://github.com/huggingface/transformers), or its tests/ tree with {', '.join(SEEDS)} and what "
            "they import.",
            file=sys.stderr,
        )
        return NO_SOURCES
    extra = ["-k", args.keyword] if args.keyword else []
    run = Path(tempfile.mkdtemp(prefix="dsv3-conformance-"))
    try:
        write_run_dir(files, run)
        native = run_suite(run, "native", extra, args.timeout) if args.only in (None, "native") else None
        ours = run_suite(run, "ours", extra, args.timeout) if args.only in (None, "ours") else None
    finally:
        if args.keep:
            print(f"run directory: {run}", file=sys.stderr)
        else:
            shutil.rmtree(run, ignore_errors=True)
    diffs = report(native, ours, where)
    if args.json:
        import transformers

        Path(args.json).write_text(
            json.dumps(
                {
                    "transformers": transformers.__version__,
                    "source": where,
                    "native": native,
                    "ours": ours,
                    "counts": {"native": counts(native) if native else None, "ours": counts(ours) if ours else None},
                    "native_passes_ours_not": diffs,
                },
                indent=1,
            )
        )
    return 1 if any(not d["listed"] for d in diffs) else 0


if __name__ == "__main__":
    sys.exit(main())
