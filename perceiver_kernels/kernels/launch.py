"""The one door to the GPU: every Triton launch of the package goes through :func:`launch`.

Keeping it one function makes launches countable and gives host-overhead measurement a hook that is
part of the code, not a monkeypatch: inside :func:`record_launches` each launch is logged, and with
``execute=False`` it is skipped, so what remains of a call is its host work alone (validation,
planning, allocation, dispatch, autograd). ``perceiver-kernels bench --suite host`` measures that way
on a machine without a GPU (perceiver_kernels/bench/host.py). Outputs of skipped launches are left uninitialised.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import torch

_logs: list[LaunchLog] = []
_execute = True


@dataclass(eq=False)
class LaunchLog:
    """The launches made inside one :func:`record_launches` block: kernel names in order, with grids."""

    launches: list[tuple[str, tuple[int, ...]]] = field(default_factory=list)
    keep_args: bool = False
    calls: list[Launch] = field(default_factory=list)  # with keep_args: every launch, arguments and all

    @property
    def count(self) -> int:
        return len(self.launches)

    @property
    def kernels(self) -> list[str]:
        return [name for name, _ in self.launches]


class Launch(NamedTuple):
    kernel: object  # the @triton.jit function
    grid: tuple[int, ...]
    args: tuple
    constexprs: dict


@contextmanager
def record_launches(execute: bool = True, keep_args: bool = False) -> Iterator[LaunchLog]:
    """Log every Triton launch made inside the block; with ``execute=False`` also skip them (host-only
    timing); with ``keep_args`` also keep each launch's kernel and arguments (the static kernel report
    compiles them). Not thread-safe: the log and the switch are process-wide."""
    global _execute
    log = LaunchLog(keep_args=keep_args)
    previous = _execute
    _logs.append(log)
    _execute = execute and previous
    try:
        yield log
    finally:
        _logs.remove(log)
        _execute = previous


def launch(kernel, grid: tuple[int, ...], args: tuple, constexprs: dict) -> None:
    """``kernel[grid](*args, **constexprs)`` (``constexprs`` also carries ``num_warps``/``num_stages``).

    A GPU with less shared memory per block than the tiles were chosen for (sm_90a's 227 KiB; sm_80 has
    163, sm_86/89 99) makes Triton refuse the launch; the launch is then retried with one pipeline stage
    fewer, down to one, and ``constexprs`` (a cached plan's own dict) keeps the stage count that fit, so
    the refusal is paid once per signature."""
    if _logs:
        entry = (getattr(kernel, "__name__", None) or kernel.fn.__name__, grid)
        for log in _logs:
            log.launches.append(entry)
            if log.keep_args:
                log.calls.append(Launch(kernel, grid, args, constexprs))
        if not _execute:
            return
    while True:
        try:
            kernel[grid](*args, **constexprs)
            return
        except Exception as error:
            if not _fewer_stages(error, constexprs):
                raise


def _fewer_stages(error: Exception, constexprs: dict) -> bool:
    """Lower ``constexprs["num_stages"]`` in place if ``error`` is Triton's out-of-shared-memory refusal
    and a stage can go; whether it did."""
    from triton.runtime.errors import OutOfResources

    stages = constexprs.get("num_stages", 3)
    if not isinstance(error, OutOfResources) or "shared memory" not in str(error) or stages <= 1:
        return False
    constexprs["num_stages"] = stages - 1
    return True


def alert_not_deterministic(what: str) -> None:
    """What PyTorch's own ops do for a path without a deterministic implementation: under
    ``torch.use_deterministic_algorithms(True)`` raise a RuntimeError (a warning with ``warn_only=True``);
    otherwise nothing. ``what`` names the path."""
    if torch.are_deterministic_algorithms_enabled():
        message = (f"{what} does not have a deterministic implementation, but you set "
                   "'torch.use_deterministic_algorithms(True)'")  # fmt: skip
        if torch.is_deterministic_algorithms_warn_only_enabled():
            warnings.warn(message, stacklevel=3)
        else:
            raise RuntimeError(message)
