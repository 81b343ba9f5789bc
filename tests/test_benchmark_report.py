"""The benchmark report: speedups, tables and plots from a result, and older result files."""

from pathlib import Path

import pytest

from perceiver_kernels.bench import report

RESULTS = Path(__file__).resolve().parent.parent / "benchmarks" / "results"


def make_results(rows):
    return {
        "schema": 1,
        "suite": "test",
        "timestamp": "2026-11-26T00:00:00Z",
        "dtype": "bfloat16",
        "versions": {"torch": "x", "triton": "y"},
        "device": {"type": "cuda", "name": "Test GPU", "matmul_dtype": "bfloat16", "matmul_tflops": 500.0,
                   "copy_gbps": 3000.0},
        "shapes": [{"name": "s", "description": "B1 H1 8x8 D8", "flops": {"fwd": 1e9}}],
        "rows": rows,
    }  # fmt: skip


def row(provider, ms, ours=False, status="ok", mode="fwd", **extra):
    r = {"shape": "s", "provider": provider, "ours": ours, "mode": mode, "status": status, **extra}
    if status == "ok":
        r.update(ms=ms, tflops=1.0 / ms, p20_ms=ms * 0.9, p80_ms=ms * 1.1)
    return r


def test_speedup_is_against_the_best_other_provider_that_agrees():
    results = make_results(
        [
            row("triton", 2.0, ours=True),
            row("sdpa-flash", 3.0),
            row("naive", 1.0, status="wrong", reason="differs"),  # fast but wrong: never the bar
            row("sdpa-cudnn", None, status="n/a", reason="refuses"),
        ]
    )
    report.add_speedups(results)
    by_name = {r["provider"]: r for r in results["rows"]}
    assert by_name["triton"]["best_other"] == "sdpa-flash"
    assert by_name["triton"]["speedup"] == pytest.approx(1.5)
    assert by_name["sdpa-flash"]["speedup"] == pytest.approx(1.0)
    assert by_name["sdpa-cudnn"]["speedup"] is None


def test_tables_and_plots(tmp_path):
    results = make_results([row("triton", 2.0, ours=True), row("sdpa-flash", 3.0), row("flex", None, status="n/a")])
    report.add_speedups(results)
    text = report.text_report(results)
    assert "Test GPU" in text and "1.50x" in text and "n/a" in text
    assert report.markdown_summary(results).splitlines()[2].startswith("| s | fwd | triton | 2.000 |")
    written = report.write_outputs(results, tmp_path)
    names = {p.name for p in written}
    assert names == {"bench.txt", "bench.md", "shape-s.png", "summary.png"}
    assert all(p.stat().st_size > 0 for p in written)


def test_no_other_provider_gives_no_speedup():
    results = make_results([row("triton", 2.0, ours=True), row("sdpa-flash", None, status="n/a", reason="no")])
    report.add_speedups(results)
    assert results["rows"][0]["speedup"] is None
    assert "none runs it" in report.markdown_summary(results)


def test_first_runs_load_in_the_current_layout():
    results = report.load_results(RESULTS / "core-h200-2026-11-26-run3.json")
    assert results["device"]["name"] == "NVIDIA H200"
    ar_cross = [r for r in results["rows"] if r["shape"] == "ar-cross" and r["mode"] == "fwd"]
    ours = next(r for r in ar_cross if r["ours"])
    assert ours["provider"] == "triton" and ours["best_other"] == "sdpa-flash"
    assert ours["speedup"] == pytest.approx(1.28, abs=0.01)  # what the README quotes for that run
