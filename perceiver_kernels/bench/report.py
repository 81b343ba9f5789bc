"""Reading a benchmark result: per-shape tables, a markdown summary, and plots.

Works on a live result (``suite.run_suite``) or a saved one::

    python -m perceiver_kernels.bench.report benchmarks/results/<run>/bench.json [--out DIR]

prints the tables and, with ``--out``, writes ``bench.txt``, ``bench.md`` and the PNG plots there.

Model-level rows (``kind: "model"``, one per entry, size and variant; ``models.py``) get their own
tables, markdown table and ``model-<entry>.png``; the attention tables and ``summary.png`` are the
attention rows'.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from .shapes import SHAPES

OURS_COLOR, OTHER_COLOR = "#d95f02", "#7570b3"
# Suites whose CPU numbers are a result (plain PyTorch modules timed on the CPU: the shared-block modes), not
# only a check of the pipeline (the kernels in Triton's interpreter).
CPU_RESULT_SUITES = ("blocks",)
OTHER_COLORS = (OTHER_COLOR, "#1b9e77", "#e7298a", "#66a61e", "#e6ab02")  # model plots: one per other variant


def display_name(row: dict) -> str:
    return f"{row['provider']} (ours)" if row["ours"] else row["provider"]


def is_model(row_or_shape: dict) -> bool:
    """A model-level row or entry (``models.py``), not an attention one."""
    return row_or_shape.get("kind") == "model"


def size_label(row: dict) -> str:
    """A model row's size: ``B4``, or ``L8 B4`` where the entry varies the number of blocks too."""
    return (f"L{row['blocks']} " if "blocks" in row else "") + f"B{row['batch']}"


def add_speedups(results: dict) -> None:
    """Each ok row gets ``speedup`` = (best other provider's median) / (its median), per shape and mode
    (and size, for model rows).

    "Other" is every provider that is not ours and whose output agreed with the reference; a model row with
    a ``rival`` is compared with that variant instead. Model rows also get ``peak_ratio`` = (their peak
    memory) / (the compared row's), where both were measured.
    """
    groups: dict[tuple, list[dict]] = {}
    for row in results["rows"]:
        groups.setdefault((row["shape"], row["mode"], row.get("batch"), row.get("blocks")), []).append(row)
    for rows in groups.values():
        others = [r for r in rows if not r["ours"] and r["status"] == "ok"]
        fastest = min(others, key=lambda r: r["ms"]) if others else None
        for row in rows:
            best = fastest
            if row.get("rival"):
                best = next((r for r in others if r["provider"] == row["rival"]), None)
            row["best_other"] = best["provider"] if best else None
            row["speedup"] = best["ms"] / row["ms"] if best and row["status"] == "ok" else None
            if is_model(row):
                peaks = (row.get("peak_mib"), best.get("peak_mib") if best else None)
                ok = row["status"] == "ok" and None not in peaks and peaks[1] > 0
                row["peak_ratio"] = peaks[0] / peaks[1] if ok else None


def _fmt(value, spec: str, missing: str = "-") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    return format(value, spec)


def _rate(value) -> str:
    """Three significant digits for small rates (CPU runs), one decimal otherwise."""
    if value is None:
        return "-"
    return f"{value:.1f}" if value >= 10 else f"{value:.3g}"


def row_line(row: dict) -> str:
    """One line per measurement, printed while the suite runs."""
    head = f"{row['shape']:20s} {display_name(row):16s} {row['mode']:8s}"
    if is_model(row):
        head = f"{row['shape']:20s} {display_name(row):19s} {size_label(row):7s} {row['mode']:8s}"
    if row["status"] != "ok":
        return f"{head} {row['status']} ({row.get('reason', '')})"
    if is_model(row):
        return f"{head} {row['ms']:9.3f} ms {_count(row['throughput'])} {row['throughput_unit']}"
    return f"{head} {row['ms']:9.4f} ms {_rate(row.get('tflops')):>7s} TFLOP/s"


def _count(value) -> str:
    """Throughputs: thousands separated, no decimals from 100 up."""
    if value is None:
        return "-"
    return f"{value:,.0f}" if value >= 100 else f"{value:.3g}"


COLUMNS = ("provider", "mode", "median ms", "p20-p80 ms", "TFLOP/s", "% mm", "GB/s", "peak MiB", "1st s", "speedup")
WIDTHS = (20, 8, 10, 19, 8, 6, 8, 9, 7, 8)


