"""Fused attention kernels for the Perceiver family (Perceiver, Perceiver IO, Perceiver AR)."""

from .functional import BACKENDS, attention, backend_unavailable_reason, resolve_backend
from .reference import attention_reference

__version__ = "0.1.0"

__all__ = [
    "BACKENDS",
    "__version__",
    "attention",
    "attention_reference",
    "backend_unavailable_reason",
    "resolve_backend",
]
