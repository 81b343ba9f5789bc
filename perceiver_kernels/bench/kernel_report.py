"""Static kernel report: every Triton kernel the dispatcher launches for the suite's shapes, compiled for
a GPU that need not be there (``perceiver-kernels kernels --arch 90``).

How: the suite's problems are built as meta tensors (shapes, strides and dtypes, no data) and run through
the real launchers with every launch recorded and skipped (``kernels.launch.record_launches``), while
``configs.set_planned_gpu`` makes the launchers plan tiles and split-KV as for the target GPU. Each
distinct launch is then compiled by Triton for that target (``triton.compile(ASTSource(...),
target=GPUTarget("cuda", arch, 32))``, specialised from the recorded arguments as a real launch would
be), and its PTX assembled by Triton's ``ptxas -v``. Per kernel: registers per thread, spill stores and
loads, shared memory against the card's per-block limit, and whether the dots became ``wgmma`` (Hopper)
or ``mma`` instructions. This is how tile configs are judged between GPU runs; the figures are this
machine's Triton's (the lent GPUs may run an older one: the report names its version).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

ARCHES = {
    90: {"gpu": "sm_90a (H100/H200)", "sms": 132, "shared_limit": 232448},  # 227 KiB per block (opt-in)
    80: {"gpu": "sm_80 (A100)", "sms": 108, "shared_limit": 166912},  # 163 KiB per block (opt-in)
}
REGISTER_FILE = 65536  # 32-bit registers per SM on sm_80 and sm_90
# The kernels' feature flags, shown with each config (what differs between two launches of one kernel).
FLAGS = ("CAUSAL", "HAS_PAD", "HAS_KVLEN", "HAS_KV_INDEX", "ROTARY", "HAS_DLSE", "ATOMIC_DQ")


@dataclass(frozen=True)
class Compiled:
    """One distinct launch, compiled."""

    kernel: str
    config: str
    registers: int
    spill_stores: int
    spill_loads: int
    shared: int
    wgmma: int
    mma: int
    num_warps: int


@dataclass(frozen=True)
class MetaProblem:
    """One attention call as meta tensors (shapes, strides and dtypes, no data)."""

    name: str
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    options: dict
    forward_only: bool = False
    lse_gradient: bool = False  # the backward also receives a gradient of the lse (HAS_DLSE)


def suite_problem(shape, dtype: torch.dtype) -> MetaProblem:
    """A suite shape's ``pk.attention`` call, laid out as the suite lays it out ((B, H, N, D) storage viewed
    as (B, N, H, D)), with its masks, lengths, positions and gather."""

    def tensor(n: int, d: int):
        return torch.empty(shape.batch, shape.heads, n, d, device="meta", dtype=dtype).transpose(1, 2)

    def meta(t):
        return None if t is None else t.to("meta")

    positions = shape.positions() or (None, None)
    options = dict(
        causal=shape.causal, key_padding_mask=meta(shape.key_padding_mask()), kv_lengths=meta(shape.kv_lengths()),
        kv_index=meta(shape.kv_index()), rotary_dim=shape.rotary_dim, q_positions=meta(positions[0]),
        k_positions=meta(positions[1]),
    )  # fmt: skip
    q, k, v = tensor(shape.nq, shape.dqk), tensor(shape.nk, shape.dqk), tensor(shape.nk, shape.dv)
    return MetaProblem(shape.name, q, k, v, options, forward_only=shape.forward_only)


def matrix_problems(dtypes: tuple[torch.dtype, ...]) -> list[MetaProblem]:
    """The correctness matrix (``testing.FEATURE_CASES`` and ``AR_CASES``: what the GPU tests compile), in
    each dtype, with a gradient flowing into the lse too (every flag combination the tests reach)."""
    from perceiver_kernels.testing import AR_CASES, FEATURE_CASES, attention_options, make_inputs

    problems = []
    for dtype in dtypes:
        for name, case in {**FEATURE_CASES, **AR_CASES}.items():
            inputs = make_inputs(case, dtype, "meta")
            label = f"{name} {str(dtype).removeprefix('torch.')}"
            problems.append(
                MetaProblem(label, inputs["q"], inputs["k"], inputs["v"], attention_options(inputs), lse_gradient=True)
            )
    return problems


def recorded_launches(problems: list[MetaProblem], sms: int) -> list[tuple[str, str, object]]:
    """``(problem name, pass, Launch)`` for every launch of every problem's forward and backward, planned
    for a GPU with ``sms`` SMs."""
    from perceiver_kernels.kernels import attention_bwd, attention_fwd, common, configs
    from perceiver_kernels.kernels.launch import record_launches
    from perceiver_kernels.ops.triton_attention import triton_attention
    from perceiver_kernels.problem import describe, set_value_checks

    caches = (common.prologue, attention_fwd.forward_plan, attention_bwd.backward_plan)
    launches = []
    checks = set_value_checks(False)  # meta tensors have no values to check
    previous = configs.set_planned_gpu(sms)
    for cache in caches:
        cache.cache_clear()
    try:
        for problem in problems:
            q, k, v = (t.detach().requires_grad_(not problem.forward_only) for t in (problem.q, problem.k, problem.v))
            with record_launches(execute=False, keep_args=True) as log:
                out, lse = triton_attention(describe(q, k, v, **problem.options))
                forward = len(log.calls)
                if problem.lse_gradient:
                    torch.autograd.backward((out, lse), (torch.empty_like(out), torch.empty_like(lse)))
                elif not problem.forward_only:
                    out.backward(torch.empty_like(out))
            launches += [(problem.name, "fwd" if i < forward else "bwd", call) for i, call in enumerate(log.calls)]
    finally:
        set_value_checks(checks)
        configs.set_planned_gpu(previous)
        for cache in caches:
            cache.cache_clear()
    return launches


def _ptxas_stats(ptx: str, arch: int) -> tuple[int, int, int]:
    """``(registers, spill store bytes, spill load bytes)`` from ``ptxas -v`` (Triton's own ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    gpu = f"sm_{arch}a" if arch >= 90 else f"sm_{arch}"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "kernel.ptx"
        path.write_text(ptx)
        log = subprocess.run(
            # The flags Triton's own ptxas call uses (triton/backends/nvidia/compiler.py, make_cubin).
            [get_ptxas(arch).path, "-lineinfo", "-v", "--regAllocOptLevel=2", f"--gpu-name={gpu}", str(path), "-o",
             str(path.with_suffix(".o"))],
            capture_output=True, text=True, check=True,
        ).stderr  # fmt: skip
    registers = int(re.search(r"Used (\d+) registers", log).group(1))
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", log)
    return registers, int(spills.group(1)), int(spills.group(2))


def compile_launch(call, arch: int) -> tuple[tuple, Compiled]:
    """Compile one recorded launch for ``arch`` as Triton's launch path would specialise it; returns its
    compile key (to skip duplicates) and the figures."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    kernel = call.kernel
    binder = create_function_from_signature(kernel.signature, kernel.params, backend)
    kwargs = dict(call.constexprs, debug=False, instrumentation_mode=knobs.compilation.instrumentation_mode)
    bound, specialization, options = binder(*call.args, **kwargs)
    options, signature, constexprs, attrs = kernel._pack_args(backend, kwargs, bound, specialization, options)
    key = (kernel.__name__, repr(signature), repr(sorted(constexprs.items())), repr(attrs), repr(options))
    compiled = triton.compile(ASTSource(kernel, signature, constexprs, attrs), target=target, options=options.__dict__)
    ptx = compiled.asm["ptx"]
    registers, stores, loads = _ptxas_stats(ptx, arch)
    tiles = {k: v for k, v in call.constexprs.items() if k.startswith(("BLOCK_", "NUM_D"))}
    config = " ".join(f"{k}={v}" for k, v in tiles.items())
    config += f" warps={call.constexprs.get('num_warps', 4)} stages={call.constexprs.get('num_stages', 3)}"
    flags = [name for name in FLAGS if call.constexprs.get(name) is True]
    if flags:
        config += " " + "+".join(flags)
    return key, Compiled(
        kernel.__name__, config, registers, stores, loads, compiled.metadata.shared,
        ptx.count("wgmma.mma_async"), ptx.count("mma.sync"), options.num_warps,
    )  # fmt: skip


def run_report(arch: int, problems: list[MetaProblem], label: str, progress: bool | None = None) -> dict:
    import triton
    from tqdm import tqdm

    spec = ARCHES[arch]
    started = time.perf_counter()
    rows: dict[tuple, dict] = {}
    launches = recorded_launches(problems, spec["sms"])
    disable = {None: None, True: False, False: True}[progress]
    for shape_name, pass_, call in tqdm(launches, unit="launch", disable=disable):
        key, figures = compile_launch(call, arch)
        row = rows.get(key)
        if row is None:
            threads = 32 * figures.num_warps
            row = rows[key] = {
                **figures.__dict__,
                "shapes": [],
                "ctas_per_sm_by_registers": REGISTER_FILE // max(1, figures.registers * threads),
                "shared_ok": figures.shared <= spec["shared_limit"],
            }
        used_by = f"{shape_name} {pass_}"
        if used_by not in row["shapes"]:
            row["shapes"].append(used_by)
    from .suite import _git_revision

    return {
        "kind": "kernel-report",
        "git": _git_revision(),
        "arch": arch,
        **spec,
        "problems": label,
        "triton": triton.__version__,
        "torch": torch.__version__,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "elapsed_s": time.perf_counter() - started,
        "rows": list(rows.values()),
    }


def text_report(results: dict) -> str:
    header = ("kernel", "config", "regs", "spill st/ld", "smem KiB", "dots", "CTA/SM(regs)", "used by")
    table = [header]
    for r in results["rows"]:
        dots = f"wgmma x{r['wgmma']}" if r["wgmma"] else f"mma x{r['mma']}" if r["mma"] else "-"
        shared = f"{r['shared'] / 1024:.1f}" + ("" if r["shared_ok"] else " OVER")
        table.append((
            r["kernel"], r["config"], str(r["registers"]), f"{r['spill_stores']}/{r['spill_loads']}", shared, dots,
            str(r["ctas_per_sm_by_registers"]), ", ".join(r["shapes"]),
        ))  # fmt: skip
    widths = [max(len(row[i]) for row in table) for i in range(len(header) - 1)]
    lines = [
        f"Static kernel report: {results['gpu']}, {results['problems']}, triton {results['triton']}, "
        f"shared-memory limit {results['shared_limit'] / 1024:.0f} KiB per block ({results['timestamp']}, git "
        f"{results['git']['sha'][:10]}{' dirty' if results['git']['dirty'] else ''}; compiled without a GPU)",
        "",
    ]
    for i, row in enumerate(table):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row[:-1], widths, strict=True)) + "  " + row[-1])
        if i == 0:
            lines.append("  ".join("-" * w for w in widths) + "  " + "-" * 7)
    return "\n".join(lines)


def findings(results: dict, fast_path_only: bool = True) -> list[str]:
    """Spills (in fast-path kernels: head dims in one tile, ``NUM_DK``/``NUM_DV`` 1) and shared memory over
    the card's limit (in any kernel)."""
    found = []
    for r in results["rows"]:
        chunked = re.search(r"NUM_D[KV]=([2-9]|\d\d)", r["config"]) is not None
        if (r["spill_stores"] or r["spill_loads"]) and not (fast_path_only and chunked):
            found.append(f"{r['kernel']} [{r['config']}] spills {r['spill_stores']}/{r['spill_loads']} bytes")
        if not r["shared_ok"]:
            found.append(f"{r['kernel']} [{r['config']}] needs {r['shared']} bytes of shared memory")
    return found


def main(argv: list[str] | None = None) -> int:
    """``perceiver-kernels kernels``: exits 1 when a fast-path kernel spills or any kernel exceeds the card's
    shared memory."""
    from .shapes import SUITES

    parser = argparse.ArgumentParser(prog="perceiver-kernels kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, choices=sorted(ARCHES), default=90, help="compute capability x10")
    parser.add_argument(
        "--suite",
        choices=(*sorted(SUITES), "matrix"),
        default="perceiver",
        help="a benchmark suite's shapes, or the tests' correctness matrix (float16, bfloat16 and float32)",
    )
    parser.add_argument("--shapes", help="comma-separated subset of the suite's shapes")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"), default="bfloat16", help="suites only")
    parser.add_argument("--out", type=Path, help="write kernels-sm<arch>.json and .txt here")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None)
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # The interpreter replaces the kernels with Python functions: compile in a process without it.
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        command = [sys.executable, "-m", "perceiver_kernels", "kernels", *(argv if argv is not None else sys.argv[2:])]
        return subprocess.call(command, env=env)
    if args.suite == "matrix":
        problems = matrix_problems((torch.float16, torch.bfloat16, torch.float32))
        label = "the correctness matrix in float16, bfloat16 and float32"
    else:
        shapes = SUITES[args.suite]
        if args.shapes:
            wanted = [s.strip() for s in args.shapes.split(",") if s.strip()]
            unknown = sorted(set(wanted) - {s.name for s in shapes})
            if unknown:
                print(f"kernels: --shapes {', '.join(unknown)} not in the {args.suite!r} suite", file=sys.stderr)
                return 2
            shapes = [s for s in shapes if s.name in wanted]
        problems = [suite_problem(shape, getattr(torch, args.dtype)) for shape in shapes]
        label = f"the {args.suite} suite in {args.dtype}"
    results = run_report(args.arch, problems, label, args.progress)
    text = text_report(results)
    found = findings(results)
    if found:
        text += "\n\nPROBLEMS:\n" + "\n".join(f"  {p}" for p in found)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        stem = f"kernels-{args.suite}-sm{args.arch}"
        (args.out / f"{stem}.json").write_text(json.dumps(results, indent=1))
        (args.out / f"{stem}.txt").write_text(text + "\n")
    return 1 if found else 0


if __name__ == "__main__":
    raise SystemExit(main())
