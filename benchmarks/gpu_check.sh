#!/usr/bin/env bash
# One-shot check on a lent GPU machine (no network; its own python3 with torch and triton, which the
# project's pins do not govern): install the package without dependencies, run the GPU test suite,
# compute-sanitizer (memcheck, racecheck) over the CUDA backend, `perceiver-kernels check --device cuda`
# `perceiver-kernels bench --suite host` (per-call host overhead, into OUT_DIR/host), `--suite sharded` (ranks
# emulated in one process, into OUT_DIR/sharded), the shared-blocks entry (into OUT_DIR/blocks) and
# `perceiver-kernels bench --suite perceiver` (attention shapes, then the model entries shared-blocks and
# model-ar-train), writing logs, bench.json, tables and plots into OUT_DIR. Every step has a timeout so that the
# whole run fits in about 10.5 minutes (the install also builds the CUDA extension): TEST_TIMEOUT,
# SANITIZER_TIMEOUT (per tool), CHECK_TIMEOUT, HOST_TIMEOUT, SHARDED_TIMEOUT, BLOCKS_TIMEOUT, BENCH_TIMEOUT
# (seconds). The bench skips (and records)
# the rows left once BENCH_BUDGET is spent, and on the timeout's SIGTERM it still writes what it
# measured. BENCH_ARGS adds bench options (e.g. --providers, --shapes).
# Usage: bash benchmarks/gpu_check.sh OUT_DIR
set -u
out=$(mkdir -p "${1:?usage: gpu_check.sh OUT_DIR}" && cd "$1" && pwd)
export PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
start=$SECONDS
step() { echo "== $1 ($((SECONDS - start)) s in)"; }

step environment
{
  nvidia-smi -L
  python3 -c "import torch, triton; print('python', __import__('platform').python_version(), 'torch', torch.__version__, 'triton', triton.__version__, torch.cuda.get_device_name(0))"
} 2>&1 | tee "$out/env.log"

step install
# No network: no build isolation, no dependencies. If the editable install is impossible, the
# source tree on PYTHONPATH serves the same code.
if ! python3 -m pip install -q --no-deps --no-build-isolation -e . >"$out/install.log" 2>&1; then
  echo "pip install failed (see install.log); using PYTHONPATH"
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi

step tests
# (The CPU emulation of the CUDA kernels, tests/test_simt_emulation.py, is CI's job; here the kernels run.)
timeout -k 20 "${TEST_TIMEOUT:-160}" python3 -m pytest tests -n 16 -v -rfEs -p no:cacheprovider \
  --ignore=tests/test_simt_emulation.py 2>&1 \
  | tee "$out/tests.log" | grep -E "FAILED|ERROR|passed|failed" | tail -40
echo "tests exit: ${PIPESTATUS[0]}"

step sanitizer
# compute-sanitizer over the CUDA backend's forward (memcheck: out-of-bounds and misaligned accesses;
# racecheck: shared-memory hazards between the cp.async stages and the compute).
sanitizer=$(command -v compute-sanitizer || echo /usr/local/cuda/bin/compute-sanitizer)
if [ -x "$sanitizer" ]; then
  for tool in memcheck racecheck; do
    timeout -k 10 "${SANITIZER_TIMEOUT:-45}" "$sanitizer" --tool "$tool" --error-exitcode 1 \
      python3 tests/sanitizer_cases.py >"$out/sanitizer-$tool.log" 2>&1
    echo "sanitizer $tool exit: $? (tail of sanitizer-$tool.log:)"; tail -3 "$out/sanitizer-$tool.log"
  done
else
  echo "compute-sanitizer not found; skipped"
fi

step check
timeout -k 20 "${CHECK_TIMEOUT:-50}" python3 -m perceiver_kernels check --device cuda 2>&1 | tee "$out/check.log"
echo "check exit: ${PIPESTATUS[0]}"

step host
# Host overhead per call on tiny shapes: with launches skipped (the package's hook) and for real, so the
# Triton launchers' share and the kernels' device time come out (perceiver_kernels/bench/host.py).
timeout -k 10 "${HOST_TIMEOUT:-45}" python3 -m perceiver_kernels bench --suite host --device cuda --out "$out/host" \
  --no-progress 2>&1 | tee "$out/host.log"
echo "host exit: ${PIPESTATUS[0]}"

step sharded
# Keys split across ranks, the ranks emulated in one process: the chunk kernels plus the merge against one call
# (perceiver_kernels/bench/sharded.py).
timeout -k 10 "${SHARDED_TIMEOUT:-30}" python3 -m perceiver_kernels bench --suite sharded --device cuda \
  --out "$out/sharded" 2>&1 | tee "$out/sharded.log"
echo "sharded exit: ${PIPESTATUS[0]}"

step blocks
# The shared-block modes on the Perceiver IO ImageNet encoder (reuse, checkpointing, the memory mode; L 2/4/8 x
# batch 1/4/16): time, kept and peak memory (perceiver_kernels/bench/models.py), before the main bench whose
# budget usually ends before its model entries.
timeout -k 10 "${BLOCKS_TIMEOUT:-45}" python3 -m perceiver_kernels bench --suite perceiver --shapes shared-blocks \
  --device cuda --out "$out/blocks" --no-progress 2>&1 | tee "$out/blocks.log"
echo "blocks exit: ${PIPESTATUS[0]}"

step bench
timeout -k 30 "${BENCH_TIMEOUT:-150}" python3 -m perceiver_kernels bench --suite perceiver --device cuda --out "$out" \
  --time-budget "${BENCH_BUDGET:-120}" --no-progress ${BENCH_ARGS:-} 2>&1 | tee "$out/bench.log"
echo "bench exit: ${PIPESTATUS[0]}"
step done
