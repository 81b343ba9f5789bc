"""Run a benchmark suite: every provider on every shape, in one process on one device.

Entry point of ``perceiver-kernels bench`` (``run_cli``). Each (shape, provider, mode) becomes one
row of the results: its timing and derived rates, or ``n/a`` with the reason. Every forward output
is also compared with the float32 reference, so a fast wrong answer is flagged, never reported as a
win. The JSON is rewritten after every shape, so a run that is cut short keeps what it measured.

After the attention shapes come the suite's model entries (``models.py``): each (entry, size,
variant) becomes one row (``kind: "model"``) of the same results, its first step checked against the
entry's anchor variant.
"""

from __future__ import annotations

import json
import os
import platform
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

import perceiver_kernels as pk
from perceiver_kernels.reference import attention_reference
from perceiver_kernels.testing import BENCH_AGREEMENT_RTOL

from . import report
from .models import MODE as MODEL_MODE
from .models import MODEL_SUITES, ModelEntry, Variant, interleaved_quantiles, measure_step, relative_l2
from .providers import PROVIDERS, Inputs, Unavailable, make_inputs
from .shapes import SUITES, Shape
from .timing import CPU_MIN_REPS, INTERPRETED_MIN_REPS, device_ceilings, measure, synchronize

SCHEMA = 1
SUITE_DTYPES = {"cuda": torch.bfloat16, "cpu": torch.float32}  # the interpreter has no bfloat16 dot


