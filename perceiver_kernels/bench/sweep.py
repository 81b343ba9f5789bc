"""Tile-config sweep of our Triton kernels on a GPU: how ``kernels/configs.py``'s defaults were chosen.

Usage: ``python -m perceiver_kernels.bench.sweep --shapes io-encoder,io-large-input,ar-cross [--out DIR]``. Times
the forward and the backward launchers directly (no autograd, no validation) for several block
configs, split-KV settings and both dQ strategies, and writes ``DIR/sweep.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from perceiver_kernels.kernels import configs

from .providers import make_inputs
from .shapes import SHAPES

FORWARD_CONFIGS = [  # (block_m, block_n, num_warps, num_stages, forced key splits; 0 = planner's choice)
    (128, 64, 4, 3, 0),
    (128, 64, 8, 3, 0),
    (128, 64, 8, 3, 1),
    (128, 128, 8, 3, 0),
    (64, 64, 4, 3, 0),
    (128, 64, 4, 4, 0),
    (128, 32, 4, 3, 0),
]
B = configs.BackwardConfig
BACKWARD_CONFIGS = [
    B(64, 128, 8, 2, "atomic"),
    B(128, 128, 8, 2, "atomic"),
    B(64, 128, 8, 2, "split", 128, 64, 8, 2),
    B(64, 128, 8, 3, "split", 128, 64, 8, 3),
    B(32, 128, 4, 3, "split", 128, 64, 8, 2),
    B(64, 128, 4, 3, "split", 64, 64, 4, 3),
    B(64, 64, 4, 3, "split", 128, 32, 4, 3),
    B(128, 128, 8, 2, "split", 128, 128, 8, 2),
]


def sweep(shape_name: str) -> list[dict]:
    from triton.testing import do_bench

    from perceiver_kernels.kernels.attention_bwd import attention_backward
    from perceiver_kernels.kernels.attention_fwd import attention_forward

    shape = SHAPES[shape_name]
    inputs = make_inputs(shape, torch.bfloat16, "cuda")
    q, k, v = (t.transpose(1, 2) for t in (inputs.q, inputs.k, inputs.v))
    pad, lengths = inputs.key_padding_mask, inputs.kv_lengths
    scale = shape.dqk**-0.5
    no_ar = (None, None, None, 0, True)  # kv_index, q_rope, k_rope, rotary_dim, rotary_interleaved
    rows = []

    def timed(label: str, config, fn, flops: float) -> None:
        try:
            ms = do_bench(fn, warmup=25, rep=150, return_mode="median")
        except Exception as e:  # noqa: BLE001 - a config that fails to compile is reported, not fatal
            ms = float("nan")
            print(f"  {label} {config} failed: {type(e).__name__}: {str(e)[:300]}")
        rows.append({"shape": shape.name, "pass": label, "config": str(config), "ms": ms, "tflops": flops / ms / 1e9})
        print(f"{shape.name:16s} {label:4s} {ms:.4f} ms {flops / ms / 1e9:6.1f} TFLOP/s {config}", flush=True)

    for bm, bn, warps, stages, splits in FORWARD_CONFIGS:
        cfg = configs.LaunchConfig(bm, bn, warps, stages)
        run = lambda cfg=cfg, splits=splits: attention_forward(q, k, v, pad, lengths, *no_ar, shape.causal, scale,
                                                               splits, cfg)  # fmt: skip
        timed("fwd", (cfg, f"splits={splits}"), run, shape.flops("fwd"))
    out, lse = attention_forward(q, k, v, pad, lengths, *no_ar, shape.causal, scale)
    grad = torch.randn_like(out)
    backward_flops = shape.flops("fwd+bwd") - shape.flops("fwd")
    for cfg in BACKWARD_CONFIGS:
        run = lambda cfg=cfg: attention_backward(
            grad, None, q, k, v, out, lse, pad, lengths, *no_ar, shape.causal, scale, 0, cfg
        )  # fmt: skip
        timed("bwd", cfg, run, backward_flops)
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="io-encoder,io-large-input,ar-cross")
    parser.add_argument("--out", type=Path, default=Path("."))
    args = parser.parse_args(argv)
    device = torch.cuda.get_device_name()
    results = {"device": device, "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "rows": []}
    for name in args.shapes.split(","):
        results["rows"].extend(sweep(name))
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "sweep.json").write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
