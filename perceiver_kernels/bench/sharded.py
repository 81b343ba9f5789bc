"""Sharded-input attention (``perceiver-kernels bench --suite sharded``): what the ranks exchange, and what
splitting the keys costs.

Three tables:

* ``traffic`` (computed, not measured): bytes one rank receives per cross-attention layer, forward and
  backward, at world sizes 2, 4 and 8, for the Perceiver suite's cross-attention shapes. Ours
  (``sharded_attention``): the lse all-gather ``(R - 1) B H Nq`` float32, the float32 partial output
  all-reduce and the backward's ``[dO | dlse]`` all-reduce, each ring all-reduce receiving ``2 (R - 1) / R`` of
  its buffer. Ring attention (K/V rotation: ring-flash-attention, TransformerEngine, Megatron CP): K and V in
  the forward, K, V and their gradients in the backward, ``3 (R - 1) / R`` of the K/V bytes in the input dtype.
* ``emulated``: the ranks' work in one process: the keys in R equal chunks, each attended by ``pk.attention``
  with its lse, merged by ``merge_attention``, forward+backward, against one call on all the keys (no
  communication: the local kernels plus the merge).
* ``gloo`` (CPU only): two processes run ``sharded_attention`` forward+backward on their halves of the keys,
  one thread each, against one process attending all of them; the gloo collectives included.
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

import perceiver_kernels as pk

from ..distributed.merge import merge_attention
from .shapes import PERCEIVER_SUITE, Shape

WORLD_SIZES = (2, 4, 8)
EMULATED_RANKS = (2, 4)
# CPU rows run the PyTorch reference path on shapes a CPU finishes in a fraction of a second.
CPU_SHAPES = (Shape("cpu-cross", 2, 4, 64, 8192, 32, 32), Shape("cpu-ar-cross", 2, 4, 64, 8192, 32, 32, causal=True))


def cross_attention_shapes() -> list[Shape]:
    """The Perceiver suite's cross-attention shapes (queries fewer than keys, with a backward)."""
    return [s for s in PERCEIVER_SUITE if s.nq < s.nk and not s.forward_only]


def traffic(shape: Shape, world: int, kv_bytes: int) -> dict:
    """Bytes one rank receives per layer, forward + backward (see the module docstring)."""
    rows = shape.batch * shape.heads * shape.nq  # (B, H, Nq): one lse each
    out = rows * shape.dv * 4  # the float32 partial output
    ring_reduce = 2 * (world - 1) / world
    ours = (world - 1) * rows * 4 + ring_reduce * out + ring_reduce * (out + rows * 4)
    kv = shape.batch * shape.nk * shape.heads * (shape.dqk + shape.dv) * kv_bytes
    ring = 3 * (world - 1) / world * kv
    return dict(shape=shape.name, world=world, ours_bytes=int(ours), ring_bytes=int(ring), ratio=ring / ours)