def environment(device: torch.device, dtype: torch.dtype) -> dict:
    """Device, versions, git revision and time: everything a result must be read with."""
    env = {
        "schema": SCHEMA,
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "git": _git_revision(),
        "versions": {
            "perceiver_kernels": pk.__version__,
            "python": platform.python_version(),
            "torch": torch.__version__,
            "triton": _triton_version(),
            "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        },
        "dtype": str(dtype).removeprefix("torch."),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env["device"] = {
            "type": "cuda",
            "name": props.name,
            "sms": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
        }
    else:
        interpret = os.environ.get("TRITON_INTERPRET") == "1"
        name = f"CPU ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
        env["device"] = {"type": "cpu", "name": name, "triton_interpreter": interpret}
    env["device"].update(device_ceilings(device, dtype))
    return env


def _git_revision() -> dict:
    """The checkout this package runs from, if it runs from one (an editable install); an installed
    wheel has none (``sha`` "none"), and its version (``versions.perceiver_kernels``) says what it is."""
    package = Path(__file__).resolve().parents[1]

    def git(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", *args], cwd=package, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    # Not a checkout of this project (e.g. site-packages inside some other repository): no revision.
    if top is None or Path(top).resolve() / "perceiver_kernels" != package:
        return {"sha": "none", "dirty": False}
    sha = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"sha": sha or "unknown", "dirty": bool(status)}


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def reference_output(shape: Shape, inputs: Inputs) -> Tensor:
    """Float32 reference ``(B, H, Nq, Dv)``, one head at a time to bound the scores' memory."""
    out = torch.empty(shape.batch, shape.heads, shape.nq, shape.dv, device=inputs.q.device, dtype=torch.float32)
    for h in range(shape.heads):
        q, k, v = (t[:, h : h + 1].transpose(1, 2).float() for t in (inputs.q, inputs.k, inputs.v))
        ref = attention_reference(
            q,
            k,
            v,
            causal=shape.causal,
            key_padding_mask=inputs.key_padding_mask,
            kv_lengths=inputs.kv_lengths,
            kv_index=inputs.kv_index,
            rotary_dim=shape.rotary_dim,
            q_positions=inputs.q_positions,
            k_positions=inputs.k_positions,
        )
        out[:, h] = ref[:, :, 0]
    return out


def relative_difference(out: Tensor, ref: Tensor) -> float:
    """max |out - ref| / max |ref|; inf if ``out`` has NaN/inf or the wrong shape."""
    if out.shape != ref.shape:
        return float("inf")
    diff = (out.float() - ref).abs().max().item()
    return diff / max(ref.abs().max().item(), 1e-30) if diff == diff else float("inf")


def run_suite(
    shapes: list[Shape],
    providers: list[str],
    modes: list[str],
    device: torch.device,
    dtype: torch.dtype,
    suite: str,
    out_dir: Path | None = None,
    time_budget_s: float | None = None,
    progress: bool | None = None,
    models: Sequence[ModelEntry] = (),
) -> dict:
    """Measure ``providers`` on ``shapes``, then every variant of the model entries ``models``; returns
    (and writes to ``out_dir/bench.json``) the results."""
    from tqdm import tqdm

    torch.backends.cuda.matmul.allow_tf32 = False  # float32 anchors at float32 accuracy, like ours
    results = environment(device, dtype)
    results.update(suite=suite, modes=list(modes), providers={n: PROVIDERS[n].description for n in providers})
    probe_tensor = probe(device)
    results["backends_not_run"] = {
        name: reason
        for name, p in PROVIDERS.items()
        if p.ours and name not in providers and (reason := pk.backend_unavailable_reason(name, probe_tensor))
    }
    results["shapes"], results["rows"] = [], []
    started = time.perf_counter()
    jobs = sum(len(providers) * len([m for m in s.modes if m in modes]) for s in shapes)
    jobs += sum(len(e.variants) * len(e.sizes()) for e in models if MODEL_MODE in modes)
    # progress None: a bar only on a terminal; True/False: always/never.
    disable = {None: None, True: False, False: True}[progress]
    bar = tqdm(total=jobs, unit="run", disable=disable, dynamic_ncols=True)
    try:
        for shape in shapes:
            _run_shape(shape, providers, modes, device, dtype, results, bar, started, time_budget_s)
            if out_dir is not None:
                write_json(results, out_dir)
        for entry in models:
            _run_model(entry, modes, device, dtype, results, bar, started, time_budget_s)
            if out_dir is not None:
                write_json(results, out_dir)
    except (Stopped, KeyboardInterrupt) as e:
        if isinstance(e, DeviceFailure):
            results["rows"].append(e.row)
        # Keep what was measured: the caller still writes the JSON, the tables and the plots.
        results["stopped"] = str(e) or type(e).__name__
        bar.write(f"stopped: {results['stopped']}")
    finally:
        bar.close()
        results["elapsed_s"] = time.perf_counter() - started
        report.add_speedups(results)
        if out_dir is not None:
            write_json(results, out_dir)
    return results


class Stopped(BaseException):
    """Ends a run early (a termination signal, or a device that can no longer run anything); a
    BaseException so that the per-row ``except Exception`` does not swallow it."""


def _run_shape(shape, providers, modes, device, dtype, results, bar, started, time_budget_s) -> None:
    shape_modes = [m for m in shape.modes if m in modes]
    results["shapes"].append(
        {
            **shape.as_dict(),
            "description": shape.describe(),
            "flops": {m: shape.flops(m) for m in shape_modes},
            "bytes": {m: shape.bytes(m, dtype.itemsize) for m in shape_modes},
        }
    )

    def spent() -> bool:
        return time_budget_s is not None and time.perf_counter() - started > time_budget_s

    bar.set_description(shape.name)
    inputs = ref = None
    for name in providers:
        for mode in shape_modes:
            if spent():  # checked per row: one slow provider cannot overrun the budget by a shape
                row = _row(shape, name, mode, status="skipped", reason="time budget spent")
            else:
                if inputs is None:
                    inputs = make_inputs(shape, dtype, device)
                    ref = reference_output(shape, inputs)
                row = _measure_row(shape, name, mode, inputs, ref, results["device"])
            results["rows"].append(row)
            bar.update(1)
            if row["status"] != "skipped":
                bar.write(report.row_line(row))
    report.add_speedups(results)
    del inputs, ref
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _row(shape: Shape, provider: str, mode: str, **fields) -> dict:
    return {"shape": shape.name, "provider": provider, "ours": PROVIDERS[provider].ours, "mode": mode, **fields}


def _measure_row(shape: Shape, name: str, mode: str, inputs: Inputs, ref: Tensor, ceilings: dict) -> dict:
    provider = PROVIDERS[name]
    device = inputs.q.device
    try:
        attn = provider.build(shape, inputs, mode)
        interpreted = device.type == "cpu" and name == "triton"
        timing, out = measure(attn, shape, inputs, mode, INTERPRETED_MIN_REPS if interpreted else CPU_MIN_REPS)
    except Unavailable as e:
        return _row(shape, name, mode, status="n/a", reason=str(e))
    except torch.OutOfMemoryError:
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return _row(shape, name, mode, status="n/a", reason="out of device memory")
    except Exception as e:  # noqa: BLE001 - whatever a provider raises is reported with the row
        text = str(e).strip()
        reason = f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"
        # Our own backends must never fail on a suite shape; that is an error, not "n/a".
        row = _row(shape, name, mode, status="error" if provider.ours else "n/a", reason=reason)
        try:
            synchronize(device)
        except RuntimeError as fatal:  # a sticky CUDA error: nothing after this can run
            raise DeviceFailure(row, fatal) from e
        return row
    row = _row(
        shape,
        name,
        mode,
        status="ok",
        ms=timing.median_ms,
        p20_ms=timing.p20_ms,
        p80_ms=timing.p80_ms,
        first_call_s=timing.first_call_s,
        peak_mib=_mib(timing.peak_bytes),
    )
    flops, nbytes = shape.flops(mode), shape.bytes(mode, inputs.q.element_size())
    row["tflops"] = flops / timing.median_ms / 1e9
    row["matmul_pct"] = 100 * row["tflops"] / ceilings["matmul_tflops"]
    row["gbps"] = nbytes / timing.median_ms / 1e6
    if out is not None:
        diff = relative_difference(out, ref)
        row["max_rel_diff"] = diff
        row["agrees"] = diff <= BENCH_AGREEMENT_RTOL[inputs.q.dtype]
        if not row["agrees"]:
            row["status"] = "error" if provider.ours else "wrong"
            row["reason"] = f"output differs from the reference: max rel diff {diff:.2e}"
    return row


# -- model entries ---------------------------------------------------------------------------------


def _run_model(entry: ModelEntry, modes, device, dtype, results, bar, started, time_budget_s) -> None:
    """Every (size, variant) of ``entry``, the anchor variant first at each size: the others' first
    step is checked against its output and gradients (same weights, inputs and dropout seed)."""
    results["shapes"].append(entry.as_dict())
    if MODEL_MODE not in modes:
        return

    def spent() -> bool:
        return time_budget_s is not None and time.perf_counter() - started > time_budget_s

    bar.set_description(entry.name)
    built: dict[object, torch.nn.Module] = {}  # the model of the current size's key, built only when a row runs

    try:
        for size in entry.sizes():
            anchor = None

            def model(size=size) -> torch.nn.Module:
                key = entry.model_key(size)
                if key not in built:
                    built.clear()  # one model alive at a time
                    built[key] = entry.build(device, dtype, size)
                return built[key]

            rows, untimed = [], []  # CPU: the steps still to time, together, once every variant has run
            interpreted = False
            for variant in entry.ordered_variants():
                if spent():
                    row = _model_row(entry, variant, size, status="skipped", reason="time budget spent")
                else:
                    row, check, step = _measure_model_row(entry, model, variant, size, device, dtype, anchor)
                    if variant.name == entry.anchor and row["status"] == "ok":
                        anchor = check
                    del check  # a non-anchor check is not needed once compared
                    if step is not None:
                        untimed.append((row, step))
                        interpreted |= entry.backend_of(variant) == "triton"  # on CPU: Triton's interpreter
                rows.append(row)
            if untimed:
                min_reps = INTERPRETED_MIN_REPS if interpreted else entry.cpu_min_reps
                timings = interleaved_quantiles([step for _, step in untimed], min_reps)
                for (row, step), (median, p20, p80) in zip(untimed, timings, strict=True):
                    row.update(ms=median, p20_ms=p20, p80_ms=p80, throughput=step.units / median * 1e3)
                    _release(step, device)
            del anchor, untimed
            for row in rows:
                results["rows"].append(row)
                bar.update(1)
                if row["status"] != "skipped":
                    bar.write(report.row_line(row))
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        built.clear()
        report.add_speedups(results)
        if device.type == "cuda":
            torch.cuda.empty_cache()


def _model_row(entry: ModelEntry, variant: Variant, size: dict, **fields) -> dict:
    row = {"shape": entry.name, "provider": variant.name, "ours": variant.ours, "mode": MODEL_MODE, "kind": "model"}
    if variant.rival:
        row["rival"] = variant.rival
    return {**row, **size, **fields}


def _measure_model_row(entry, model, variant, size, device, dtype, anchor) -> tuple[dict, object, object]:
    """One variant's row, the check of its first step (None when it did not run) and, on CPU, the step
    still to be timed with the others of its size (``interleaved_quantiles``; None on a GPU, where
    ``do_bench`` timed it here)."""
    step = None
    try:
        backend = entry.backend_of(variant)
        if backend is not None and (reason := pk.backend_unavailable_reason(backend, probe(device))):
            raise Unavailable(reason)
        step = entry.step(model(), variant, size, device)
        timing, check = measure_step(step, device, timed=device.type == "cuda")
    except Unavailable as e:
        return _model_row(entry, variant, size, status="n/a", reason=str(e)), None, None
    except torch.OutOfMemoryError:
        _release(step, device)
        return _model_row(entry, variant, size, status="n/a", reason="out of device memory"), None, None
    except Exception as e:  # noqa: BLE001 - reported with the row, as for the attention providers
        text = str(e).strip()
        reason = f"{type(e).__name__}: {text.splitlines()[0][:200] if text else ''}"
        row = _model_row(entry, variant, size, status="error" if variant.ours else "n/a", reason=reason)
        try:
            synchronize(device)
        except RuntimeError as fatal:
            raise DeviceFailure(row, fatal) from e
        _release(step, device)
        return row, None, None
    row = _model_row(
        entry, variant, size, status="ok", ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
        first_call_s=timing.first_call_s, peak_mib=_mib(timing.peak_bytes), kept_mib=_mib(timing.kept_bytes),
        throughput_unit=entry.throughput_unit, loss=check.loss,
    )  # fmt: skip
    if timing.median_ms is None:
        _clear_grads(step)  # timed later, with the other variants of its size
    else:
        row["throughput"] = step.units / timing.median_ms * 1e3
        _release(step, device)
        step = None
    if variant.name == entry.anchor:
        row["anchor"] = True
    elif anchor is None:
        row["checked_against"] = None  # the anchor did not run: nothing to compare with
    else:
        out_diff = relative_difference(check.output, anchor.output)
        grad_diff = relative_l2(check.grads, anchor.grads)
        row.update(checked_against=entry.anchor, max_rel_diff=out_diff, grad_rel_diff=grad_diff)
        diffs = [out_diff, grad_diff]
        if check.loss is not None and anchor.loss is not None:
            loss_diff = abs(check.loss - anchor.loss) / max(abs(anchor.loss), 1e-30)
            row["loss_rel_diff"] = loss_diff if loss_diff == loss_diff else float("inf")
            diffs.append(row["loss_rel_diff"])
        row["agrees"] = max(diffs) <= BENCH_AGREEMENT_RTOL[dtype]
        if not row["agrees"]:
            row["status"] = "error" if variant.ours else "wrong"
            loss = f", loss rel diff {row['loss_rel_diff']:.2e}" if "loss_rel_diff" in row else ""
            row["reason"] = (
                f"differs from {entry.anchor}: output max rel diff {out_diff:.2e}, gradients rel L2 {grad_diff:.2e}"
                f"{loss}"
            )
    return row, check, step


def _mib(nbytes: int | None) -> float | None:
    return None if nbytes is None else nbytes / 2**20


def _clear_grads(step) -> None:
    if step is not None:
        for p in step.params:
            p.grad = None


def _release(step, device: torch.device) -> None:
    """Drop the gradients a step left, so the next variant starts from the weights alone."""
    _clear_grads(step)
    if device.type == "cuda":
        torch.cuda.empty_cache()


class DeviceFailure(Stopped):
    def __init__(self, row: dict, error: Exception):
        super().__init__(f"the device failed during {row['shape']} / {row['provider']} / {row['mode']}: {error}")
        self.row = row


def write_json(results: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "bench.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1))
    tmp.replace(path)  # a reader (or a kill) never sees half a file
    return path


def run_cli(args) -> int:
    """``perceiver-kernels bench``; ``args`` as parsed by ``perceiver_kernels.cli``."""
    device = torch.device(args.device)
    suite = args.suite or ("perceiver" if device.type == "cuda" else "quick")
    if suite in ("host", "sharded"):
        from . import host, sharded

        dtype = getattr(torch, args.dtype) if args.dtype else SUITE_DTYPES[device.type]
        return (host if suite == "host" else sharded).run_cli(args, device, dtype)
    if device.type == "cpu" and suite not in ("quick", "blocks"):
        print(f"bench: the {suite!r} suite needs a GPU; on CPU run --suite quick or blocks", file=sys.stderr)
        return 2
    shapes, models = list(SUITES.get(suite, ())), list(MODEL_SUITES[suite])  # blocks: model entries only
    if args.shapes:
        unknown = sorted(set(args.shapes) - {s.name for s in shapes} - {m.name for m in models})
        if unknown:
            names = ", ".join([s.name for s in shapes] + [m.name for m in models])
            print(f"bench: --shapes {', '.join(unknown)} not in the {suite!r} suite ({names})", file=sys.stderr)
            return 2
        shapes = [s for s in shapes if s.name in args.shapes]
        models = [m for m in models if m.name in args.shapes]
    probe_tensor = probe(device)
    runnable = [n for n, p in PROVIDERS.items() if not p.ours or not pk.backend_unavailable_reason(n, probe_tensor)]
    providers = args.providers or runnable
    unknown = sorted(set(providers) - set(PROVIDERS))
    if unknown:
        print(f"bench: unknown --providers {', '.join(unknown)}; choose from {', '.join(PROVIDERS)}", file=sys.stderr)
        return 2
    modes = ["fwd", "fwd+bwd"] if args.mode == "both" else [args.mode]
    dtype = getattr(torch, args.dtype) if args.dtype else SUITE_DTYPES[device.type]
    out_dir = Path(args.out) if args.out else None
    signal.signal(signal.SIGTERM, _stop_on_signal)  # `timeout` sends it: stop, but report what was measured
    results = run_suite(
        shapes, providers, modes, device, dtype, suite, out_dir, args.time_budget, args.progress, models=models
    )
    print()
    print(report.text_report(results))
    if out_dir is not None:
        written = report.write_outputs(results, out_dir)
        print(f"\nwrote {', '.join(str(p) for p in written)}")
    errors = [r for r in results["rows"] if r["status"] == "error"]
    return 1 if errors or "stopped" in results else 0


def _stop_on_signal(signum, frame) -> None:
    raise Stopped(f"signal {signal.Signals(signum).name}")


def probe(device: torch.device) -> Tensor:
    return torch.empty(0, device=device)
