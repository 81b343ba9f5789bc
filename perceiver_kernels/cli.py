"""The ``perceiver-kernels`` command line: ``info``, ``check`` and ``bench``.

``check`` runs every available backend against the float64 reference on a fixed list of cases that
covers the op's features and prints one row per (case, backend, dtype). On a machine without a GPU it
runs the Triton kernels through Triton's CPU interpreter on small shapes.

``bench`` runs the benchmark suite (``perceiver_kernels.bench``: ours next to PyTorch SDPA,
FlexAttention and naive attention on Perceiver-shaped problems, then model-level training steps); on CPU
the ``quick`` suite. ``kernels`` compiles every kernel the suite launches for a GPU that need not be here.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import os
import platform
import subprocess
import sys

import torch

from . import __version__

CHECK_DTYPES = {"cpu": ("float32", "float16"), "cuda": ("float32", "float16", "bfloat16")}


def _check_cases():
    from .testing import AttentionCase

    # (label, case, forced key splits); small enough for the interpreter, awkward on purpose.
    return [
        ("cross", AttentionCase(batch=2, nq=33, nk=129, heads=2, dqk=32, dv=32), 0),
        ("cross split-kv", AttentionCase(batch=2, nq=5, nk=300, heads=2, dqk=32, dv=32), 3),
        ("broadcast query", AttentionCase(batch=3, q_batch=1, nq=20, nk=70, heads=2), 0),
        ("key padding", AttentionCase(batch=3, nq=17, nk=100, pad_fraction=0.3, all_padded_sample=True), 0),
        ("kv_lengths", AttentionCase(batch=4, nq=5, nk=129, kv_lengths=(0, 129, 64, 1)), 0),
        ("causal (AR cross)", AttentionCase(batch=2, nq=33, nk=129, causal=True), 0),
        ("causal self", AttentionCase(batch=2, nq=65, nk=65, causal=True), 0),
        ("causal + padding", AttentionCase(batch=2, nq=17, nk=80, causal=True, pad_fraction=0.2), 0),
        ("Dqk 32 != Dv 160", AttentionCase(batch=2, nq=17, nk=64, dqk=32, dv=160), 0),
        ("head dim 261", AttentionCase(batch=1, nq=17, nk=64, heads=1, dqk=261, dv=261), 0),
        ("permuted (B,H,N,D)", AttentionCase(batch=2, nq=17, nk=64, permuted=True), 0),
        # Perceiver AR: rotary fused on load, left-padding positions, prefix dropout, decoding.
        (
            "rotary, left padding",
            AttentionCase(batch=2, nq=17, nk=80, causal=True, rotary_dim=16, positions="left-pad"),
            0,
        ),
        (
            "rotary NeoX, full",
            AttentionCase(batch=2, nq=17, nk=64, causal=True, rotary_dim=16, rotary_interleaved=False),
            0,
        ),
        ("prefix dropout", AttentionCase(batch=2, nq=17, nk=80, causal=True, rotary_dim=8, prefix_dropout=True), 0),
        (
            "decode, kv cache",
            AttentionCase(batch=3, nq=1, nk=200, causal=True, kv_lengths=(200, 57, 1), rotary_dim=16),
            3,
        ),
    ]


def _triton_fn(num_splits: int):
    from .ops import triton_attention
    from .testing import backend_fn

    return backend_fn(triton_attention, num_splits)


class _Unsupported(Exception):
    """The backend does not cover this case (the row says why instead of failing)."""


def _cuda_fn(num_splits: int):
    from .ops import cuda_attention
    from .testing import backend_fn

    run = backend_fn(cuda_attention.cuda_attention, num_splits)

    def fn(q, k, v, **kw):
        reason = cuda_attention.unsupported_reason(q, k, v, q.shape[-1] ** -0.5)
        if reason is not None:
            raise _Unsupported(reason)
        return run(q, k, v, **kw)

    return fn


def _restart_with_interpreter(args: argparse.Namespace) -> int | None:
    """On CPU the Triton kernels run in Triton's interpreter, which must be switched on before
    ``triton.language`` is imported; returns the exit code of a fresh process when one was needed."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        return None
    os.environ["TRITON_INTERPRET"] = "1"
    if "triton.language" not in sys.modules:
        return None
    # Triton fixed its mode when it was imported; only a fresh process can switch it.
    return subprocess.call([sys.executable, "-m", "perceiver_kernels", args.command, *args.argv])


