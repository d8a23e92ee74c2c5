#!/usr/bin/env bash
# The whole GPU check of issue 26 in one run on a CUDA machine, writing its logs under $OUT (default ./gpu_out):
#   1. pytest -m gpu           all GPU-marked tests                                      -> pytest_gpu.log
#   2. benchmarks/fp8_gpu.py   each FP8 backend vs the dequant twin, TFLOP/s, memory     -> fp8_gpu.log
#   3. benchmarks/gpu_checks.py  shipped model generate (+MTP) on cuda, FP8-recipe step,
#                              attention on cuda:0 with routed experts on the CPU        -> gpu_checks.log
# Each step has its own time limit so that one stall cannot eat the others'. Python packages the machine lacks
# (transformers 5.25 and its needs) are expected on PYTHONPATH already. Runs in at most 7 minutes on an H200.
set -u
OUT=${OUT:-gpu_out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 DEEPSEEKV3_CACHE_DIR=${DEEPSEEKV3_CACHE_DIR:-/tmp/dsv3-kernels}
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1
{
    date -u
    nvidia-smi -L
    python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, \
'transformers', transformers.__version__, 'triton', triton.__version__, torch.cuda.get_device_name())"
    lscpu | grep -E "Model name|^CPU\(s\)"
} 2>&1 | tee "$OUT/session.log"

step() { # name, limit in seconds, command...
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc after $((SECONDS - start)) s (limit $limit s)" | tee -a "$OUT/session.log"
    tail -n 40 "$OUT/$name.log"
}

step pytest_gpu 150 python3 -m pytest -m gpu -p no:cacheprovider -q -rA --continue-on-collection-errors tests
step fp8_gpu 120 python3 benchmarks/fp8_gpu.py
step gpu_checks 150 python3 benchmarks/gpu_checks.py
