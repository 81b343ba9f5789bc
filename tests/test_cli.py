"""The command line: ``info`` and ``check`` run as a user would run them (a fresh process)."""

import os
import subprocess
import sys

import pytest


def run_cli(*args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the CLI must switch the interpreter on by itself
    return subprocess.run(
        [sys.executable, "-m", "perceiver_kernels", *args], capture_output=True, text=True, env=env, timeout=600
    )


def test_info_lists_versions_and_backends():
    result = run_cli("info")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "perceiver-kernels" in out and "torch" in out and "triton" in out
    for backend in ("triton", "cuda", "reference"):
        assert f"  {backend}" in out
    assert "cuda      unavailable: the CUDA C++ backend is not part of this build yet" in out


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="the CPU check is exercised on machines without a GPU"
)
def test_check_on_cpu_prints_a_passing_table():
    result = run_cli("check", "--device", "cpu", "--dtype", "float32")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["case", "backend", "dtype", "worst", "max", "abs", "err", "err/limit", "result"]
    rows = [line for line in lines if line.rstrip().endswith(("pass", "FAIL"))]
    assert len(rows) == 11 and all(row.rstrip().endswith("pass") for row in rows)
    assert "Triton CPU interpreter" in lines[0]
    assert lines[-1] == "all passed"


def test_check_rejects_missing_gpu():
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_cli("check", "--device", "cuda")
    assert result.returncode == 2 and "no CUDA device" in result.stderr
