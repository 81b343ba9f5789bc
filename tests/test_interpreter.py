"""perceiver_kernels/kernels/interpreter.py: inside a launch the CPU interpreter patches each language module once
(not again on every nested @jit call), and a launch still leaves triton.language as it found it."""

import pytest
import torch

import perceiver_kernels as pk
from perceiver_kernels.kernels.configs import interpreter_enabled
from perceiver_kernels.kernels.launch import record_launches

pytestmark = pytest.mark.skipif(not interpreter_enabled(), reason="only with Triton's CPU interpreter")


def test_a_launch_patches_each_module_once_and_restores_them(monkeypatch):
    import triton.language as tl
    from triton.runtime import interpreter

    q, k, v = torch.randn(2, 40, 2, 16), torch.randn(2, 70, 2, 16), torch.randn(2, 70, 2, 16)
    pk.attention(q, k, v, backend="triton")  # defines the kernels (and installs the patch)
    walks = []
    original = interpreter._patch_builtin
    monkeypatch.setattr(interpreter, "_patch_builtin", lambda pkg, *a: (walks.append(pkg), original(pkg, *a))[1])
    before = {name: getattr(tl, name) for name in ("sum", "max", "zeros", "load", "dot", "range")}

    with record_launches() as launches:
        out = pk.attention(q, k, v, backend="triton", causal=True)
    torch.testing.assert_close(out, pk.attention(q, k, v, backend="reference", causal=True), rtol=1e-5, atol=1e-5)
    # A launch walks tl (its tensor, math and descriptor types too), then tl.core once for tl.sum's module: 10
    # walks here. Without the patch every nested call of every program walks them again (1780 here).
    assert len(walks) <= 12 * launches.count, f"{len(walks)} walks of triton.language in {launches.count} launches"
    assert {name: getattr(tl, name) for name in before} == before
