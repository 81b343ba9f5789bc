"""Timing, memory and the device's own ceilings (matmul rate, copy bandwidth).

GPU: ``triton.testing.do_bench`` (CUDA events, L2 flushed between repetitions, gradients set to None
so that accumulation is not timed), median with the 20th and 80th percentiles. CPU: wall clock
around each call; those numbers only prove the pipeline and are never compared with GPU ones.

Memory: on a GPU the caching allocator's figures (``memory_allocated``, ``max_memory_allocated``); on CPU
:class:`LiveBytes`, which follows every tensor storage ATen creates until it is freed (exact, in bytes of
tensor storage; not the process's resident size).
"""

from __future__ import annotations

import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from .providers import AttentionFn, Inputs
from .shapes import Shape

QUANTILES = (0.5, 0.2, 0.8)
GPU_WARMUP_MS, GPU_REP_MS = 20, 80
CPU_MIN_REPS, CPU_MAX_REPS, CPU_BUDGET_S = 3, 20, 0.5
# Triton's CPU interpreter runs a kernel in seconds and times the interpreter, not the kernel (the report says CPU
# numbers prove the pipeline): one timed call after the first is enough, more only while CPU_BUDGET_S lasts.
INTERPRETED_MIN_REPS = 1


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float
    first_call_s: float  # includes JIT/compile (Triton, torch.compile) and cuDNN plan building
    peak_bytes: int | None  # device memory allocated at the peak of one call, beyond the inputs
    kept_bytes: int | None = None  # model steps: what the forward leaves alive for backward, beyond the inputs


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_step(attn: AttentionFn, shape: Shape, inputs: Inputs, mode: str) -> tuple[Callable, list[Tensor]]:
    """The callable that one timing repetition runs, and the tensors whose gradients it fills.

    fwd: ``attn`` under ``no_grad``, returning the output. fwd+bwd: ``attn`` then ``backward`` with a
    fixed random output gradient (the callers set the gradients to None between repetitions).
    """
    if mode == "fwd":
        q, k, v = inputs.q, inputs.k, inputs.v

        def forward():
            with torch.no_grad():
                return attn(q, k, v)

        return forward, []
    q, k, v = (t.detach().requires_grad_() for t in (inputs.q, inputs.k, inputs.v))
    dout = torch.randn(shape.batch, shape.heads, shape.nq, shape.dv, device=q.device, dtype=q.dtype)

    def forward_backward():
        attn(q, k, v).backward(dout)

    return forward_backward, [q, k, v]


def measure(
    attn: AttentionFn, shape: Shape, inputs: Inputs, mode: str, min_reps: int = CPU_MIN_REPS
) -> tuple[Timing, Tensor | None]:
    """Time ``attn`` on ``inputs`` for ``mode`` (at least ``min_reps`` timed calls on CPU); also return the
    forward output (fwd mode only)."""
    device = inputs.q.device
    step, grads = make_step(attn, shape, inputs, mode)
    start = time.perf_counter()
    out = step()
    synchronize(device)
    first_call_s = time.perf_counter() - start
    peak = peak_bytes(step, grads, device)
    median, p20, p80 = quantiles(step, grads, device, min_reps)
    return Timing(median, p20, p80, first_call_s, peak), out


def _zero(grads: list[Tensor]) -> None:
    for t in grads:
        t.grad = None


def peak_bytes(step: Callable, grads: list[Tensor], device: torch.device) -> int | None:
    """Peak device memory one ``step()`` allocates beyond what is allocated before it (None off CUDA)."""
    if device.type != "cuda":
        return None
    _zero(grads)
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    step()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


