"""The patch mechanism: a per-instance ``forward`` that serves calls through an integration or hands them
to the original, and the walk behind ``patch``, ``patch_status`` and ``unpatch``."""

from __future__ import annotations

import inspect
import sys
from collections import Counter
from collections.abc import Callable
from functools import cache
from typing import Any

from torch import nn

from ..functional import backend_unavailable_reason, check_backend
from . import models
from .base import Fallback, Integration
from .registry import INTEGRATIONS
from .report import LeftModule, PatchedModule, PatchReport


class PatchedForward:
    """The instance attribute ``forward`` of a patched module.

    A callable object rather than a bound method or closure so that a patched model still deep-copies
    (the copy is patched and calls its own parameters) and pickles. It holds the module (a reference
    cycle the garbage collector handles) and only the *key* of its integration.
    """

    def __init__(self, module: nn.Module, integration: str, backend: str):
        self.module = module
        self.integration = integration
        self.backend = backend
        self.calls = 0
        self.fallback_calls: Counter[str] = Counter()
        self.cache: dict[Any, Any] = {}  # per-integration memo (perceiver-ar's table checks)

    def __call__(self, *args, **kwargs):
        module = self.module
        original = type(module).forward  # patch() made sure the class's forward is the one we replace
        try:
            bound = _signature(original).bind(module, *args, **kwargs)
        except TypeError:
            # Arguments the original would reject: let it raise its own error.
            self.fallback_calls["arguments the original forward rejects"] += 1
            return original(module, *args, **kwargs)
        arguments = dict(bound.arguments)  # by parameter name, only those passed
        del arguments[next(iter(bound.signature.parameters))]  # self
        result = INTEGRATIONS[self.integration].forward(self, arguments)
        if isinstance(result, Fallback):
            self.fallback_calls[result.reason] += 1
            return original(module, *args, **kwargs)
        self.calls += 1
        return result


@cache
def _signature(function: Callable) -> inspect.Signature:
    return inspect.signature(function)


def _supported_classes() -> list[tuple[type, Integration]]:
    """The classes of the registered integrations whose modules are imported. Looked up in ``sys.modules``
    only: a model can only hold instances of a class whose module is imported, and ``patch`` must not
    import transformers."""
    found = []
    for integration in INTEGRATIONS.values():
        for module_name, class_name in integration.classes:
            cls = getattr(sys.modules.get(module_name), class_name, None)
            if isinstance(cls, type):
                found.append((cls, integration))
    return found


def _why_not(module: nn.Module, cls: type, integration: Integration) -> str | None:
    if type(module).forward is not cls.forward:
        return f"{type(module).__qualname__} overrides {cls.__qualname__}.forward; patching would bypass its code"
    current = module.__dict__.get("forward")
    if current is not None and not isinstance(current, PatchedForward):
        return "its forward is already replaced on the instance (another wrapper or hook); left to that wrapper"
    missing = [name for name in integration.required if not hasattr(module, name)]
    if missing:
        return f"lacks {', '.join(missing)}, which this integration reads (an unsupported version?)"
    return None


def _check_model(model: Any) -> None:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")


def _check_backend(backend: Any) -> None:
    if check_backend(backend) != "auto" and (reason := backend_unavailable_reason(backend)) is not None:
        raise ValueError(f"backend={backend!r} cannot run here: {reason}")


def patch(model: nn.Module, backend: str = "auto") -> PatchReport:
    """Run the attention of every supported module inside ``model`` on :func:`perceiver_kernels.attention`.

    In place and per instance (other instances of the same classes are unaffected); idempotent (patching
    again only updates the backend). Only the attention core changes: projections, norms, output layers
    and their parameters are the module's own. See the package docstring for what is supported.

    Args:
        model: any ``nn.Module``; supported attention modules anywhere in its tree are patched.
        backend: passed to every ``attention`` call: one of ``perceiver_kernels.BACKENDS``.

    Returns:
        A :class:`PatchReport` of the patched modules and of the attention-like modules left unchanged.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
        ValueError: ``backend`` is not a known backend, or cannot run on this machine.
    """
    _check_model(model)
    _check_backend(backend)
    return _walk(model, backend, apply=True)


def patch_status(model: nn.Module) -> PatchReport:
    """What is patched in ``model`` now, with the calls served and fallen back since patching."""
    _check_model(model)
    return _walk(model, None, apply=False)


def unpatch(model: nn.Module) -> PatchReport:
    """Undo :func:`patch` everywhere in ``model``: the patched modules get their class's forward back (the
    instance attribute is deleted, nothing of ours stays) and ``MultiHeadAttention.backend`` its old value.
    Modules that are not patched are untouched; unpatching an unpatched model is a no-op."""
    _check_model(model)
    restored = []
    for name, module in model.named_modules():
        current = module.__dict__.get("forward")
        if isinstance(current, PatchedForward):
            del module.forward  # back to type(module).forward
            restored.append(_patched_entry(name, module, current))
        if (entry := models.restore(name, module)) is not None:
            restored.append(entry)
    return PatchReport("unpatch", None, tuple(restored), ())


def _walk(model: nn.Module, backend: str | None, apply: bool) -> PatchReport:
    classes = _supported_classes()
    ours = models.attention_class()
    patched: list[PatchedModule] = []
    left: list[LeftModule] = []
    listed: set[int] = set()  # ids of modules in either list
    for name, module in model.named_modules():  # shared (weight-tied) modules come once
        if isinstance(module, ours):
            entry = models.patch(name, module, backend) if apply else models.status(name, module)
            if entry is not None:
                patched.append(entry)
                listed.add(id(module))
            continue
        match = next(((cls, integration) for cls, integration in classes if isinstance(module, cls)), None)
        if match is None:
            continue
        cls, integration = match
        listed.add(id(module))
        reason = _why_not(module, cls, integration)
        if reason is not None:
            left.append(LeftModule(name, type(module).__qualname__, reason))
            continue
        current = module.__dict__.get("forward")
        if apply:
            if isinstance(current, PatchedForward):
                current.backend = backend  # patched before: keep its counters, take the new backend
            else:
                current = module.forward = PatchedForward(module, integration.key, backend)
        if isinstance(current, PatchedForward):
            patched.append(_patched_entry(name, module, current))
        else:  # patch_status on a module that patch() would handle
            left.append(LeftModule(name, type(module).__qualname__, "supported, not patched"))

    for name, module in model.named_modules():
        if "Attention" not in type(module).__name__ or id(module) in listed:
            continue
        if any(id(inner) in listed for inner in module.modules()):
            continue  # a wrapper (projections, residual) around an attention module already listed
        left.append(LeftModule(name, type(module).__qualname__, "not an attention implementation patch() supports"))
    return PatchReport("patch" if apply else "status", backend, tuple(patched), tuple(left))


def _patched_entry(name: str, module: nn.Module, current: PatchedForward) -> PatchedModule:
    integration = INTEGRATIONS[current.integration]
    return PatchedModule(
        name=name,
        integration=integration.name,
        kind=integration.describe(module),
        fallbacks=integration.fallbacks,
        calls=current.calls,
        fallback_calls=dict(current.fallback_calls),
    )
