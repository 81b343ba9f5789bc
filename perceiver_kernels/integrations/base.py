"""What an integration module declares, and the checks their forwards share.

An integration module (one per library) defines ``INTEGRATIONS``: one :class:`Integration` per class it
patches, each with the replacement forward. A forward gets the :class:`~.core.PatchedForward` (the
module, the backend, a memo) and the call's arguments by parameter name, and returns the module's output,
or a :class:`Fallback` to hand the call to the module's original forward.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor, nn

from ..functional import SUPPORTED_DTYPES

if TYPE_CHECKING:
    from .core import PatchedForward

TRAINING_DROPOUT = "attention dropout while training (p > 0)"


@dataclass(frozen=True)
class Fallback:
    """Returned by an integration's forward to hand the call to the module's original forward."""

    reason: str


@dataclass(frozen=True)
class Integration:
    """One patched class (or a few sharing one forward) of one library."""

    key: str  # unique, stored on patched instances (so it must not change between versions of this package)
    name: str  # report label, e.g. "transformers Perceiver"
    classes: tuple[tuple[str, str], ...]  # (module that defines the class, class name), looked up in sys.modules
    forward: Callable[[PatchedForward, dict[str, Any]], Any]  # (patch, bound arguments) -> output or Fallback
    describe: Callable[[nn.Module], str]  # kind of one instance, for the report
    fallbacks: str  # when the original still runs, for the report
    required: tuple[str, ...]  # attributes our forward reads: a module without them is left alone


def unexpected_argument(arguments: dict[str, Any], known: set[str]) -> Fallback | None:
    """A fallback for any argument our forward does not reproduce (e.g. one a newer version added)."""
    for name, value in arguments.items():
        if name in known or value is None or value is False:
            continue
        if isinstance(value, (dict, tuple)) and not value:  # empty **kwargs / *args
            continue
        return Fallback(f"argument {name!r}")
    return None


def dtype_problem(*tensors: Tensor) -> Fallback | None:
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1 or not dtypes <= set(SUPPORTED_DTYPES):
        return Fallback(f"q/k/v dtypes {sorted(map(str, dtypes))}")
    return None


def training_dropout(module: nn.Module) -> Fallback | None:
    dropout = getattr(module, "dropout", None)
    if module.training and isinstance(dropout, nn.Dropout) and dropout.p > 0:
        # Our kernels have no dropout on the probabilities; running without it would be silently wrong.
        return Fallback("attention dropout while training")
    return None