def _prepare_device(args: argparse.Namespace) -> tuple[str | None, int | None]:
    """``(device, None)`` to go on, or ``(None, exit code)``: no GPU for ``--device cuda`` (2), or
    the exit code of the fresh process that ran the command with the CPU interpreter switched on."""
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        print(f"{args.command}: --device cuda asked for, but torch sees no CUDA device", file=sys.stderr)
        return None, 2
    if device == "cpu" and (code := _restart_with_interpreter(args)) is not None:
        return None, code
    return device, None


def cmd_check(args: argparse.Namespace) -> int:
    device, code = _prepare_device(args)
    if device is None:
        return code
    from . import functional
    from .testing import check_case

    probe = torch.empty(0, device=device)
    available = [b for b in ("triton", "cuda") if functional.backend_unavailable_reason(b, probe) is None]
    backends = args.backend or available
    for backend in backends:
        reason = functional.backend_unavailable_reason(backend, probe)
        if reason is not None:
            print(f"check: backend {backend!r} cannot run on {device}: {reason}", file=sys.stderr)
            return 2
    dtypes = args.dtype or list(CHECK_DTYPES[device])
    where = "Triton CPU interpreter" if device == "cpu" else torch.cuda.get_device_name()
    print(f"perceiver-kernels check on {device} ({where}); reference: float64 PyTorch")
    header = f"{'case':22s} {'backend':8s} {'dtype':9s} {'worst':5s} {'max abs err':>11s} {'err/limit':>9s}  result"
    print(header)
    print("-" * len(header))
    failures = 0
    for label, case, splits in _check_cases():
        for backend in backends:
            for dtype_name in dtypes:
                dtype = getattr(torch, dtype_name)
                if device == "cpu" and dtype == torch.bfloat16:
                    continue  # the interpreter cannot do bfloat16 dots
                torch.manual_seed(len(label) * 1000 + len(dtype_name))
                fn = _cuda_fn(splits) if backend == "cuda" else _triton_fn(splits)
                try:
                    results = check_case(case, dtype, device, fn)
                except _Unsupported as unsupported:
                    print(f"{label:22s} {backend:8s} {dtype_name:9s} n/a ({unsupported})", flush=True)
                    continue
                worst_name, worst = max(results.items(), key=lambda item: item[1].ratio)
                ok = all(r.ok for r in results.values())
                failures += not ok
                print(
                    f"{label:22s} {backend:8s} {dtype_name:9s} {worst_name:5s} {worst.max_abs_error:11.2e} "
                    f"{worst.ratio:9.3f}  {'pass' if ok else 'FAIL'}",
                    flush=True,
                )
    print("-" * len(header))
    print("worst = the output (out, lse, dq, dk, dv) closest to its limit; err/limit < 1 passes.")
    print("limits: float32 max error <= 1e-4 x max |reference|; float16/bfloat16 <= 2 x the error of the")
    print("same computation done naively in that dtype + 2 ulps (perceiver_kernels/testing.py).")
    print(f"{'all passed' if failures == 0 else f'{failures} FAILED'}")
    return 0 if failures == 0 else 1