def _inputs(shape: Shape, device: torch.device, dtype: torch.dtype):
    q = torch.randn(shape.batch, shape.nq, shape.heads, shape.dqk, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(shape.batch, shape.nk, shape.heads, shape.dqk, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(shape.batch, shape.nk, shape.heads, shape.dv, device=device, dtype=dtype, requires_grad=True)
    return q, k, v


def _median_ms(step, device: torch.device, repeats: int) -> float:
    step()  # warm-up (Triton compiles, caches fill)
    samples = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        samples.append((time.perf_counter() - start) * 1e3)
    return statistics.median(samples)


def emulated(shape: Shape, ranks: int, device: torch.device, dtype: torch.dtype, backend: str) -> dict:
    """Forward+backward of R chunk attentions plus their merge, against one call on all the keys."""
    q, k, v = _inputs(shape, device, dtype)
    bounds = [(r * shape.nk // ranks, (r + 1) * shape.nk // ranks) for r in range(ranks)]
    grad = torch.randn(shape.batch, shape.nq, shape.heads, shape.dv, device=device, dtype=dtype)

    def whole():
        q.grad = k.grad = v.grad = None
        pk.attention(q, k, v, causal=shape.causal, backend=backend).backward(grad)

    def split():
        q.grad = k.grad = v.grad = None
        parts = []
        for r, (a, b) in enumerate(bounds):  # causal: only the last chunk holds the latents' diagonal
            causal = shape.causal and r == ranks - 1
            parts.append(pk.attention(q, k[:, a:b], v[:, a:b], causal=causal, backend=backend, return_lse=True))
        out, _ = merge_attention(torch.stack([o for o, _ in parts]), torch.stack([s for _, s in parts]))
        out.to(dtype).backward(grad)

    repeats = 10 if device.type == "cuda" else 3
    whole_ms, split_ms = _median_ms(whole, device, repeats), _median_ms(split, device, repeats)
    return dict(shape=shape.name, ranks=ranks, whole_ms=whole_ms, split_ms=split_ms, ratio=split_ms / whole_ms)


def _gloo_worker(rank: int, world: int, shape: Shape, results: str) -> None:
    import torch.distributed as dist

    from ..distributed import sharded_attention

    torch.manual_seed(0)
    q, k, v = _inputs(shape, torch.device("cpu"), torch.float32)
    size = shape.nk // world
    k_local = k.detach()[:, rank * size : (rank + 1) * size].clone().requires_grad_()
    v_local = v.detach()[:, rank * size : (rank + 1) * size].clone().requires_grad_()
    grad = torch.randn(shape.batch, shape.nq, shape.heads, shape.dv)
    after = (world - 1 - rank) * size

    def sharded():
        q.grad = k_local.grad = v_local.grad = None
        out = sharded_attention(q, k_local, v_local, causal=shape.causal, backend="reference",
                                keys_before=rank * size, keys_after=after)  # fmt: skip
        out.backward(grad)

    def whole():
        q.grad = k.grad = v.grad = None
        pk.attention(q, k, v, causal=shape.causal, backend="reference").backward(grad)

    sharded_ms = _median_ms(sharded, torch.device("cpu"), 5)
    dist.barrier()
    whole_ms = _median_ms(whole, torch.device("cpu"), 5) if rank == 0 else 0.0
    if rank == 0:
        Path(results).write_text(json.dumps(dict(sharded_ms=sharded_ms, whole_ms=whole_ms)))
    dist.barrier()


def gloo(shape: Shape, world: int = 2) -> dict:
    """``sharded_attention`` over ``world`` gloo processes against one process on all the keys (CPU)."""
    import tempfile

    from ..distributed.testing import spawn

    with tempfile.TemporaryDirectory() as folder:
        results = Path(folder) / "gloo.json"
        spawn(_gloo_worker, world, shape, str(results))
        timing = json.loads(results.read_text())
    return dict(shape=shape.name, world=world, **timing, ratio=timing["sharded_ms"] / timing["whole_ms"])


def run(device: torch.device, dtype: torch.dtype, shapes: list[str] | None = None) -> dict:
    """Every table of the module docstring for ``device`` (``shapes``: a subset by name)."""
    timed = list(CPU_SHAPES) if device.type == "cpu" else cross_attention_shapes()
    if shapes:
        timed = [s for s in timed if s.name in shapes]
    backend = "reference" if device.type == "cpu" else "auto"
    kv_bytes = torch.finfo(dtype).bits // 8
    results = {
        "suite": "sharded", "device": str(device), "dtype": str(dtype).removeprefix("torch."),
        "traffic": [traffic(s, world, kv_bytes) for s in cross_attention_shapes() for world in WORLD_SIZES],
        "emulated": [emulated(s, r, device, dtype, backend) for s in timed for r in EMULATED_RANKS],
        "gloo": [gloo(s) for s in timed] if device.type == "cpu" else [],
    }  # fmt: skip
    return results


def text_report(results: dict) -> str:
    mib = 2.0**20
    lines = [f"sharded attention on {results['device']} ({results['dtype']})", "",
             "traffic per cross-attention layer, forward + backward, bytes one rank receives (computed):",
             f"{'shape':24s} {'ranks':>5s} {'ours MiB':>10s} {'ring K/V MiB':>13s} {'ring / ours':>11s}"]  # fmt: skip
    for row in results["traffic"]:
        lines.append(f"{row['shape']:24s} {row['world']:5d} {row['ours_bytes'] / mib:10.2f} "
                     f"{row['ring_bytes'] / mib:13.1f} {row['ratio']:10.0f}x")  # fmt: skip
    lines += ["", "ranks emulated in one process (chunks + merge vs one call), forward + backward:",
              f"{'shape':24s} {'ranks':>5s} {'whole ms':>9s} {'split ms':>9s} {'split/whole':>11s}"]  # fmt: skip
    for row in results["emulated"]:
        lines.append(f"{row['shape']:24s} {row['ranks']:5d} {row['whole_ms']:9.2f} {row['split_ms']:9.2f} "
                     f"{row['ratio']:11.2f}")  # fmt: skip
    if results["gloo"]:
        lines += ["", "gloo, 2 CPU processes (1 thread, float32 each): sharded_attention vs one process, fwd+bwd:",
                  f"{'shape':24s} {'whole ms':>9s} {'sharded ms':>10s} {'sharded/whole':>13s}"]  # fmt: skip
        for row in results["gloo"]:
            lines.append(f"{row['shape']:24s} {row['whole_ms']:9.2f} {row['sharded_ms']:10.2f} {row['ratio']:13.2f}")
    return "\n".join(lines)


def run_cli(args, device: torch.device, dtype: torch.dtype) -> int:
    """``perceiver-kernels bench --suite sharded``."""
    results = run(device, dtype, args.shapes)
    print(text_report(results))
    if args.out:
        out_dir = Path(args.out)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "sharded.json").write_text(json.dumps(results, indent=1))
        (out_dir / "sharded.txt").write_text(text_report(results) + "\n")
        print(f"\nwrote {out_dir / 'sharded.json'}, {out_dir / 'sharded.txt'}")
    return 0
