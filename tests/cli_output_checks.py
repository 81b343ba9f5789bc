"""What ``perceiver-kernels check`` and ``perceiver-kernels bench --suite quick`` must print and write on a CPU.

Used by tests/test_cli.py (on the checkout, marked slow: CI runs the same commands from the built wheel) and
by .ci/wheel_check, which runs this file as a script with the wheel's Python, so that ``perceiver_kernels``
is the installed package:

    python tests/cli_output_checks.py CHECK_STDOUT_FILE BENCH_STDOUT_FILE BENCH_OUT_DIR
"""

import json
import sys
from pathlib import Path


def check_check_output(stdout: str, dtypes: int) -> None:
    """``check --device cpu``'s table: one passing row per case and dtype, the interpreter named."""
    from perceiver_kernels.cli import _check_cases

    lines = stdout.splitlines()
    assert "Triton CPU interpreter" in lines[0], lines[0]
    assert lines[1].split() == ["case", "backend", "dtype", "worst", "max", "abs", "err", "err/limit", "result"]
    rows = [line for line in lines if line.rstrip().endswith(("pass", "FAIL"))]
    assert len(rows) == len(_check_cases()) * dtypes == 15 * dtypes, len(rows)
    assert all(row.rstrip().endswith("pass") for row in rows), rows
    assert lines[-1] == "all passed"


def check_bench_output(stdout: str, out_dir: Path) -> None:
    """``bench --suite quick --device cpu --out DIR``: the tables, the JSON rows of every provider and model
    variant, and the plots."""
    assert "CPU numbers prove the pipeline only" in stdout
    header = ["provider", "mode", "median ms", "p20-p80 ms", "TFLOP/s", "% mm", "GB/s", "peak MiB", "1st s", "speedup"]
    assert sum(all(col in line for col in header) for line in stdout.splitlines()) == 4  # one table per shape
    for shape in ("quick-cross", "quick-causal-padded", "quick-ar", "quick-decode"):
        assert f"== {shape}:" in stdout
    for entry in ("quick-shared-blocks", "quick-model-ar-train"):  # the model entries: their own tables
        assert f"== {entry}:" in stdout
    for name in ("bench.json", "bench.md", "bench.txt", "summary.png", "shape-quick-cross.png"):
        assert (out_dir / name).stat().st_size > 0, name

    data = json.loads((out_dir / "bench.json").read_text())
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
        ("quick-shared-blocks", "checkpointing", 1),
        ("quick-shared-blocks", "checkpointing", 2),
        ("quick-shared-blocks", "recompute", 1),
        ("quick-shared-blocks", "recompute", 2),
        ("quick-shared-blocks", "reuse", 1),
        ("quick-shared-blocks", "reuse", 2),
    ]
    for r in model_rows.values():
        assert r["status"] == "ok" and r["mode"] == "fwd+bwd" and r["ms"] > 0 and r["throughput"] > 0, r
        assert r.get("anchor") or (r["agrees"] and r["max_rel_diff"] < 1e-3 and r["grad_rel_diff"] < 1e-3)


if __name__ == "__main__":
    check_stdout, bench_stdout, bench_dir = sys.argv[1:]
    check_check_output(Path(check_stdout).read_text(), dtypes=1)  # check --device cpu --dtype float32
    check_bench_output(Path(bench_stdout).read_text(), Path(bench_dir))
    print("cli output checks: passed")
