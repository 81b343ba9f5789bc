"""Markdown table of a ``core_bench.json``: our time and TFLOP/s next to the best SDPA backend.

Usage: ``python benchmarks/summarize.py benchmarks/results/core-h200-2026-11-26-run3.json``
"""

from __future__ import annotations

import json
import math
import sys


def summarize(path: str) -> str:
    data = json.load(open(path))
    rows = {}
    for r in data["rows"]:
        rows.setdefault((r["shape"], r["mode"]), []).append(r)
    lines = [
        f"{data['device']}, torch {data['torch']}, triton {data['triton']}, {data['dtype']}, {data['timestamp']}",
        "",
        "| shape | pass | ours ms | ours TFLOP/s | best SDPA backend | its ms | speedup |",
        "|---|---|---|---|---|---|---|",
    ]
    for (shape, mode), entries in rows.items():
        ours = next(e for e in entries if e["provider"].endswith("(ours)"))
        others = [e for e in entries if not e["provider"].endswith("(ours)") and not math.isnan(e["ms"])]
        if others:
            best = min(others, key=lambda e: e["ms"])
            best_cells = f"{best['provider']} | {best['ms']:.3f} | {best['ms'] / ours['ms']:.2f}x"
        else:
            best_cells = "none runs this shape | - | -"
        lines.append(f"| {shape} | {mode} | {ours['ms']:.3f} | {ours['tflops']:.0f} | {best_cells} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(summarize(sys.argv[1]))
