"""The command line: ``info`` and ``check`` run as a user would run them (a fresh process)."""

import json
import os
import signal
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
    cuda_line = next(line for line in out.splitlines() if line.startswith("  cuda "))
    assert cuda_line.split()[1] in ("available", "unavailable:"), cuda_line  # with the reason when unavailable
    assert "pk.patch integrations:" in out
    for package in ("transformers", "perceiver-pytorch", "perceiver-ar-pytorch"):
        assert f"  {package} " in out


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="the CPU check is exercised on machines without a GPU"
)
def test_check_on_cpu_prints_a_passing_table():
    result = run_cli("check", "--device", "cpu", "--dtype", "float32")
    assert result.returncode == 0, result.stdout + result.stderr
    lines = result.stdout.splitlines()
    assert lines[1].split() == ["case", "backend", "dtype", "worst", "max", "abs", "err", "err/limit", "result"]
    rows = [line for line in lines if line.rstrip().endswith(("pass", "FAIL"))]
    from perceiver_kernels.cli import _check_cases

    assert len(rows) == len(_check_cases()) == 15 and all(row.rstrip().endswith("pass") for row in rows)
    assert "Triton CPU interpreter" in lines[0]
    assert lines[-1] == "all passed"


def test_check_rejects_missing_gpu():
    if __import__("torch").cuda.is_available():
        pytest.skip("a GPU is present")
    result = run_cli("check", "--device", "cuda")
    assert result.returncode == 2 and "no CUDA device" in result.stderr


@pytest.mark.skipif(
    __import__("torch").cuda.is_available(), reason="the CPU pipeline check is exercised on machines without a GPU"
)
def test_bench_quick_on_cpu_writes_tables_json_and_plots(tmp_path):
    result = run_cli("bench", "--suite", "quick", "--device", "cpu", "--out", str(tmp_path))
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    assert "CPU numbers prove the pipeline only" in out
    header = ["provider", "mode", "median ms", "p20-p80 ms", "TFLOP/s", "% mm", "GB/s", "peak MiB", "1st s", "speedup"]
    assert sum(all(col in line for col in header) for line in out.splitlines()) == 4  # one table per shape
    for shape in ("quick-cross", "quick-causal-padded", "quick-ar", "quick-decode"):
        assert f"== {shape}:" in out
    for entry in ("quick-shared-blocks", "quick-model-ar-train"):  # the model entries: their own tables
        assert f"== {entry}:" in out

    data = json.loads((tmp_path / "bench.json").read_text())
    assert {"schema", "timestamp", "git", "versions", "device", "dtype", "suite", "shapes", "rows"} <= set(data)
    assert data["device"]["type"] == "cpu" and data["device"]["matmul_tflops"] > 0
    assert data["versions"]["torch"] and data["git"]["sha"] and data["dtype"] == "float32"
    rows = {(r["shape"], r["provider"], r["mode"]): r for r in data["rows"] if r.get("kind") != "model"}
    providers = {"triton", "sdpa-flash", "sdpa-cudnn", "sdpa-efficient", "sdpa-math", "flex", "naive"}
    assert {p for _, p, _ in rows} == providers
    assert len(rows) == len(providers) * 7  # 4 shapes, the decode forward only
    for (_, _, mode), r in rows.items():
        assert r["status"] in ("ok", "n/a"), r
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["p20_ms"] <= r["ms"] <= r["p80_ms"] and r["tflops"] > 0 and r["gbps"] > 0
            assert mode == "fwd+bwd" or r["agrees"]
        else:
            assert r["reason"]
    ours = rows[("quick-cross", "triton", "fwd")]
    assert ours["status"] == "ok" and ours["max_rel_diff"] < 1e-4 and ours["speedup"] > 0
    assert rows[("quick-cross", "sdpa-cudnn", "fwd")]["reason"] == "a CUDA-only backend"
    assert rows[("quick-cross", "flex", "fwd")]["status"] == "ok"  # compiled, on CPU too
    assert "backward on CPU" in rows[("quick-cross", "flex", "fwd+bwd")]["reason"]

    model_rows = {(r["shape"], r["provider"], r["batch"]): r for r in data["rows"] if r.get("kind") == "model"}
    assert sorted(model_rows) == [
        ("quick-model-ar-train", "reference", 2),
        ("quick-model-ar-train", "sdpa", 2),
        ("quick-model-ar-train", "triton", 2),
        ("quick-shared-blocks", "module-reuse", 1),
        ("quick-shared-blocks", "module-reuse", 2),
        ("quick-shared-blocks", "shared-chain", 1),
        ("quick-shared-blocks", "shared-chain", 2),
    ]
    for r in model_rows.values():
        assert r["status"] == "ok" and r["mode"] == "fwd+bwd" and r["ms"] > 0 and r["throughput"] > 0, r
        assert r.get("anchor") or (r["agrees"] and r["max_rel_diff"] < 1e-3 and r["grad_rel_diff"] < 1e-3)
    assert model_rows[("quick-model-ar-train", "triton", 2)]["ours"]  # Triton in the interpreter, checked

    pngs = sorted(p.name for p in tmp_path.glob("*.png"))
    shapes = ["shape-quick-ar.png", "shape-quick-causal-padded.png", "shape-quick-cross.png", "shape-quick-decode.png"]
    models = ["model-quick-model-ar-train.png", "model-quick-shared-blocks.png"]
    assert pngs == [*models, *shapes, "summary.png"]
    assert all((tmp_path / name).stat().st_size > 1000 for name in pngs)
    md = (tmp_path / "bench.md").read_text()
    assert md.count("| quick-") == 7 + len(model_rows)  # the attention summary, then every model row


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
