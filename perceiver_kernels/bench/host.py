"""Host overhead per call: what ``pk.attention`` costs the CPU apart from its kernels (``--suite host``).

On a tiny input, where any kernel takes microseconds, a call's time is its host work: validation,
planning, allocation, the autograd bookkeeping and the launches themselves. Per case and mode
(``fwd``, ``fwd+bwd``) one row records:

* ``us``: our whole per-call time with every Triton launch skipped through the package's measurement
  hook (``perceiver_kernels.kernels.launch.record_launches(execute=False)``), so it needs no GPU;
* ``sdpa_us`` and ``ratio``: ``F.scaled_dot_product_attention``'s whole per-call time on the same tiny
  input (it really runs: on 16x16 its compute is negligible), timed in turns with ours (REPEATS loops of
  each, alternating, so that a shared machine's drift hits both alike), and the median of the per-loop
  ratios ours / SDPA, against the case's ``target`` (issue 13: 2x for plain and causal calls, 3x with
  padding, rotary or a gather);
* ``launches`` and ``allocations`` per call (tensors with fresh storage, counted by a dispatch mode);
* ``aten_pct``: the share of the call spent in ATen ops (dispatcher, allocation, small tensor ops), from
  ``torch.profiler``; the rest is Python (ours and autograd's).

On a GPU each row also runs for real (``real_us``: wall time per call of a long loop, host-bound at this
size), so ``launcher_us = real_us - us`` is the Triton launchers' share, and ``kernel_us`` is the
kernels' device time per call from the profiler.

Value checks (``pk.set_value_checks``) are off while measuring: the default path is what is timed.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import perceiver_kernels as pk
from perceiver_kernels.kernels.launch import record_launches

MODES = ("fwd", "fwd+bwd")
CALLS, REPEATS, WARMUP = 200, 11, 20  # per timing: the median of REPEATS loops of CALLS calls
HEADS, HEAD_DIM, TOKENS = 1, 16, 16  # the tiny problem: (B, 16, 1, 16)


@dataclass(frozen=True)
class HostCase:
    """One call of ``pk.attention`` on a tiny ``(B, N, 1, 16)`` problem."""

    name: str
    target: float  # ours / SDPA per-call time that the case should stay under
    batch: int = 1
    q_batch: int | None = None  # None: batch
    nq: int = TOKENS
    causal: bool = False
    kv_lengths: bool = False
    key_padding: bool = False
    rotary_dim: int = 0
    kv_index: bool = False
    custom_op: bool = False  # through torch.ops.perceiver_kernels.triton_attention_fwd (what torch.compile calls)
    note: str = field(default="", compare=False)

    def options(self, device: torch.device) -> dict:
        options = {"causal": self.causal}
        if self.kv_lengths:
            options["kv_lengths"] = torch.arange(self.batch, device=device, dtype=torch.int32) + TOKENS - self.batch
        if self.key_padding:
            mask = torch.zeros(self.batch, TOKENS, dtype=torch.bool, device=device)
            mask[:, 3] = True
            options["key_padding_mask"] = mask
        if self.rotary_dim:
            options["rotary_dim"] = self.rotary_dim
        if self.kv_index:
            options["kv_index"] = torch.arange(0, TOKENS, 2, device=device).expand(self.batch, -1)
        return options


HOST_CASES = (
    HostCase("plain", 2.0),
    HostCase("causal+kv_lengths", 2.0, batch=2, causal=True, kv_lengths=True),
    HostCase("key-padding", 3.0, batch=2, key_padding=True),
    HostCase("rotary", 3.0, causal=True, rotary_dim=8, note="causal, default positions"),
    HostCase("kv_index-gather", 3.0, causal=True, kv_index=True, note="causal, every other key"),
    HostCase("broadcast-query", 2.0, batch=2, q_batch=1, note="a batch-1 latent array over B=2"),
    HostCase(
        "decode",
        3.0,
        batch=2,
        nq=1,
        causal=True,
        kv_lengths=True,
        rotary_dim=8,
        note="1 query, causal, per-sample kv_lengths, rotary",
    ),  # fmt: skip
    HostCase("plain-custom-op", 2.0, custom_op=True, note="the torch.library op torch.compile calls, in eager"),
)


class CountAllocations(TorchDispatchMode):
    """Counts the tensors ATen ops create with fresh storage (views and in-place results excluded), and their
    bytes."""

    def __init__(self):
        super().__init__()
        self.count = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if isinstance(t, Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, Tensor) and t.untyped_storage()._cdata not in given:
                self.count += 1
                self.bytes += t.untyped_storage().nbytes()
        return out


def _inputs(case: HostCase, device: torch.device, dtype: torch.dtype, requires_grad: bool):
    q_batch = case.batch if case.q_batch is None else case.q_batch

    def rand(batch, n):
        return torch.randn(batch, n, HEADS, HEAD_DIM, device=device, dtype=dtype, requires_grad=requires_grad)

    return rand(q_batch, case.nq), rand(case.batch, TOKENS), rand(case.batch, TOKENS)


def make_call(case: HostCase, mode: str, device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    """One call of ours: ``pk.attention`` (or the custom op), and in fwd+bwd its backward with the input
    gradients reset first (so autograd stores, not accumulates, as in a training step)."""
    q, k, v = _inputs(case, device, dtype, mode != "fwd")
    options = case.options(device)
    if case.custom_op:
        scale = HEAD_DIM**-0.5

        def attend():
            args = (q, k, v, None, None, None, None, None, 0, True, options["causal"], scale, 0)
            return torch.ops.perceiver_kernels.triton_attention_fwd(*args)[0]
    else:

        def attend():
            return pk.attention(q, k, v, backend="triton", **options)

    return _step(attend, mode, (q, k, v), (k.shape[0], case.nq, HEADS, HEAD_DIM))


def make_sdpa_call(mode: str, device: torch.device, dtype: torch.dtype) -> Callable[[], None]:
    """SDPA's whole call on the plain tiny input, in the (B, N, H, D) layout as ours: transposed views."""
    q, k, v = _inputs(HOST_CASES[0], device, dtype, mode != "fwd")
    return _step(
        lambda: F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)),
        mode, (q, k, v), (q.shape[0], HEADS, TOKENS, HEAD_DIM),
    )  # fmt: skip