def _table_row(cells: tuple[str, ...]) -> str:
    # provider and mode left-aligned, numbers right-aligned
    padded = [f"{c:<{w}s}" if i < 2 else f"{c:>{w}s}" for i, (c, w) in enumerate(zip(cells, WIDTHS, strict=True))]
    return "  ".join(padded)


def text_report(results: dict) -> str:
    """The per-shape tables: provider, median with p20/p80, rates, peak memory, speedup."""
    device = results["device"]
    lines = [_title(results)]
    if device.get("matmul_tflops"):
        lines.append(
            f"device ceilings (measured): {device['matmul_dtype']} matmul {device['matmul_tflops']:.1f} TFLOP/s, "
            f"copy {device['copy_gbps']:.0f} GB/s; % mm = share of that matmul rate"
        )
    if "stopped" in results:
        lines.append(f"STOPPED EARLY ({results['stopped']}): the shapes and rows below are all that was measured")
    for name, reason in results.get("backends_not_run", {}).items():
        lines.append(f"not run: {name} ({reason})")
    lines.append("speedup = best other provider's median / this row's median (> 1: faster than all others)")
    shapes = {s["name"]: s for s in results.get("shapes", [])}
    for shape_name in dict.fromkeys(r["shape"] for r in results["rows"]):
        shape = shapes.get(shape_name, {})
        shape_rows = [r for r in results["rows"] if r["shape"] == shape_name]
        if is_model(shape) or any(is_model(r) for r in shape_rows):
            lines += ["", *_model_table({"name": shape_name, **shape}, shape_rows)]
            continue
        lines += ["", f"== {shape_name}: {shape.get('description', '')}"]
        flops = ", ".join(f"{m} {f / 1e9:.4g} GFLOP" for m, f in shape.get("flops", {}).items())
        if flops:
            lines.append(f"   {flops}")
        lines.append(_table_row(COLUMNS))
        for row in (r for r in results["rows"] if r["shape"] == shape_name):
            if row["status"] not in ("ok",):
                cells = (display_name(row), row["mode"], f"{row['status']} ({row.get('reason', '')})")
                lines.append("  ".join(f"{c:<{w}s}" for c, w in zip(cells, WIDTHS, strict=False)))
                continue
            spread = f"{_fmt(row.get('p20_ms'), '.4f')}-{_fmt(row.get('p80_ms'), '.4f')}"
            cells = (
                display_name(row),
                row["mode"],
                f"{row['ms']:.4f}",
                spread,
                _rate(row.get("tflops")),
                _fmt(row.get("matmul_pct"), ".0f"),
                _fmt(row.get("gbps"), ".0f"),
                _fmt(row.get("peak_mib"), ".0f"),
                _fmt(row.get("first_call_s"), ".2f"),
                _fmt(row.get("speedup"), ".2f", "") + ("x" if row.get("speedup") is not None else ""),
            )
            lines.append(_table_row(cells))
    return "\n".join(lines)


MODEL_COLUMNS = ("variant", "size", "median ms", "p20-p80 ms", "{unit}", "kept MiB", "peak MiB", "1st s",
                 "out diff", "grad diff", "vs", "speedup", "peak x")  # fmt: skip
MODEL_WIDTHS = (20, 7, 10, 19, 14, 9, 9, 7, 8, 9, 14, 8, 6)


def _model_table(shape: dict, rows: list[dict]) -> list[str]:
    """A model entry: one line per (size, variant); diffs against the anchor, speedup and peak memory
    against the compared variant (its rival, or the fastest other)."""
    unit = shape.get("throughput_unit", "throughput")
    header = tuple(c.format(unit=unit) for c in MODEL_COLUMNS)

    def line(cells) -> str:
        return "  ".join(
            f"{c:<{w}s}" if i == 0 else f"{c:>{w}s}" for i, (c, w) in enumerate(zip(cells, MODEL_WIDTHS, strict=True))
        )

    lines = [f"== {shape['name']}: {shape.get('description', '')}"]
    if shape.get("note"):
        lines.append(f"   {shape['note']}")
    anchor = shape.get("anchor")
    lines.append(
        f"   diffs against {anchor} (the anchor, marked *): out diff = max |out - anchor| / max |anchor|, grad diff = "
        "relative L2 of all parameter gradients; kept = what the forward leaves for backward, peak = the step's "
        "maximum (beyond weights and inputs); speedup and peak x against the variant in vs"
    )
    lines.append(line(header))
    for row in rows:
        name = display_name(row) + (" *" if row.get("anchor") else "")
        if row["status"] not in ("ok",):
            lines.append(f"{name:<20s}  {size_label(row):>7s}  {row['status']} ({row.get('reason', '')})")
            continue
        spread = f"{_fmt(row.get('p20_ms'), '.3f')}-{_fmt(row.get('p80_ms'), '.3f')}"
        cells = (
            name,
            size_label(row),
            f"{row['ms']:.3f}",
            spread,
            _count(row.get("throughput")),
            _fmt(row.get("kept_mib"), ".1f"),
            _fmt(row.get("peak_mib"), ".1f"),
            _fmt(row.get("first_call_s"), ".2f"),
            _fmt(row.get("max_rel_diff"), ".1e"),
            _fmt(row.get("grad_rel_diff"), ".1e"),
            row.get("best_other") or "",
            _fmt(row.get("speedup"), ".2f", "") + ("x" if row.get("speedup") is not None else ""),
            _fmt(row.get("peak_ratio"), ".2f", ""),
        )
        lines.append(line(cells))
    return lines


