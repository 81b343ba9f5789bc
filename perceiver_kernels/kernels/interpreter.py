"""Triton's CPU interpreter without its per-call re-patching (only with ``TRITON_INTERPRET=1``).

On every call of a nested ``@triton.jit`` function (``_load_rows``, ``tl.sum``, ``tl.zeros``, ...) the
interpreter patches ``triton.language`` again, walking its members with ``inspect.getmembers``, although
the running kernel's launch already patched the same modules and the second pass changes nothing
(patched members are no longer builtins; the rest is re-set to equal values). That walk was a third of the
interpreter's time in this package's tests (cProfile of a 33x300 forward+backward). :func:`install` keeps
the first patch of each language module for the rest of the launch and skips the repeats; launches
themselves patch and restore as before, so results are the same, only sooner. Nothing is changed if this
Triton's interpreter is laid out otherwise.
"""

from __future__ import annotations

import inspect

_installed = False


def install() -> bool:
    """Skip the interpreter's repeated patching of ``triton.language`` inside a launch; idempotent.
    Returns whether the interpreter is (now) patched this way."""
    global _installed
    if _installed:
        return True
    import triton.language as tl
    from triton.runtime import interpreter

    original = getattr(interpreter, "_patch_lang", None)
    scope_type = getattr(interpreter, "_LangPatchScope", None)
    if original is None or scope_type is None or not hasattr(scope_type, "restore"):
        return False
    languages = (tl, tl.core)
    modules_of: dict[object, frozenset[int]] = {}
    patched: set[int] | None = None  # ids of the language modules the running launch has patched

    def modules(fn) -> frozenset[int]:
        found = modules_of.get(fn)
        if found is None:
            found = modules_of[fn] = frozenset(
                id(v) for v in fn.__globals__.values() if inspect.ismodule(v) and v in languages
            )
        return found

    def patch_lang(fn):
        nonlocal patched
        wanted = modules(fn)
        if patched is not None and wanted <= patched:
            return None  # a nested call: its call site ignores the scope (it never restored one)
        scope = original(fn)
        if patched is not None:
            patched |= wanted  # a nested call into another language module (tl.core from tl.sum)
            return scope
        patched = set(wanted)  # a launch: the grid executor restores this scope when the grid is done
        restore = scope.restore

        def restore_and_end_launch():
            nonlocal patched
            patched = None
            restore()

        scope.restore = restore_and_end_launch
        return scope

    interpreter._patch_lang = patch_lang
    _installed = True
    return True