class LiveBytes(TorchDispatchMode):
    """The bytes of tensor storage that ATen ops create while the mode is on, counted until each storage is
    freed: ``live`` now, ``peak`` its maximum. Storages that existed before (weights, inputs, and views or
    in-place results of them) are not counted, so figures are "beyond what was allocated before", as the
    GPU's allocator figures are used here. Autograd's backward runs under the mode too."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = 0
        self._counted: dict[int, int] = {}  # the storages now alive that are counted: C++ address -> bytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        given = {t.untyped_storage()._cdata for t in tree_leaves((args, kwargs)) if _has_storage(t)}
        for t in tree_leaves(out):
            if not _has_storage(t):
                continue
            storage = t.untyped_storage()
            key = storage._cdata
            if key in self._counted:  # counted before; an ``out=`` op may have resized it since
                self.live += storage.nbytes() - self._counted[key]
                self._counted[key] = storage.nbytes()
            elif key not in given:
                self._counted[key] = storage.nbytes()
                self.live += storage.nbytes()
                weakref.finalize(storage, self._freed, key)
            self.peak = max(self.peak, self.live)
        return out

    def _freed(self, key: int) -> None:
        self.live -= self._counted.pop(key)


def _has_storage(t) -> bool:
    return isinstance(t, Tensor) and t.layout == torch.strided and not t.is_meta


def step_memory(run: Callable[[Callable[[], None]], object], device: torch.device) -> tuple[int, int]:
    """``(kept, peak)`` bytes of one forward + backward ``run(after_forward)`` (it calls ``after_forward()``
    between the two), beyond what was allocated before it: ``kept`` is what the forward leaves alive for
    backward (activations saved by autograd, the output), ``peak`` the maximum over the whole step
    (gradients and workspace included). GPU: the allocator's figures; CPU: :class:`LiveBytes`."""
    kept = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        run(lambda: kept.append(torch.cuda.memory_allocated(device) - base))
        torch.cuda.synchronize(device)
        return kept[0], torch.cuda.max_memory_allocated(device) - base
    with LiveBytes() as live:
        run(lambda: kept.append(live.live))
    return kept[0], live.peak


def quantiles(
    step: Callable, grads: list[Tensor], device: torch.device, min_reps: int = CPU_MIN_REPS
) -> tuple[float, float, float]:
    """Median, p20 and p80 milliseconds of ``step()`` (``do_bench`` on CUDA; on CPU the wall clock of at least
    ``min_reps`` calls, more while ``CPU_BUDGET_S`` lasts); the ``grads`` tensors' ``.grad`` is reset between
    repetitions so that backward does not accumulate."""
    if device.type == "cuda":
        from triton.testing import do_bench

        ms = do_bench(step, warmup=GPU_WARMUP_MS, rep=GPU_REP_MS, grad_to_none=grads, quantiles=list(QUANTILES))
        return tuple(float(x) for x in ms)
    samples = []
    deadline = time.perf_counter() + CPU_BUDGET_S
    while len(samples) < min_reps or (len(samples) < CPU_MAX_REPS and time.perf_counter() < deadline):
        _zero(grads)
        start = time.perf_counter()
        step()
        samples.append((time.perf_counter() - start) * 1e3)
    return sample_quantiles(samples)


def sample_quantiles(samples: list[float]) -> tuple[float, float, float]:
    """``QUANTILES`` (median, p20, p80) of wall-clock samples, linearly interpolated."""
    values = torch.tensor(samples, dtype=torch.float64).quantile(torch.tensor(QUANTILES, dtype=torch.float64))
    return tuple(float(x) for x in values)


def device_ceilings(device: torch.device, dtype: torch.dtype) -> dict:
    """The device's measured matmul rate in ``dtype`` (TFLOP/s) and copy bandwidth (GB/s, read + write)."""
    n, copy_bytes = (8192, 2**30) if device.type == "cuda" else (512, 2**26)
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    src = torch.empty(copy_bytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    if device.type == "cuda":
        for _ in range(20):  # bring the clocks up before anything is timed
            a @ b
    matmul_ms = quantiles(lambda: a @ b, [], device)[0]
    copy_ms = quantiles(lambda: dst.copy_(src), [], device)[0]
    return {
        "matmul_dtype": str(dtype).removeprefix("torch."),
        "matmul_tflops": 2 * n**3 / matmul_ms / 1e9,
        "copy_gbps": 2 * copy_bytes / copy_ms / 1e6,
    }
