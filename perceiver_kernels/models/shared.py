"""Weight-shared block execution: ``run_shared_chain(steps, x)``.

Perceiver encoders apply the same block ``L`` times. Plain module reuse makes autograd keep every
intermediate activation of every repetition and compute each shared weight's gradient ``L`` times,
in ``L`` small GEMMs that accumulate into ``.grad``. :func:`run_shared_chain` gives the same result
(outputs and gradients) with a different trade-off:

* Forward runs the chain under ``no_grad`` and keeps only each step's input, ``len(steps)`` tensors
  of shape ``(B, N, C)``; nothing inside a step is kept.
* Backward walks the steps in reverse, recomputes each one from its saved input (like activation
  checkpointing, with the forward's RNG and autocast state, so dropout masks repeat) and propagates
  the activation gradient. Weight gradients are deferred: every ``nn.Linear`` application records its
  input rows ``X (rows, in_features)`` and output-gradient rows ``G (rows, out_features)``. At the
  end each Linear weight gets ONE GEMM ``G^T @ X`` over the rows of all its applications, and each
  Linear bias one reduction of the same ``G`` rows. LayerNorm parameters are vectors: each application
  reduces its ``x_hat * G`` and ``G`` rows at once into a running sum (keeping the rows would only cost
  memory). Other parameters (a learned scale, an embedding, ...) get ordinary autograd gradients per
  application, summed.

The price of the single GEMM, honestly: the recorded rows of all applications are alive together at
the end of backward, ``sum over applications of (Linear inputs + Linear output grads)``, and one
concatenated copy of a parameter's rows while its GEMM runs. The Linear inputs
alone are what plain autograd saves for the whole chain anyway; the output grads on top are something
plain autograd never holds at once, so backward's peak can exceed plain reuse's. What is saved is the
rest of each block's activations between forward and backward (attention, GELU, dropout, residual
intermediates) and ``L - 1`` GEMMs per shared weight; the recomputation costs one extra forward. The rows
are recorded in the computation's dtype (bfloat16 under autocast); the final GEMM and reductions
accumulate in the parameter's dtype (on CUDA a 16-bit GEMM with float32 output). So the memory win is
between forward and backward; backward's peak is about plain reuse's.

Limits: modules are patched in place during backward (instance ``forward`` of the Linear/LayerNorm
modules, always restored), so the same modules must not run concurrently in another thread while a
backward is running, and nested ``run_shared_chain`` calls over the same modules fall back to plain
autograd for the inner ones. Buffers updated in forward (BatchNorm running stats) are updated again by
recomputation, as with ``torch.utils.checkpoint``. Under autocast, Linear inputs are cast as autocast
casts ``linear`` (to the autocast dtype) and LayerNorm runs through plain autograd, because its
autocast policy differs per device.
"""

from __future__ import annotations

import contextlib
import functools
import threading
from collections import defaultdict
from collections.abc import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["recomputing", "run_shared_chain"]

_state = threading.local()


def recomputing() -> bool:
    """True while a step is being recomputed in :func:`run_shared_chain`'s backward (in this thread):
    activation checkpointing inside it would only recompute the same forward a third time."""
    return getattr(_state, "recomputing", False)


def run_shared_chain(steps: Sequence[nn.Module], x: Tensor) -> Tensor:
    """Apply ``steps[0], steps[1], ...`` in order to ``x``.

    Args:
        steps: modules mapping a ``(B, N, C)`` tensor to one of the same shape; the same module may
            appear several times (weight sharing).
        x: ``(B, N, C)`` input.

    Returns:
        ``(B, N, C)``, equal to the plain loop ``for s in steps: x = s(x)``, with the same gradients for
        ``x`` and every parameter, computed as described in the module docstring (less activation
        memory, one GEMM per shared Linear weight). Without grad mode, or when neither ``x`` nor any
        parameter requires grad, it simply is the plain loop.
    """
    steps = tuple(steps)
    params = tuple(dict.fromkeys(p for step in steps for p in step.parameters()))  # unique, by identity
    if not steps or not torch.is_grad_enabled() or not (x.requires_grad or any(p.requires_grad for p in params)):
        for step in steps:
            x = step(x)
        return x
    return _SharedChain.apply(x, steps, *params)


