"""What :func:`~perceiver_kernels.integrations.patch`, ``unpatch`` and ``patch_status`` report."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class PatchedModule:
    """One module whose attention runs (or ran, in an ``unpatch`` report) on perceiver_kernels."""

    name: str  # qualified name in the model ("" is the model itself)
    integration: str  # e.g. "transformers Perceiver"
    kind: str  # e.g. "PerceiverSelfAttention (cross-attention)"
    fallbacks: str = ""  # when the module's original code still runs, in words
    calls: int = 0  # calls served by perceiver_kernels since it was patched
    fallback_calls: Mapping[str, int] = field(default_factory=dict)  # calls handed to the original, per reason


@dataclass(frozen=True)
class LeftModule:
    """One attention-like module left unchanged, and why."""

    name: str
    class_name: str
    reason: str


@dataclass(frozen=True)
class PatchReport:
    """What :func:`patch`, :func:`unpatch` or :func:`patch_status` did or found.

    ``patched``: the modules patched (``"patch"``, ``"status"``) or restored (``"unpatch"``).
    ``left``: modules whose class name contains "Attention" that were not patched, with the reason;
    modules that only wrap a listed module (e.g. transformers' ``PerceiverAttention`` around its
    ``PerceiverSelfAttention``) are not listed again.
    """

    action: str  # "patch", "unpatch" or "status"
    backend: str | None
    patched: tuple[PatchedModule, ...] = ()
    left: tuple[LeftModule, ...] = ()

    def __str__(self) -> str:
        verb = "restored" if self.action == "unpatch" else "patched"
        head = f"perceiver_kernels {self.action}"
        if self.backend is not None:
            head += f" (backend={self.backend!r})"
        head += f": {len(self.patched)} module(s) {verb}, {len(self.left)} left unchanged"
        names = [_display_name(m.name) for m in (*self.patched, *self.left)]
        width = max(map(len, names), default=0)
        lines = [head]
        for m in self.patched:
            line = f"  {verb:<9}{_display_name(m.name):<{width}}  {m.integration}: {m.kind}"
            if m.calls or m.fallback_calls:
                fell_back = sum(m.fallback_calls.values())
                reasons = ", ".join(f"{reason} x{count}" for reason, count in m.fallback_calls.items())
                line += f"  [{m.calls} call(s) on perceiver_kernels, {fell_back} on the original code"
                line += f" ({reasons})]" if reasons else "]"
            lines.append(line)
        for m in self.left:
            lines.append(f"  {'left':<9}{_display_name(m.name):<{width}}  {m.class_name}: {m.reason}")
        # One legend line per integration rather than per module: a deep model repeats the same kinds.
        legend = dict.fromkeys((m.integration, m.fallbacks) for m in self.patched if m.fallbacks)
        if legend:
            lines.append("  the original code still runs for calls with:")
            lines.extend(f"    {integration}: {fallbacks}" for integration, fallbacks in legend)
        return "\n".join(lines)


def _display_name(name: str) -> str:
    return name or "(model)"