def _step(attend: Callable[[], Tensor], mode: str, inputs: tuple[Tensor, ...], out_shape) -> Callable[[], None]:
    if mode == "fwd":

        def forward():
            with torch.no_grad():
                attend()

        return forward
    grad = torch.randn(out_shape, device=inputs[0].device, dtype=inputs[0].dtype)

    def forward_backward():
        for t in inputs:
            t.grad = None
        attend().backward(grad)

    return forward_backward


def loop_us(call: Callable[[], None], device: torch.device, calls: int = CALLS) -> float:
    """Microseconds per call over one loop of ``calls`` calls (a GPU is synchronised once, at the end, so a
    host-bound call is timed by its host time)."""
    start = time.perf_counter()
    for _ in range(calls):
        call()
    _sync(device)
    return (time.perf_counter() - start) / calls * 1e6


def timed_side_by_side(ours: Callable[[], None], sdpa: Callable[[], None], device: torch.device) -> dict:
    """REPEATS loops of each, taking turns (so drift on a shared machine hits both alike), ours with its
    launches skipped, with the garbage collector paused: ``us``, ``p20_us``, ``p80_us``, ``sdpa_us`` and
    ``ratio``, the median of the per-repeat ratios."""
    with record_launches(execute=False):
        for _ in range(WARMUP):
            ours()
    for _ in range(WARMUP):
        sdpa()
    _sync(device)
    gc.collect()
    gc.disable()
    try:
        pairs = []
        for _ in range(REPEATS):
            reference = loop_us(sdpa, device)
            with record_launches(execute=False):
                pairs.append((loop_us(ours, device), reference))
    finally:
        gc.enable()
    ours_us = sorted(o for o, _ in pairs)
    quantile = statistics.quantiles(ours_us, n=5, method="inclusive")
    return {
        "us": statistics.median(ours_us), "p20_us": quantile[0], "p80_us": quantile[3],
        "sdpa_us": statistics.median(r for _, r in pairs), "ratio": statistics.median(o / r for o, r in pairs),
    }  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def profile_split(call: Callable[[], None], device: torch.device, calls: int = 50) -> dict:
    """``aten_pct`` (share of host time in ATen ops), and on a GPU ``kernel_us`` (device time per call)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    call()
    _sync(device)
    with profile(activities=activities) as prof:
        start = time.perf_counter()
        for _ in range(calls):
            call()
        _sync(device)
        wall_us = (time.perf_counter() - start) * 1e6
    events = prof.key_averages()
    aten_us = sum(e.self_cpu_time_total for e in events if e.key.startswith("aten::"))
    split = {"aten_pct": 100 * min(aten_us / wall_us, 1.0)}
    if device.type == "cuda":
        kernel_us = sum(getattr(e, "self_device_time_total", 0.0) for e in events if e.device_type.name == "CUDA")
        split["kernel_us"] = kernel_us / calls
    return split


def measure_case(case: HostCase, mode: str, device: torch.device, dtype: torch.dtype) -> dict:
    call = make_call(case, mode, device, dtype)
    row = {"kind": "host", "case": case.name, "mode": mode, "target": case.target, "note": case.note}
    with record_launches(execute=False) as log:
        call()
    row["launches"] = log.count
    row["kernels"] = log.kernels
    with record_launches(execute=False), CountAllocations() as counter:
        call()
    row["allocations"] = counter.count
    row.update(timed_side_by_side(call, make_sdpa_call(mode, device, dtype), device))
    with record_launches(execute=False):
        row.update(profile_split(call, device))
    row["meets_target"] = row["ratio"] <= case.target
    if device.type == "cuda":
        for _ in range(WARMUP):
            call()
        row["real_us"] = statistics.median(loop_us(call, device) for _ in range(REPEATS))
        row["launcher_us"] = row["real_us"] - row["us"]
        row.update({f"real_{k}": v for k, v in profile_split(call, device).items()})
    return row


def run_host_suite(device: torch.device, dtype: torch.dtype, cases=HOST_CASES, modes=MODES, progress=None) -> dict:
    """Every case in every mode, next to SDPA's per-call time measured in the same run."""
    from tqdm import tqdm

    from .suite import environment

    results = environment(device, dtype)
    results.update(suite="host", modes=list(modes), calls=CALLS, repeats=REPEATS, rows=[], sdpa={})
    checks = pk.set_value_checks(False)
    disable = {None: None, True: False, False: True}[progress]
    bar = tqdm(total=len(cases) * len(modes), unit="row", disable=disable, dynamic_ncols=True)
    try:
        for case in cases:
            for mode in modes:
                bar.set_description(f"{case.name} {mode}")
                results["rows"].append(measure_case(case, mode, device, dtype))
                bar.update(1)
    finally:
        bar.close()
        pk.set_value_checks(checks)
    for mode in modes:  # SDPA's per-call time over the whole run (each row has the one measured beside it)
        results["sdpa"][mode] = {"us": statistics.median(r["sdpa_us"] for r in results["rows"] if r["mode"] == mode)}
    return results


