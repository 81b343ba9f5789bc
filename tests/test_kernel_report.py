"""The static kernel report (perceiver_kernels/bench/kernel_report.py): every kernel the suite launches compiles for
sm_90a, and the fast-path configs neither spill nor exceed the card's shared memory."""

import json
import os
import subprocess
import sys

import pytest
import torch

from perceiver_kernels.bench.kernel_report import findings

ATTENTION_KERNELS = {"_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"}


@pytest.mark.long_running
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine measures the compiled kernels themselves")
def test_suite_kernels_compile_for_sm90_without_spills(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-m", "perceiver_kernels", "kernels", "--arch", "90", "--no-progress", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=1200,
    )  # fmt: skip
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    data = json.loads((tmp_path / "kernels-perceiver-sm90.json").read_text())
    rows = data["rows"]
    launched = {r["kernel"] for r in rows}
    assert ATTENTION_KERNELS | {"_merge_splits_kernel", "_sum_rotate_kernel", "_bwd_delta_kernel"} <= launched
    # Hopper: every attention dot with a 64-row (or wider) tile runs on wgmma.
    for r in rows:
        if r["kernel"] in ATTENTION_KERNELS and "BLOCK_M=16 " not in r["config"]:
            assert r["wgmma"] > 0, r
    assert "Static kernel report: sm_90a" in result.stdout


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU machine measures the compiled kernels themselves")
def test_correctness_matrix_compiles_for_sm90_within_shared_memory(tmp_path):
    """Every launch the tests' correctness matrix makes, in float16, bfloat16 and float32, compiles for
    sm_90a and fits its shared memory (a kernel over the limit cannot launch). About 10 minutes with a
    warm Triton cache, 25 cold, on a 2-core machine."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    command = [sys.executable, "-m", "perceiver_kernels", "kernels", "--arch", "90", "--suite", "matrix"]
    result = subprocess.run(
        [*command, "--no-progress", "--out", str(tmp_path)], capture_output=True, text=True, env=env, timeout=3600
    )
    rows = json.loads((tmp_path / "kernels-matrix-sm90.json").read_text())["rows"]
    assert rows and all(r["shared_ok"] for r in rows), [r for r in rows if not r["shared_ok"]]
    assert result.returncode in (0, 1), result.stderr[-4000:]  # 1: spills, listed in the report


def test_findings_flag_spills_and_shared_memory():
    row = dict(
        kernel="_fwd_kernel", config="BLOCK_M=128 NUM_DK=1 NUM_DV=1", spill_stores=0, spill_loads=0, shared_ok=True,
        shared=1024,
    )  # fmt: skip
    assert findings({"rows": [row]}) == []
    assert findings({"rows": [{**row, "spill_stores": 8}]})[0].endswith("spills 8/0 bytes")
    # Chunked head dims (above the fast path) may spill without failing; shared memory never.
    assert findings({"rows": [{**row, "config": "NUM_DK=5 NUM_DV=3", "spill_loads": 8}]}) == []
    assert "needs 1024 bytes" in findings({"rows": [{**row, "shared_ok": False}]})[0]
