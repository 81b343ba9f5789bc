"""Determinism under ``torch.use_deterministic_algorithms(True)``: paths with a deterministic implementation
run (and repeat bitwise on a GPU); the paths without one (dQ by atomics: the Triton backward above the fast
path's head dims, the CUDA backend's SIMT backward) raise as PyTorch's own ops do, or warn with
``warn_only=True``."""

import pytest
import torch

import perceiver_kernels as pk
from perceiver_kernels.testing import forward_backward


@pytest.fixture
def deterministic():
    previous = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


def step(q, k, v, **options):
    """Forward and backward once: ``[out, lse, dq, dk, dv]``."""
    return forward_backward(pk.attention, q, k, v, return_lse=True, **options)


CASES = {
    "cross": dict(q_batch=2, nq=33, nk=300, dqk=32, dv=48, options=dict()),
    "broadcast-causal-padding": dict(q_batch=1, nq=17, nk=130, dqk=64, dv=64, options=dict(causal=True), pad=True),
    "rotary-gather": dict(q_batch=2, nq=9, nk=64, dqk=32, dv=32, options=dict(causal=True, rotary_dim=16), gather=True),
}


def inputs(case, device, dtype):
    q = torch.randn(case["q_batch"], case["nq"], 2, case["dqk"], device=device, dtype=dtype)
    k = torch.randn(2, case["nk"], 2, case["dqk"], device=device, dtype=dtype)
    v = torch.randn(2, case["nk"], 2, case["dv"], device=device, dtype=dtype)
    options = dict(case["options"])
    if case.get("pad"):
        options["key_padding_mask"] = torch.rand(2, case["nk"], device=device) < 0.3
    if case.get("gather"):
        options["kv_index"] = torch.arange(0, case["nk"], 2, device=device).expand(2, -1).contiguous()
    return q, k, v, options


@pytest.mark.parametrize("name", list(CASES))
def test_the_triton_fast_path_runs_deterministic(name, deterministic, device):
    """No atomics below the fast path's head dims: the flag changes nothing, and runs repeat bitwise (on a GPU
    this is the real check; in the interpreter it runs the same plan)."""
    q, k, v, options = inputs(CASES[name], device, torch.float32)
    first, second = step(q, k, v, backend="triton", **options), step(q, k, v, backend="triton", **options)
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)


def wide_head(device):
    """Head dim 261: above the Triton fast path, so the backward adds dQ with atomics."""
    return torch.randn(1, 5, 1, 261, device=device), *(torch.randn(1, 40, 1, 261, device=device) for _ in range(2))


def test_dq_by_atomics_raises_or_warns(deterministic, device):
    q, k, v = wide_head(device)
    with pytest.raises(RuntimeError, match="does not have a deterministic implementation"):
        step(q, k, v, backend="triton")
    torch.use_deterministic_algorithms(True, warn_only=True)
    with pytest.warns(UserWarning, match="dQ by atomics"):
        out, lse, dq, dk, dv = step(q, k, v, backend="triton")
    assert torch.isfinite(dq).all()


def test_the_alert_is_silent_without_the_flag(device, recwarn):
    assert not torch.are_deterministic_algorithms_enabled()
    step(*wide_head(device), backend="triton")
    assert not [w for w in recwarn if "deterministic" in str(w.message)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("name", list(CASES))
def test_repeated_steps_are_bitwise_identical_on_a_gpu(name, dtype, deterministic):
    """Ten forward+backward runs on a GPU: the Triton backend (and the CUDA backend's tensor-core kernels, 16-bit)
    give bitwise the same out, lse and gradients each time."""
    q, k, v, options = inputs(CASES[name], "cuda", dtype)
    backends = ["triton"] + (["cuda"] if dtype != torch.float32 else [])
    for backend in backends:
        first = step(q, k, v, backend=backend, **options)
        for _ in range(9):
            for a, b in zip(first, step(q, k, v, backend=backend, **options), strict=True):
                assert torch.equal(a, b), f"{backend} {name} {dtype}: runs differ"