def cmd_info(args: argparse.Namespace) -> int:
    from . import functional

    print(f"perceiver-kernels {__version__}")
    print(f"python {platform.python_version()}, torch {torch.__version__}", end="")
    try:
        import triton

        print(f", triton {triton.__version__}", end="")
    except ImportError:
        print(", triton not installed", end="")
    print(f", CUDA runtime {torch.version.cuda or 'none (CPU build of torch)'}")
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        sms, capability = props.multi_processor_count, f"{props.major}.{props.minor}"
        print(f"device: {props.name}, {sms} SMs, compute capability {capability}")
        probe = torch.empty(0, device="cuda")
    else:
        print("device: CPU only (no CUDA device visible to torch)")
        probe = torch.empty(0)
    print("backends:")
    for backend in ("triton", "cuda", "reference"):
        reason = functional.backend_unavailable_reason(backend, probe)
        print(f"  {backend:9s} {'available' if reason is None else 'unavailable: ' + reason}")
    from .ops import cuda_extension

    print(f"  cuda extension: {cuda_extension.source or cuda_extension.availability()}")
    print("pk.patch integrations:")
    for package in ("transformers", "perceiver-pytorch", "perceiver-ar-pytorch"):
        try:
            found = f"{package} {importlib.metadata.version(package)}"
        except importlib.metadata.PackageNotFoundError:
            found = f"{package} not installed (pip install 'perceiver-kernels[integrations]')"
        print(f"  {found}")
    return 0


def _benchmark_suite(module: str = "suite"):
    """A module of the benchmark suite (``perceiver_kernels.bench``), imported on demand: it pulls in
    matplotlib, the profiler and the model zoo, which ``info`` and ``check`` do not need."""
    return importlib.import_module(f"perceiver_kernels.bench.{module}")


def cmd_bench(args: argparse.Namespace) -> int:
    device, code = _prepare_device(args)
    if device is None:
        return code
    args.device = device
    return _benchmark_suite().run_cli(args)


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["kernels"]:  # its own options (perceiver_kernels/bench/kernel_report.py)
        return _benchmark_suite("kernel_report").main(argv[1:])
    parser = argparse.ArgumentParser(prog="perceiver-kernels", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"perceiver-kernels {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device and which backends can run")
    check = sub.add_parser("check", help="every backend against the reference on a fixed case list")
    check.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    check.add_argument(
        "--backend", action="append", choices=("triton", "cuda"), help="repeatable; default: all available"
    )
    check.add_argument("--dtype", action="append", choices=("float32", "float16", "bfloat16"), help="repeatable")
    bench = sub.add_parser("bench", help="the benchmark suite: ours vs SDPA, FlexAttention and naive attention")
    bench.add_argument(
        "--suite",
        choices=("perceiver", "quick", "blocks", "host", "sharded"),
        help="default: perceiver on a GPU, quick on CPU; blocks: the shared-block execution modes on a CPU-sized "
        "encoder; host: per-call host overhead (any device); sharded: keys split across ranks (traffic, the "
        "split's cost; gloo processes on CPU)",
    )
    bench.add_argument("--mode", choices=("fwd", "fwd+bwd", "both"), default="both")
    bench.add_argument("--out", help="folder for bench.json, bench.txt, bench.md and the PNG plots")
    bench.add_argument(
        "--providers",
        type=_names,
        help="comma-separated: triton,cuda,sdpa-flash,sdpa-cudnn,sdpa-efficient,sdpa-math,flex,naive "
        "(default: all; our backends when available); the model entries always run all their variants",
    )
    bench.add_argument(
        "--shapes",
        type=_names,
        help="comma-separated subset of the suite's shapes and model entries (shared-blocks, model-ar-train, ...)",
    )
    bench.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda if available, else cpu")
    bench.add_argument(
        "--dtype", choices=("float32", "float16", "bfloat16"), help="default: bfloat16 on a GPU, float32 on CPU"
    )
    bench.add_argument(
        "--time-budget", type=float, metavar="SECONDS", help="skip the remaining shapes (recorded) once spent"
    )
    bench.add_argument(
        "--progress", action=argparse.BooleanOptionalAction, default=None, help="default: a bar on a terminal"
    )
    sub.add_parser(
        "kernels",
        help="static report: every kernel the suite launches, compiled for a GPU (registers, spills, shared memory)",
        add_help=False,
    )
    args = parser.parse_args(argv)
    args.argv = argv[1:]
    handler = {"info": cmd_info, "check": cmd_check, "bench": cmd_bench}[args.command]
    return handler(args)


if __name__ == "__main__":
    sys.exit(main())
