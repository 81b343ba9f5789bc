#!/usr/bin/env bash
# One-shot check on a lent GPU machine (no network; its own python3, torch and triton):
# environment, the test suite on CUDA (bfloat16 included), `perceiver-kernels check`, and the core
# benchmark (BENCH_ARGS, default: the three core shapes with a tile-config sweep).
# Usage: bash benchmarks/gpu_check.sh OUT_DIR
set -u
out=${1:?usage: gpu_check.sh OUT_DIR}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
{
  nvidia-smi -L
  python3 -c "import torch, triton; print('torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$out/env.log"
timeout "${TEST_TIMEOUT:-240}" python3 -m pytest tests -n 16 -v -rfEs -p no:benchmark 2>&1 | tee "$out/tests.log" | grep -E "FAILED|ERROR|passed|failed" | tail -40
echo "tests exit: ${PIPESTATUS[0]}"
timeout "${CHECK_TIMEOUT:-60}" python3 -m perceiver_kernels check --device cuda 2>&1 | tee "$out/check.log"
echo "check exit: ${PIPESTATUS[0]}"
timeout "${BENCH_TIMEOUT:-200}" python3 benchmarks/bench_core.py --out "$out" ${BENCH_ARGS:---sweep} 2>&1 | tee "$out/bench.log"
echo "bench exit: ${PIPESTATUS[0]}"
