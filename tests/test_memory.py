"""Memory (issue 17, item 6): a long loop of forward+backward calls with every option leaks nothing (live tensors
and Python allocations stay flat), and a forward allocates exactly what docs/DESIGN.md says: the output and the
lse, plus the float32 split-KV partials when the keys are split."""

import gc
import tracemalloc

import pytest
import torch

import perceiver_kernels as pk
from perceiver_kernels.bench.host import CountAllocations
from perceiver_kernels.kernels.attention_fwd import attention_forward
from perceiver_kernels.kernels.launch import record_launches


def live_tensors() -> int:
    gc.collect()
    return sum(1 for obj in gc.get_objects() if issubclass(type(obj), torch.Tensor))  # type(): no proxies


def every_option(device):
    """One call's inputs with every option of the contract: broadcast q, causal, padding, rotary with per-sample
    positions, a gather, and the lse."""
    q = torch.randn(1, 6, 2, 16, device=device, requires_grad=True)
    k = torch.randn(2, 40, 2, 16, device=device, requires_grad=True)
    v = torch.randn(2, 40, 2, 24, device=device, requires_grad=True)
    kv_index = torch.stack([torch.arange(0, 40, 2), torch.arange(1, 40, 2)]).to(device)
    options = dict(
        causal=True, key_padding_mask=torch.rand(2, 40, device=device) < 0.2, rotary_dim=8, kv_index=kv_index,
        k_positions=torch.arange(40, device=device).expand(2, -1) - torch.tensor([[0], [3]], device=device),
        q_positions=torch.arange(34, 40, device=device).expand(2, -1), return_lse=True,
    )  # fmt: skip
    return q, k, v, options


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_a_long_loop_of_training_calls_does_not_grow(backend, device):
    q, k, v, options = every_option(device)

    def call():
        out, lse = pk.attention(q, k, v, backend=backend, **options)
        (out.sum() + lse.masked_fill(lse.isinf(), 0).sum()).backward()
        q.grad = k.grad = v.grad = None

    for _ in range(2):  # caches (launch plans, rotary tables, compiled kernels) fill here
        call()
    tensors = live_tensors()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(6):  # a leaked tensor per call shows in the count; the interpreter makes calls slow
            call()
        gc.collect()
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert live_tensors() <= tensors, "tensors are kept alive across calls"
    assert grown < 64 * 1024, f"Python allocations grew by {grown} bytes over 6 calls"


@pytest.mark.parametrize("num_splits", [1, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_the_forward_allocates_out_lse_and_split_partials(num_splits, dtype):
    """Head dims that need no aligned copy: out (q's dtype), lse (float32) and, with S splits, S float32 partial
    outputs and lses. The launches are skipped (the package's hook): these are the host's allocations."""
    batch, nq, nk, heads, dqk, dv = 2, 7, 300, 3, 32, 48
    q = torch.randn(batch, nq, heads, dqk, dtype=dtype)
    k, v = torch.randn(batch, nk, heads, dqk, dtype=dtype), torch.randn(batch, nk, heads, dv, dtype=dtype)
    with record_launches(execute=False) as log, CountAllocations() as allocated:
        attention_forward(q, k, v, None, None, None, None, None, 0, True, False, dqk**-0.5, num_splits)
    rows = batch * nq * heads
    expected = rows * dv * q.element_size() + rows * 4
    if num_splits > 1:
        assert log.count == 2  # the split kernel and the merge
        expected += num_splits * rows * (dv + 1) * 4
    assert allocated.bytes == expected
