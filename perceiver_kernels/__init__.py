"""Fused attention kernels for the Perceiver family (Perceiver, Perceiver IO, Perceiver AR)."""

from .functional import BACKENDS, apply_rotary, attention, backend_unavailable_reason, resolve_backend
from .integrations import PatchReport, patch, unpatch
from .kv_cache import append_to_cache
from .problem import set_value_checks, value_checks_enabled
from .reference import attention_reference

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "PatchReport",
    "__version__",
    "append_to_cache",
    "apply_rotary",
    "attention",
    "attention_reference",
    "backend_unavailable_reason",
    "patch",
    "resolve_backend",
    "set_value_checks",
    "unpatch",
    "value_checks_enabled",
]
