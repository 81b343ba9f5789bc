"""``perceiver_kernels.models.MultiHeadAttention``: it already calls ``pk.attention``, so patching only
sets its ``backend`` attribute (remembering the old one, which ``unpatch`` restores)."""

from __future__ import annotations

from torch import nn

from .report import PatchedModule

NAME = "perceiver_kernels.models"
_SAVED_BACKEND = "_perceiver_kernels_backend_before_patch"  # (was an instance attribute, value)


def attention_class() -> type:
    from ..models import MultiHeadAttention  # imported on use: `import perceiver_kernels` stays light

    return MultiHeadAttention


def _entry(name: str, module: nn.Module, original: str, backend: str) -> PatchedModule:
    return PatchedModule(name, NAME, f"{type(module).__name__} (backend {original!r} -> {backend!r})")


def patch(name: str, module: nn.Module, backend: str) -> PatchedModule:
    if _SAVED_BACKEND not in module.__dict__:  # the first patch remembers the original, later ones keep it
        module.__dict__[_SAVED_BACKEND] = ("backend" in module.__dict__, module.backend)
    module.backend = backend
    return _entry(name, module, module.__dict__[_SAVED_BACKEND][1], backend)


def status(name: str, module: nn.Module) -> PatchedModule | None:
    if _SAVED_BACKEND not in module.__dict__:
        return None
    return _entry(name, module, module.__dict__[_SAVED_BACKEND][1], module.backend)


def restore(name: str, module: nn.Module) -> PatchedModule | None:
    if _SAVED_BACKEND not in module.__dict__:
        return None
    patched_backend = module.backend
    was_instance_attribute, value = module.__dict__.pop(_SAVED_BACKEND)
    if was_instance_attribute:
        module.backend = value
    else:
        del module.backend  # the class attribute shows through again
    return _entry(name, module, patched_backend, module.backend)