class _SharedChain(torch.autograd.Function):
    """Inputs: ``x`` and the chain's unique parameters (so autograd routes their gradients here)."""

    @staticmethod
    def forward(ctx, x: Tensor, steps: tuple[nn.Module, ...], *params: Tensor) -> Tensor:
        ctx.steps, ctx.params = steps, params
        ctx.autocast = _autocast_state(x.device)
        ctx.rng = []
        inputs = []
        for step in steps:  # autograd.Function.forward already runs without grad
            inputs.append(x)
            ctx.rng.append(_rng_state(x.device))
            x = step(x)
        ctx.save_for_backward(*inputs)
        return x

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        inputs = ctx.saved_tensors
        device = inputs[0].device
        wanted = {id(p) for p, need in zip(ctx.params, ctx.needs_input_grad[2:], strict=True) if need}
        recorder = _Recorder(wanted)
        grads: dict[int, Tensor] = {}  # id(param) -> gradient so far
        rng_devices = [device] if device.type == "cuda" else []
        # fork_rng puts the caller's RNG state back afterwards: recomputing dropout consumes nothing.
        with torch.random.fork_rng(devices=rng_devices), _recording(ctx.steps, recorder), _flag_recomputing():
            for i in reversed(range(len(ctx.steps))):
                step = ctx.steps[i]
                _set_rng_state(ctx.rng[i], device)
                x = inputs[i].detach().requires_grad_(i > 0 or ctx.needs_input_grad[0])
                with torch.enable_grad(), _autocast(ctx.autocast):
                    y = step(x)
                if not y.requires_grad:  # nothing upstream of this step can get a gradient through it
                    grad = torch.zeros_like(x)
                    continue
                # The anchor is an input of every recording op, so autograd runs their backward (where
                # the rows are recorded) even when nothing else upstream of them needs a gradient.
                step_params = [p for p in step.parameters() if id(p) in wanted]
                targets = ([x] if x.requires_grad else []) + [recorder.anchor] + step_params
                got = torch.autograd.grad(y, targets, grad, allow_unused=True)
                if x.requires_grad:
                    grad = got[0] if got[0] is not None else torch.zeros_like(x)
                for p, g in zip(step_params, got[len(targets) - len(step_params) :], strict=True):
                    if g is not None:  # None: p is only reached through a recording op (or unused)
                        _accumulate(grads, p, g)
        for p, g in recorder.finish():
            _accumulate(grads, p, g)
        grad_x = grad if ctx.needs_input_grad[0] else None
        return (grad_x, None, *(grads.get(id(p)) for p in ctx.params))


@contextlib.contextmanager
def _flag_recomputing() -> Iterator[None]:
    outer = recomputing()
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = outer


def _accumulate(grads: dict[int, Tensor], param: Tensor, g: Tensor) -> None:
    g = g.to(param.dtype)
    grads[id(param)] = g if id(param) not in grads else grads[id(param)] + g


