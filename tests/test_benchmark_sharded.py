"""``perceiver-kernels bench --suite sharded`` (perceiver_kernels/bench/sharded.py): the traffic it computes, and
its timed tables on CPU (ranks emulated in one process, and two gloo processes)."""

import json

import pytest
import torch

from perceiver_kernels.bench import sharded
from perceiver_kernels.bench.shapes import Shape


def test_traffic_counts_what_each_rank_receives():
    # B1 H1 Nq2 Nk8 D4, 2 ranks, 2-byte K/V. Ours: the other rank's lse (2 x 4 bytes), the float32 output's ring
    # all-reduce (2 (R-1)/R = 1 of its 32 bytes), the backward's [dO | dlse] all-reduce (32 + 8 bytes): 80.
    # Ring attention: 3 (R-1)/R of the K/V bytes (8 keys x (4 + 4) channels x 2 bytes = 128): 192.
    row = sharded.traffic(Shape("t", 1, 1, 2, 8, 4, 4), world=2, kv_bytes=2)
    assert (row["ours_bytes"], row["ring_bytes"]) == (80, 192)
    # The example: B8 Nq1024 C1024 over Nk = 131072 bf16 keys: ~34 MB of partials per direction
    # against ~4.3 GB of K/V.
    big = sharded.traffic(Shape("b", 8, 8, 1024, 131072, 128, 128), world=2, kv_bytes=2)
    assert 60e6 < big["ours_bytes"] < 70e6 and 6.3e9 < big["ring_bytes"] < 6.5e9


def test_suite_runs_on_cpu_and_writes_its_tables(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sharded, "CPU_SHAPES", (Shape("cpu-cross", 2, 2, 16, 512, 16, 16),))  # small: a smoke run

    class Args:
        shapes = ["cpu-cross"]
        out = str(tmp_path)

    assert sharded.run_cli(Args, torch.device("cpu"), torch.float32) == 0
    results = json.loads((tmp_path / "sharded.json").read_text())
    assert {r["ranks"] for r in results["emulated"]} == set(sharded.EMULATED_RANKS)
    assert [r["world"] for r in results["gloo"]] == [2]
    for row in results["emulated"] + results["gloo"]:
        assert row["ratio"] == pytest.approx(row.get("split_ms", row.get("sharded_ms")) / row["whole_ms"])
    assert "ring / ours" in (tmp_path / "sharded.txt").read_text() and "gloo" in capsys.readouterr().out
