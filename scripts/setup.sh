#!/usr/bin/env bash
# One-time (idempotent) set-up of a fresh clone: a virtual environment in .venv with the CPU build of
# torch 2.13 and this package (editable) plus its test extras. Safe to run again; fast when done.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
stamp=.venv/.setup-done
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  log=.venv/setup.log
  echo "setting up .venv (log: $log) ..."
  {
    # torch first and pinned: a bare `torch` requirement would make pip fetch a multi-GB CUDA build.
    .venv/bin/python -m pip install "torch==2.13.0" &&
    .venv/bin/python -m pip install -e ".[test]"
  } >"$log" 2>&1 || { tail -n 30 "$log"; echo "setup failed; see $log" >&2; exit 1; }
  # Triton for the FP8 W8A16 kernel's interpreter tests on CPU (--no-deps: never let it touch torch). Optional:
  # where no wheel exists (macOS) those tests skip.
  .venv/bin/python -m pip install --no-deps "triton>=3.2" >>"$log" 2>&1 || echo "triton not installed: the W8A16 interpreter tests will be skipped"
  .venv/bin/python -c "import torch, transformers, modeling_deepseekv3"
  .venv/bin/python -c "from modeling_deepseekv3.fp8 import native; native.load()"  # build the FP8 CPU kernel once
  touch "$stamp"
fi
