"""Recomputing execution of a chain of blocks: ``run_shared_chain(steps, x)``, the encoder's memory mode.

Perceiver encoders apply the same self-attention block ``L`` times (module reuse). Under plain autograd
every repetition keeps all of its activations from forward to backward. :func:`run_shared_chain` gives the
same outputs and gradients while keeping, between forward and backward, only each step's input, at the
price of one extra forward:

* Forward runs the steps under ``no_grad`` (no autograd graph is built for them at all) and saves each
  step's input and RNG state.
* Backward walks the steps in reverse: it recomputes a step from its input (with the forward's RNG and
  autocast state, so dropout masks repeat) and back-propagates through it at once. The step's parameters
  are replaced by detached stand-ins while it is recomputed, so that autograd accumulates a shared
  weight's gradient over the repetitions in place, as plain reuse does, and each parameter receives one
  gradient when the chain's backward returns (what DDP and FSDP2 count on).

Against ``torch.utils.checkpoint`` around each step (``activation_checkpointing=True``) the same tensors
are kept and the same ones recomputed, so the peak is the same; the difference is time: no graph is built
in forward, and one autograd Function runs the chain instead of a checkpoint frame per step. The executor
once deferred each shared weight's gradient to one GEMM over the rows of all repetitions; that kept the rows
of every repetition alive at the end of backward (backward's peak near plain reuse's) and was slower on CPU,
so it is gone (docs/DESIGN.md has the measurements).

Under ``torch.compile``, and where FSDP2's ``fully_shard`` wrapped the steps themselves (or modules inside
them), the steps run as non-reentrant ``torch.utils.checkpoint`` regions instead: the same memory and
recomputation, on the path Dynamo traces and FSDP2 supports.

Limits: buffers updated in forward (BatchNorm running statistics) are updated again by the recomputation,
as with ``torch.utils.checkpoint``. The steps must not change between forward and backward, and the same
modules must not run in another thread during the chain's backward (their parameters are swapped).
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.autograd.graph import get_gradient_edge
from torch.utils.checkpoint import checkpoint

__all__ = ["recomputing", "run_shared_chain"]

_state = threading.local()


def recomputing() -> bool:
    """True while a step is being recomputed in :func:`run_shared_chain`'s backward (in this thread):
    activation checkpointing inside it would only recompute the same forward a third time."""
    return getattr(_state, "recomputing", False)


def run_shared_chain(steps: Sequence[nn.Module], x: Tensor) -> Tensor:
    """Apply ``steps[0], steps[1], ...`` in order to ``x``, recomputing them in backward.

    Args:
        steps: modules mapping a ``(B, N, C)`` tensor to one of the same shape; the same module may
            appear several times (weight sharing).
        x: ``(B, N, C)`` input.

    Returns:
        ``(B, N, C)``, equal to the plain loop ``for s in steps: x = s(x)``, with the same gradients for
        ``x`` and every parameter; between forward and backward only each step's input is kept. Without
        grad mode, or when neither ``x`` nor any parameter requires grad, it simply is the plain loop.
    """
    steps = tuple(steps)
    if not steps or not torch.is_grad_enabled():
        return _plain(steps, x)
    if torch.compiler.is_compiling() or _sharded_by_fsdp(steps):
        for step in steps:
            x = checkpoint(step, x, use_reentrant=False)
        return x
    params = tuple(dict.fromkeys(p for step in steps for p in step.parameters() if p.requires_grad))
    if not (x.requires_grad or params):
        return _plain(steps, x)
    return _RecomputedChain.apply(x, steps, *params)


def _sharded_by_fsdp(steps: tuple[nn.Module, ...]) -> bool:
    """Whether ``fully_shard`` wrapped a step or a module inside one: such a module all-gathers its
    parameters in hooks on its own calls, which would put them back over the stand-ins; FSDP2 supports
    ``torch.utils.checkpoint`` recomputation instead."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for step in dict.fromkeys(steps) for m in step.modules())


def _plain(steps: Sequence[nn.Module], x: Tensor) -> Tensor:
    for step in steps:
        x = step(x)
    return x


