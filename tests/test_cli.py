"""The command line: ``info`` and ``check`` run as a user would run them (a fresh process)."""

import json
import os
import signal
import subprocess
import sys

import pytest
from cli_output_checks import check_bench_output, check_check_output


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
    cuda_line = next(line for line in out.splitlines() if line.startswith("  cuda "))
    assert cuda_line.split()[1] in ("available", "unavailable:"), cuda_line  # with the reason when unavailable
    assert "pk.patch integrations:" in out
    for package in ("transformers", "perceiver-pytorch", "perceiver-ar-pytorch"):
        assert f"  {package} " in out


@pytest.mark.slow  # CI runs the same command from the built wheel (.ci/wheel_check) with the same checks
@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="the CPU check is exercised on machines without a GPU"
)
def test_check_on_cpu_prints_a_passing_table():
    result = run_cli("check", "--device", "cpu", "--dtype", "float32")
    assert result.returncode == 0, result.stdout + result.stderr
    check_check_output(result.stdout, dtypes=1)


def test_check_rejects_missing_gpu():
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_cli("check", "--device", "cuda")
    assert result.returncode == 2 and "no CUDA device" in result.stderr


@pytest.mark.slow  # CI runs the same command from the built wheel (.ci/wheel_check) with the same checks
@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="the CPU pipeline check is exercised on machines without a GPU"
)
def test_bench_quick_on_cpu_writes_tables_json_and_plots(tmp_path):
    result = run_cli("bench", "--suite", "quick", "--device", "cpu", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    check_bench_output(result.stdout, tmp_path)


@pytest.mark.parametrize(
    "args,message",
    [
        (("--suite", "perceiver", "--device", "cpu"), "needs a GPU"),
        (("--device", "cpu", "--providers", "triton,bogus"), "unknown --providers bogus"),
        (("--device", "cpu", "--shapes", "io-encoder"), "not in the 'quick' suite"),
    ],
)
def test_bench_rejects_bad_arguments(args, message):
    result = run_cli("bench", *args)
    assert result.returncode == 2 and message in result.stdout + result.stderr


def test_bench_time_budget_records_skipped_rows(tmp_path):
    result = run_cli("bench", "--device", "cpu", "--time-budget", "0", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert rows and all(r["status"] == "skipped" and r["reason"] == "time budget spent" for r in rows)
    assert (tmp_path / "summary.png").stat().st_size > 0


def test_bench_stopped_by_a_signal_still_reports(tmp_path):
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    args = [sys.executable, "-m", "perceiver_kernels", "bench", "--device", "cpu", "--out", str(tmp_path)]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    for line in proc.stdout:  # wait for the first measured row, then stop the run as `timeout` would
        if line.startswith("quick-cross"):
            proc.send_signal(signal.SIGTERM)
            break
    output = line + proc.stdout.read()
    assert proc.wait(timeout=300) == 1, output
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["stopped"] == "signal SIGTERM" and data["rows"]
    assert "STOPPED EARLY" in output and (tmp_path / "bench.txt").exists()


def test_bench_host_suite_writes_tables_json_and_plot(tmp_path):
    """The host-overhead suite (launches skipped through the package's hook) runs on a CPU; a saved run
    redraws with ``python -m perceiver_kernels.bench.report``."""
    result = run_cli("bench", "--suite", "host", "--shapes", "plain,decode", "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "bench.json").read_text())
    assert data["suite"] == "host" and set(data["sdpa"]) == {"fwd", "fwd+bwd"}
    rows = {(r["case"], r["mode"]): r for r in data["rows"]}
    assert set(rows) == {(c, m) for c in ("plain", "decode") for m in ("fwd", "fwd+bwd")}
    assert rows["plain", "fwd"]["launches"] == 1 and rows["plain", "fwd+bwd"]["launches"] == 3
    for row in rows.values():
        assert row["us"] > 0 and row["sdpa_us"] > 0 and row["ratio"] > 0  # ratio: median of per-loop ratios
        assert row["allocations"] >= 2 and 0 <= row["aten_pct"] <= 100
    assert "host overhead per call" in result.stdout and "SDPA whole call" in result.stdout
    assert (tmp_path / "host.png").stat().st_size > 1000
    assert (tmp_path / "bench.md").read_text().count("| plain |") == 2
    redraw = subprocess.run(
        [sys.executable, "-m", "perceiver_kernels.bench.report", str(tmp_path / "bench.json")],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert redraw.returncode == 0 and "decode" in redraw.stdout, redraw.stderr