# -- reading the results -------------------------------------------------------------------------------

COLUMNS = ("case", "mode", "ours us (p20-p80)", "SDPA us", "ratio", "target", "launches", "allocs", "ATen %")


def _cells(row: dict) -> tuple[str, ...]:
    verdict = "ok" if row["meets_target"] else "OVER"
    cells = (
        row["case"], row["mode"], f"{row['us']:.1f} ({row['p20_us']:.1f}-{row['p80_us']:.1f})",
        f"{row['sdpa_us']:.1f}", f"{row['ratio']:.2f}x", f"<= {row['target']:.0f}x {verdict}",
        str(row["launches"]), str(row["allocations"]), f"{row['aten_pct']:.0f}",
    )  # fmt: skip
    if "real_us" in row:
        cells += (f"{row['real_us']:.1f}", f"{row['launcher_us']:.1f}", f"{row.get('real_kernel_us', 0.0):.1f}")
    return cells


def _columns(results: dict) -> tuple[str, ...]:
    gpu = any("real_us" in r for r in results["rows"])
    return COLUMNS + (("real us", "launcher us", "kernel us") if gpu else ())


def title(results: dict) -> str:
    device = results["device"]["name"]
    versions = results["versions"]
    return (
        f"perceiver-kernels host overhead per call on {device} ({results['dtype']}, torch {versions['torch']}, "
        f"triton {versions['triton']}, {results['timestamp']}, git {results['git']['sha'][:10]})"
    )