class _Recorder:
    """What the patched Linear/LayerNorm calls record during one backward."""

    def __init__(self, wanted: set[int]):
        self.wanted = wanted  # ids of the parameters that need a gradient
        self.anchor = torch.zeros((), requires_grad=True)
        # Linear modules, by id(weight): the (weight, bias) that want a gradient, and per application
        # the input rows X (r, in) (None when only the bias wants one) and the output-gradient rows G (r, out).
        self.linears: dict[int, tuple[Tensor | None, Tensor | None]] = {}
        self.rows: dict[int, list[tuple[Tensor | None, Tensor]]] = defaultdict(list)
        self.sums: dict[int, tuple[Tensor, Tensor]] = {}  # LayerNorm parameters: id -> (param, running sum)

    def wants(self, *params: Tensor | None) -> bool:
        return any(p is not None and id(p) in self.wanted for p in params)

    def add_linear(self, weight: Tensor, bias: Tensor | None, x_rows: Tensor | None, g_rows: Tensor) -> None:
        """One application's rows, kept for one GEMM (weight) and one reduction (bias) at the end."""
        weight, bias = (p if self.wants(p) else None for p in (weight, bias))
        if weight is None and bias is None:
            return
        self.linears[id(weight if weight is not None else bias)] = (weight, bias)
        self.rows[id(weight if weight is not None else bias)].append((x_rows if weight is not None else None, g_rows))

    def add_sum(self, param: Tensor | None, rows: Tensor) -> None:
        """``rows (r, n)`` of a LayerNorm parameter's gradient, reduced at once: a ``(n,)`` sum is all that
        is needed, so keeping the rows until the end would only cost memory."""
        if self.wants(param):
            partial = rows.sum(0, dtype=param.dtype).view(param.shape)
            total = self.sums[id(param)][1] + partial if id(param) in self.sums else partial
            self.sums[id(param)] = (param, total)

    def finish(self) -> Iterator[tuple[Tensor, Tensor]]:
        """``(param, gradient)``: one GEMM per Linear weight and one reduction per Linear bias over the rows
        of all applications; the LayerNorm sums."""
        while self.rows:  # pop as we go, so each module's rows are freed once used
            key, rows = self.rows.popitem()
            weight, bias = self.linears.pop(key)
            g_rows = torch.cat([g for _, g in rows])
            if weight is not None:
                x_rows = torch.cat([x for x, _ in rows])
                del rows
                yield weight, _weight_gemm(g_rows, x_rows, weight.dtype)
            if bias is not None:
                yield bias, g_rows.sum(0, dtype=bias.dtype)
        while self.sums:
            yield self.sums.popitem()[1]


def _weight_gemm(g_rows: Tensor, x_rows: Tensor, dtype: torch.dtype) -> Tensor:
    """``G^T @ X``: ``(out, rows) @ (rows, in)`` -> the weight gradient ``(out, in)``, in ``dtype``.

    16-bit rows of a float32 parameter (autocast) on CUDA: one 16-bit tensor-core GEMM with float32
    output, as precise as upcasting first (the products are exact, the sums float32) without float32
    copies of the rows or a float32 GEMM."""
    if g_rows.is_cuda and g_rows.dtype in (torch.float16, torch.bfloat16) and dtype == torch.float32:
        try:
            return torch.mm(g_rows.t(), x_rows.to(g_rows.dtype), out_dtype=dtype)
        except (TypeError, RuntimeError, NotImplementedError):  # a torch without mm's out_dtype
            pass
    return g_rows.to(dtype).t() @ x_rows.to(dtype)


# ---- recording replacements for nn.Linear / nn.LayerNorm, active only while recomputing in backward ----


@contextlib.contextmanager
def _recording(steps: Sequence[nn.Module], recorder: _Recorder) -> Iterator[None]:
    """Route the steps' Linear/LayerNorm calls through the recording Functions; always restore."""
    patched = []
    try:
        for module in dict.fromkeys(m for step in steps for m in step.modules()):
            if "forward" in module.__dict__:  # already patched (nested call) or customised: leave it
                continue
            # Only modules that run the stock forward: a subclass overriding it computes something else.
            if isinstance(module, nn.Linear) and type(module).forward is nn.Linear.forward:
                module.forward = functools.partial(_linear, module, recorder)
            elif isinstance(module, nn.LayerNorm) and type(module).forward is nn.LayerNorm.forward:
                module.forward = functools.partial(_layer_norm, module, recorder)
            else:
                continue
            patched.append(module)
        yield
    finally:
        for module in patched:
            del module.forward


def _linear(module: nn.Linear, recorder: _Recorder, x: Tensor) -> Tensor:
    weight, bias = module.weight, module.bias
    if not recorder.wants(weight, bias):
        return nn.Linear.forward(module, x)
    # Detached parameters: autograd computes no weight gradient here; _RecordedLinear records rows instead.
    weight, bias = weight.detach(), None if bias is None else bias.detach()
    device = x.device.type
    if torch.is_autocast_enabled(device):  # cast as autocast casts linear, so the rows are what it multiplies
        x, weight, bias = (_autocast_cast(t, torch.get_autocast_dtype(device)) for t in (x, weight, bias))
    return _RecordedLinear.apply(recorder.anchor, x, weight, bias, module, recorder)