class _RecomputedChain(torch.autograd.Function):
    """Inputs: ``x``, the steps, and the steps' parameters that require grad (so that autograd routes their
    gradients here, one per parameter, as DDP and FSDP2 expect). Keeps each step's input."""

    @staticmethod
    def forward(ctx, x: Tensor, steps: tuple[nn.Module, ...], *params: Tensor) -> Tensor:
        ctx.steps, ctx.param_ids = steps, [id(p) for p in params]  # the modules hold them: read there
        ctx.autocast = _autocast_state(x.device)
        ctx.rng, ctx.inputs = [], []
        ctx.save_for_backward(x)  # the caller's tensor: autograd checks that it is not modified in place
        for i, step in enumerate(steps):  # autograd.Function.forward already runs without grad
            if i > 0:
                ctx.inputs.append(x)  # this Function's own tensors: backward frees them one by one
            ctx.rng.append(_rng_state(x.device))
            x = step(x)
        return x

    @staticmethod
    @once_differentiable  # a double backward through the recomputation raises instead of going wrong
    def backward(ctx, grad: Tensor) -> tuple[Tensor | None, ...]:
        inputs = [*ctx.saved_tensors, *ctx.inputs]
        device = inputs[0].device
        if not _graph_kept():  # no second backward will come: each input goes once its step is done, as
            ctx.inputs = None  # checkpointing's do, not when the whole backward ends (the nodes live until then)
        # Leaves that stand in for the parameters while the steps are recomputed: autograd accumulates each
        # one's gradient over the repetitions into its .grad in place, as plain reuse accumulates into the
        # parameter's, and the parameters themselves get one gradient each when this Function returns.
        wanted = {pid for pid, need in zip(ctx.param_ids, ctx.needs_input_grad[2:], strict=True) if need}
        stand_ins = {id(p): p.detach().requires_grad_() for s in ctx.steps for p in s.parameters() if id(p) in wanted}
        rng_devices = [device] if device.type == "cuda" else []
        # fork_rng puts the caller's RNG state back afterwards: recomputing dropout consumes nothing.
        with torch.random.fork_rng(devices=rng_devices), _flag_recomputing():
            for i in reversed(range(len(ctx.steps))):
                _set_rng_state(ctx.rng[i], device)
                x = inputs.pop().detach().requires_grad_(i > 0 or ctx.needs_input_grad[0])
                with torch.enable_grad(), _autocast(ctx.autocast), _standing_in(ctx.steps[i], stand_ins) as used:
                    y = ctx.steps[i](x)
                targets = ([x] if x.requires_grad else []) + used
                # Backward from y's graph edge, y itself dropped: its values are not needed (unless an op
                # saved them), and checkpointing does not hold a step's output during its backward either.
                edge = get_gradient_edge(y) if y.requires_grad and targets else None
                del y
                if edge is not None:
                    torch.autograd.backward(edge, grad, inputs=targets)
                if x.requires_grad:
                    grad = x.grad if x.grad is not None else torch.zeros_like(x)
                del x, targets, edge
        grad_x = grad if ctx.needs_input_grad[0] else None
        grads = [stand_ins[pid].grad if pid in stand_ins else None for pid in ctx.param_ids]
        stand_ins.clear()
        return (grad_x, None, *grads)


def _graph_kept() -> bool:
    """Whether the backward now running keeps the graph (``retain_graph=True``): a later backward will need the
    saved inputs again. True where this torch cannot say."""
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return True if keep_graph is None else keep_graph()


@contextlib.contextmanager
def _standing_in(step: nn.Module, stand_ins: dict[int, Tensor]) -> Iterator[list[Tensor]]:
    """Run ``step`` with its parameters replaced by their stand-ins (those in ``stand_ins``, by the
    parameter's id); yields the stand-ins used. Always restores the parameters."""
    swapped, used = [], {}
    try:
        for module in step.modules():
            for name, p in module._parameters.items():
                if p is not None and id(p) in stand_ins:
                    swapped.append((module, name, p))
                    used[id(p)] = stand_ins[id(p)]
        for module, name, p in swapped:
            module._parameters[name] = stand_ins[id(p)]
        yield list(used.values())
    finally:
        for module, name, p in swapped:
            module._parameters[name] = p


@contextlib.contextmanager
def _flag_recomputing() -> Iterator[None]:
    outer = recomputing()
    _state.recomputing = True
    try:
        yield
    finally:
        _state.recomputing = outer


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