def text_report(results: dict) -> str:
    columns = _columns(results)
    table = [columns] + [_cells(r) for r in results["rows"]]
    widths = [max(len(row[i]) for row in table) for i in range(len(columns))]
    lines = [title(results), ""]
    sdpa = results["sdpa"]
    lines.append("SDPA whole call: " + ", ".join(f"{m} {sdpa[m]['us']:.1f} us" for m in sdpa))
    lines.append("ours: pk.attention(backend='triton') with every launch skipped (host work only)")
    lines.append("")
    for i, row in enumerate(table):
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(results: dict) -> str:
    columns = _columns(results)
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cells(r)) + " |" for r in results["rows"]]
    return "\n".join(lines)


def write_outputs(results: dict, out_dir: Path) -> list[Path]:
    """``bench.txt``, ``bench.md`` and ``host.png`` (ours / SDPA per case, with the targets)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    text, md = out_dir / "bench.txt", out_dir / "bench.md"
    text.write_text(text_report(results) + "\n")
    md.write_text(f"{title(results)}\n\n{markdown_table(results)}\n")
    return [text, md, _plot(results, out_dir)]


def _plot(results: dict, out_dir: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases = list(dict.fromkeys(r["case"] for r in results["rows"]))
    modes = results["modes"]
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(cases)), 3.8))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        rows = {r["case"]: r for r in results["rows"] if r["mode"] == mode}
        xs = [c + (i - (len(modes) - 1) / 2) * width for c in range(len(cases))]
        ax.bar(xs, [rows[c]["ratio"] for c in cases], width, label=mode, color=("#d95f02", "#7570b3")[i % 2])
    targets = {r["case"]: r["target"] for r in results["rows"]}
    ax.scatter(range(len(cases)), [targets[c] for c in cases], marker="_", s=900, color="black", label="target")
    ax.set_xticks(range(len(cases)), cases, rotation=25, ha="right", fontsize=8)
    ax.set_ylabel("ours / SDPA, host time per call")
    ax.set_title(f"host overhead per call, {results['device']['name']}", fontsize=9)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path = out_dir / "host.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def run_cli(args, device: torch.device, dtype: torch.dtype) -> int:
    """``perceiver-kernels bench --suite host``."""
    modes = list(MODES) if args.mode == "both" else [args.mode]
    cases = HOST_CASES
    if args.shapes:
        names = {c.name for c in HOST_CASES}
        unknown = sorted(set(args.shapes) - names)
        if unknown:
            print(f"bench: --shapes {', '.join(unknown)} not in the host suite ({', '.join(names)})")
            return 2
        cases = tuple(c for c in HOST_CASES if c.name in args.shapes)
    results = run_host_suite(device, dtype, cases, modes, args.progress)
    print(text_report(results))
    if args.out:
        from .suite import write_json

        out_dir = Path(args.out)
        written = [write_json(results, out_dir), *write_outputs(results, out_dir)]
        print(f"\nwrote {', '.join(str(p) for p in written)}")
    return 0