def _title(results: dict) -> str:
    device = results["device"]
    v = results["versions"]
    where = device["name"]
    if device["type"] != "cuda" and results.get("suite") not in CPU_RESULT_SUITES:
        where += ", CPU numbers prove the pipeline only"
    sha = results.get("git", {}).get("sha", "unknown")[:10]
    return (
        f"perceiver-kernels bench, suite {results.get('suite', '?')}, {results['dtype']}, on {where}; "
        f"torch {v['torch']}, triton {v.get('triton')}, git {sha}, {results['timestamp']}"
    )


def markdown_summary(results: dict) -> str:
    """One line per (shape, mode, our backend): the README's table."""
    lines = [
        "| shape | pass | ours | ms | TFLOP/s | % of matmul | best other | its ms | speedup |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    rows = [r for r in results["rows"] if not is_model(r)]
    by_key = {(r["shape"], r["mode"], r["provider"]): r for r in rows}
    for row in rows:
        if not row["ours"]:
            continue
        best = by_key.get((row["shape"], row["mode"], row.get("best_other")))
        best_cells = f"{best['provider']} | {best['ms']:.3f}" if best else "none runs it | -"
        if row["status"] != "ok":
            cells = f"{row['shape']} | {row['mode']} | {row['provider']} | {row['status']} | | | {best_cells} |"
            lines.append(f"| {cells} |")
            continue
        speedup = _fmt(row.get("speedup"), ".2f", "-") + ("x" if row.get("speedup") is not None else "")
        lines.append(
            f"| {row['shape']} | {row['mode']} | {row['provider']} | {row['ms']:.3f} | {_rate(row.get('tflops'))} "
            f"| {_fmt(row.get('matmul_pct'), '.0f')} | {best_cells} | {speedup} |"
        )
    model_rows = [r for r in results["rows"] if is_model(r)]
    if model_rows:
        lines = [*lines, "", *_model_markdown(model_rows)] if rows else _model_markdown(model_rows)
    return "\n".join(lines)


def _model_markdown(rows: list[dict]) -> list[str]:
    """Every model row: its time, throughput, memory, and time and peak against the compared variant."""
    lines = [
        "| model entry | size | variant | ms | throughput | kept MiB | peak MiB | vs | speedup | peak memory ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        head = f"| {row['shape']} | {size_label(row)} | {display_name(row)}"
        if row["status"] != "ok":
            lines.append(f"{head} | {row['status']} | | | | | | |")
            continue
        speedup = _fmt(row.get("speedup"), ".2f", "-") + ("x" if row.get("speedup") is not None else "")
        memory = f"{_fmt(row.get('kept_mib'), '.1f')} | {_fmt(row.get('peak_mib'), '.1f')}"
        lines.append(
            f"{head} | {row['ms']:.3f} | {_count(row.get('throughput'))} {row['throughput_unit']} | {memory} "
            f"| {row.get('best_other') or '-'} | {speedup} | {_fmt(row.get('peak_ratio'), '.2f')} |"
        )
    return lines


# -- plots -------------------------------------------------------------------------------------------


def write_plots(results: dict, out_dir: Path) -> list[Path]:
    """``shape-<name>.png`` (TFLOP/s by provider, one panel per mode) and ``summary.png`` for the
    attention shapes, ``model-<name>.png`` for the model entries."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    shapes = {s["name"]: s for s in results.get("shapes", [])}
    for shape_name in dict.fromkeys(r["shape"] for r in results["rows"] if is_model(r)):
        rows = [r for r in results["rows"] if r["shape"] == shape_name]
        written.append(_model_plot(shapes.get(shape_name, {"name": shape_name}), rows, results, out_dir, plt))
    attention_names = list(dict.fromkeys(r["shape"] for r in results["rows"] if not is_model(r)))
    for shape_name in attention_names:
        rows = [r for r in results["rows"] if r["shape"] == shape_name]
        modes = list(dict.fromkeys(r["mode"] for r in rows))
        providers = list(dict.fromkeys(display_name(r) for r in rows))
        fig, axes = plt.subplots(1, len(modes), figsize=(5.5 * len(modes), 0.45 * len(providers) + 1.6), squeeze=False)
        for ax, mode in zip(axes[0], modes, strict=True):
            by_name = {display_name(r): r for r in rows if r["mode"] == mode}
            values = [by_name[p].get("tflops") or 0.0 if by_name[p]["status"] == "ok" else 0.0 for p in providers]
            colors = [OURS_COLOR if p.endswith("(ours)") else OTHER_COLOR for p in providers]
            y = range(len(providers))
            ax.barh(y, values, color=colors)
            ax.set_yticks(list(y), providers)
            ax.invert_yaxis()
            for i, p in enumerate(providers):
                row = by_name.get(p)
                if row is not None:
                    label = _rate(values[i]) if row["status"] == "ok" else row["status"]
                    ax.text(values[i], i, f" {label}", va="center", fontsize=8)
            ax.set_xlabel("TFLOP/s")
            ax.set_title(mode)
            ax.set_xlim(0, max(values + [1e-9]) * 1.25)
        fig.suptitle(f"{shape_name}: {shapes.get(shape_name, {}).get('description', '')}\n{_where(results)}")
        fig.tight_layout()
        path = out_dir / f"shape-{shape_name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    if attention_names or not results["rows"]:
        written.append(_summary_plot(results, out_dir, plt))
    return written


def _model_plot(shape: dict, rows: list[dict], results: dict, out_dir: Path, plt) -> Path:
    """Throughput and peak memory by size, one bar per variant."""
    sizes = list(dict.fromkeys(size_label(r) for r in rows))
    variants = list(dict.fromkeys(display_name(r) for r in rows))
    by_key = {(size_label(r), display_name(r)): r for r in rows}
    has_peak = any(r.get("peak_mib") is not None for r in rows)
    panels = [("throughput", shape.get("throughput_unit", "throughput"))]
    if has_peak:
        panels.append(("peak_mib", "peak MiB (beyond weights and inputs)"))
    # Panels side by side for a few sizes, one above the other for many (shared-blocks: L x batch).
    wide = len(sizes) > 4
    fig_width = max(5.5, 1.1 * len(sizes)) if wide else 5.5 * len(panels)
    shape_of = (len(panels), 1) if wide else (1, len(panels))
    fig, axes = plt.subplots(*shape_of, figsize=(fig_width, 4.2 * shape_of[0]), squeeze=False)
    width = 0.8 / max(1, len(variants))
    others = [name for name in variants if not name.endswith("(ours)")]
    colors = {name: OTHER_COLORS[i % len(OTHER_COLORS)] for i, name in enumerate(others)}
    for ax, (key, label) in zip(axes.flat, panels, strict=True):
        for v, name in enumerate(variants):
            xs = [i + (v - (len(variants) - 1) / 2) * width for i in range(len(sizes))]
            cells = [by_key.get((b, name)) for b in sizes]
            values = [(r.get(key) or 0.0) if r and r["status"] == "ok" else 0.0 for r in cells]
            bars = ax.bar(xs, values, width, label=name, color=colors.get(name, OURS_COLOR))
            for bar, row, value in zip(bars, cells, values, strict=True):
                if row is None:
                    continue
                if row["status"] != "ok":
                    text = row["status"]
                else:
                    text = _count(value) if key == "throughput" else f"{value:.3g}"
                ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), text, ha="center", va="bottom", fontsize=7)
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_ylabel(label)
        ax.legend(fontsize=8)
    title = _wrap(f"{shape['name']}: {shape.get('description', '')}", int(15 * fig_width))
    fig.suptitle(f"{title}\n{_where(results)}", fontsize=8)
    fig.tight_layout()
    path = out_dir / f"model-{shape['name']}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _wrap(text: str, width: int) -> str:
    import textwrap

    return "\n".join(textwrap.wrap(text, width))


def _where(results: dict) -> str:
    device = results["device"]
    where = f"{device['name']}, {results['dtype']}, {results['timestamp'][:10]}"
    if device["type"] == "cuda" or results.get("suite") in CPU_RESULT_SUITES:
        return where
    return f"{where} (CPU: a pipeline check, not a performance result)"


def _summary_plot(results: dict, out_dir: Path, plt) -> Path:
    rows = [r for r in results["rows"] if r["ours"] and not is_model(r)]
    shape_names = list(dict.fromkeys(r["shape"] for r in results["rows"] if not is_model(r)))
    series = list(dict.fromkeys((r["provider"], r["mode"]) for r in rows))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(shape_names) * max(1, len(series)) / 2 + 2), 4.2))
    width = 0.8 / max(1, len(series))
    for s, (provider, mode) in enumerate(series):
        rows_of_series = [
            next((r for r in rows if (r["shape"], r["provider"], r["mode"]) == (name, provider, mode)), None)
            for name in shape_names
        ]
        speedups = [row.get("speedup") if row else None for row in rows_of_series]
        xs = [i + (s - (len(series) - 1) / 2) * width for i in range(len(shape_names))]
        bars = ax.bar(xs, [v or 0.0 for v in speedups], width, label=f"{provider} {mode}")
        for bar, row, value in zip(bars, rows_of_series, speedups, strict=True):
            if row is None:  # this mode is not part of the shape (decode is forward only)
                continue
            text = f"{value:.2f}" if value is not None else (row["status"] if row["status"] != "ok" else "no other")
            ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), text, ha="center", va="bottom", fontsize=7)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xticks(range(len(shape_names)), shape_names, rotation=30, ha="right")
    ax.set_ylabel("speedup over the best other provider")
    others = ", ".join(dict.fromkeys(r["provider"] for r in results["rows"] if not r["ours"] and not is_model(r)))
    ax.set_title(f"perceiver-kernels vs the best of: {others}\n{_where(results)}", fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = out_dir / "summary.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def write_outputs(results: dict, out_dir: Path) -> list[Path]:
    """``bench.txt`` (tables), ``bench.md`` (summary) and the plots; the JSON is the suite's."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text, md = out_dir / "bench.txt", out_dir / "bench.md"
    text.write_text(text_report(results) + "\n")
    md.write_text(f"{_title(results)}\n\n{markdown_summary(results)}\n")
    return [text, md, *write_plots(results, out_dir)]


# -- saved results -----------------------------------------------------------------------------------


def load_results(path: Path) -> dict:
    """A saved result; the first runs (``core-*.json`` of ``bench_core.py``, before the suite) are
    converted to the current layout, keeping their recorded numbers."""
    data = json.loads(Path(path).read_text())
    if "schema" in data:
        return data
    rows = []
    for r in data["rows"]:
        ours = r["provider"].endswith("(ours)")
        measured = not math.isnan(r["ms"])
        row = {"shape": r["shape"], "provider": r["provider"].removesuffix(" (ours)"), "ours": ours, "mode": r["mode"]}
        if measured:
            row.update(status="ok", ms=r["ms"], tflops=r["tflops"])
        else:
            row.update(status="n/a", reason=r["note"].removeprefix("n/a (").removesuffix(")"))
        rows.append(row)
    names = dict.fromkeys(r["shape"] for r in rows)
    converted = {
        "schema": 0,
        "suite": "perceiver (bench_core.py: SDPA anchors only)",
        "timestamp": data["timestamp"],
        "dtype": data["dtype"].removeprefix("torch."),
        "versions": {"torch": data["torch"], "triton": data["triton"]},
        "device": {"type": "cuda", "name": data["device"], "sms": data.get("sms")},
        "shapes": [{"name": n, "description": SHAPES[n].describe()} for n in names if n in SHAPES],
        "rows": rows,
    }
    add_speedups(converted)
    return converted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="a bench.json (or an older core-*.json)")
    parser.add_argument("--out", type=Path, help="write bench.txt, bench.md and the plots here")
    args = parser.parse_args(argv)
    results = load_results(args.json)
    if results.get("suite") == "host":
        from . import host

        print(host.text_report(results))
        if args.out:
            for path in host.write_outputs(results, args.out):
                print(f"wrote {path}")
        return 0
    print(text_report(results))
    print()
    print(markdown_summary(results))
    if args.out:
        for path in write_outputs(results, args.out):
            print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