def _layer_norm(module: nn.LayerNorm, recorder: _Recorder, x: Tensor) -> Tensor:
    if not recorder.wants(module.weight, module.bias) or torch.is_autocast_enabled(x.device.type):
        return nn.LayerNorm.forward(module, x)
    weight = None if module.weight is None else module.weight.detach()
    bias = None if module.bias is None else module.bias.detach()
    return _RecordedLayerNorm.apply(recorder.anchor, x, weight, bias, module, recorder)


def _autocast_cast(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    # Autocast leaves float64 (and non-float) tensors alone.
    return t if t is None or not t.is_floating_point() or t.dtype == torch.float64 else t.to(dtype)


class _RecordedLinear(torch.autograd.Function):
    """``F.linear(x, weight, bias)`` with detached parameters; backward returns only the input gradient and
    records ``(X, G)`` rows for the owning module's parameters."""

    @staticmethod
    def forward(ctx, anchor, x, weight, bias, module, recorder):
        ctx.recorder, ctx.params = recorder, (module.weight, module.bias)
        ctx.save_for_backward(x if recorder.wants(module.weight) else None, weight)
        return F.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, g):
        x, weight = ctx.saved_tensors
        weight_param, bias_param = ctx.params
        g_rows = g.reshape(-1, g.shape[-1])
        ctx.recorder.add_linear(weight_param, bias_param, None if x is None else x.reshape(-1, x.shape[-1]), g_rows)
        grad_x = g.matmul(weight) if ctx.needs_input_grad[1] else None
        return None, grad_x, None, None, None, None


class _RecordedLayerNorm(torch.autograd.Function):
    """``layer_norm`` with detached affine parameters; backward returns only the input gradient and records
    ``x_hat * G`` (weight) and ``G`` (bias) rows of width ``prod(normalized_shape)``."""

    @staticmethod
    def forward(ctx, anchor, x, weight, bias, module, recorder):
        ctx.recorder, ctx.params, ctx.shape = recorder, (module.weight, module.bias), module.normalized_shape
        out, mean, rstd = torch.native_layer_norm(x, module.normalized_shape, weight, bias, module.eps)
        ctx.save_for_backward(x, weight, bias, mean, rstd)
        return out

    @staticmethod
    def backward(ctx, g):
        x, weight, bias, mean, rstd = ctx.saved_tensors
        weight_param, bias_param = ctx.params
        width = (weight if weight is not None else bias).numel()
        if ctx.recorder.wants(weight_param):
            # Recording the product, not x_hat and G apart: one tensor per application, same reduction.
            ctx.recorder.add_sum(weight_param, ((x - mean) * rstd * g).reshape(-1, width))
        ctx.recorder.add_sum(bias_param, g.reshape(-1, width))
        grad_x = None
        if ctx.needs_input_grad[1]:
            mask = [True, False, False]  # the input gradient only
            grad_x = torch.ops.aten.native_layer_norm_backward(g, x, ctx.shape, mean, rstd, weight, bias, mask)[0]
        return None, grad_x, None, None, None, None


# ---- RNG and autocast state, captured per step in forward and replayed in recomputation ----


def _rng_state(device: torch.device) -> tuple[Tensor, Tensor | None]:
    return torch.get_rng_state(), torch.cuda.get_rng_state(device) if device.type == "cuda" else None


def _set_rng_state(state: tuple[Tensor, Tensor | None], device: torch.device) -> None:
    cpu, cuda = state
    torch.set_rng_state(cpu)
    if cuda is not None:
        torch.cuda.set_rng_state(cuda, device)


def _autocast_state(device: torch.device) -> tuple[list[tuple[str, bool, torch.dtype]], bool]:
    kinds = [k for k in dict.fromkeys(("cpu", device.type)) if torch.amp.is_autocast_available(k)]
    states = [(k, torch.is_autocast_enabled(k), torch.get_autocast_dtype(k)) for k in kinds]
    return states, torch.is_autocast_cache_enabled()


@contextlib.contextmanager
def _autocast(state: tuple[list[tuple[str, bool, torch.dtype]], bool]) -> Iterator[None]:
    states, cache_enabled = state
    with contextlib.ExitStack() as stack:
        for kind, enabled, dtype in states:
            stack.enter_context(torch.autocast(kind, dtype=dtype, enabled=enabled, cache_enabled=cache_enabled))
        yield
