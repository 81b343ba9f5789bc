"""The host path of ``pk.attention``: no device synchronisation by default, the launches each call makes,
gradients laid out like their inputs, and the opt-in value checks."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import perceiver_kernels as pk
from perceiver_kernels.kernels.launch import record_launches
from perceiver_kernels.testing import AttentionCase, attention_options, make_inputs

aten = torch.ops.aten
# Ops that read a tensor's values on the host (a device synchronisation on a GPU), or whose output shape
# depends on values (the same).
SYNCING_OPS = {
    aten._local_scalar_dense.default, aten.is_nonzero.default, aten.item.default, aten.equal.default,
    aten.allclose.default, aten.nonzero.default, aten.masked_select.default, aten.unique_consecutive.default,
    aten._unique2.default, aten.unique_dim.default, aten.repeat_interleave.Tensor, aten.bincount.default,
}  # fmt: skip


class NoSync(TorchDispatchMode):
    """Fails on any op that synchronises with the device or copies between devices."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCING_OPS:
            raise AssertionError(f"{func} reads tensor values on the host (a device sync)")
        if func in (aten._to_copy.default, aten.copy_.default):
            devices = {t.device for t in (*args, *(kwargs or {}).values()) if isinstance(t, torch.Tensor)}
            if "device" in (kwargs or {}):
                devices.add(torch.device(kwargs["device"]))
            assert len(devices) <= 1, f"{func} copies between devices {devices}"
        return func(*args, **(kwargs or {}))


# Every option of the contract, alone and as Perceiver AR combines them.
CASES = {
    "plain": AttentionCase(nq=5, nk=40),
    "causal": AttentionCase(nq=9, nk=40, causal=True),
    "kv-lengths": AttentionCase(batch=3, nq=5, nk=40, kv_lengths=(40, 7, 0), causal=True),
    "key-padding": AttentionCase(nq=5, nk=40, pad_fraction=0.3),
    "broadcast-query": AttentionCase(batch=3, q_batch=1, nq=5, nk=40),
    "rotary-default": AttentionCase(nq=9, nk=40, causal=True, rotary_dim=8),
    "rotary-left-pad": AttentionCase(nq=9, nk=40, causal=True, rotary_dim=8, positions="left-pad"),
    "rotary-broadcast-positions": AttentionCase(batch=3, q_batch=1, nq=5, nk=40, rotary_dim=8, positions="random"),
    "prefix-dropout": AttentionCase(nq=9, nk=40, causal=True, rotary_dim=8, prefix_dropout=True),
    "decode": AttentionCase(batch=3, nq=1, nk=40, causal=True, kv_lengths=(40, 17, 1), rotary_dim=8),
    "wide-head": AttentionCase(nq=5, nk=40, heads=1, dqk=300, dv=40, causal=True),
    "odd-head-dims-permuted": AttentionCase(nq=5, nk=40, dqk=7, dv=13, permuted=True),
}


def run_once(case: AttentionCase, device, num_splits=0, **overrides):
    """Forward and backward of ``pk.attention`` (out and lse both carrying gradient) on fresh inputs."""
    inputs = make_inputs(case, torch.float32, device)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    options = {**attention_options(inputs), **overrides}
    if num_splits:
        from perceiver_kernels.ops import triton_attention
        from perceiver_kernels.testing import backend_fn

        out, lse = backend_fn(triton_attention, num_splits)(q, k, v, **options)
    else:
        out, lse = pk.attention(q, k, v, backend="triton", return_lse=True, **options)
    torch.autograd.backward((out, lse), (inputs["grad_out"], torch.zeros_like(lse)))
    return inputs


@pytest.fixture
def no_value_checks():
    previous = pk.set_value_checks(False)
    yield
    pk.set_value_checks(previous)


@pytest.mark.parametrize("num_splits", [0, 3])
@pytest.mark.parametrize("name", list(CASES))
def test_no_device_sync(name, num_splits, device, no_value_checks):
    """Forward and backward of every option read no tensor value on the host. Launches are skipped: what a
    kernel reads is the device's business; the host path up to each launch is what must not sync."""
    with record_launches(execute=False), NoSync():
        run_once(CASES[name], device, num_splits)


def test_value_checks_would_sync(device):
    """The mode above does catch a sync: the opt-in value checks read kv_lengths."""
    previous = pk.set_value_checks(True)
    try:
        with record_launches(execute=False), NoSync(), pytest.raises(AssertionError, match="device sync"):
            run_once(CASES["kv-lengths"], device)
    finally:
        pk.set_value_checks(previous)


def count_launches(case: AttentionCase, device, **kw) -> tuple[list[str], list[str]]:
    """Kernel names launched by the forward alone and by forward + backward."""
    inputs = make_inputs(case, torch.float32, device)
    with record_launches(execute=False) as forward:
        with torch.no_grad():
            pk.attention(inputs["q"], inputs["k"], inputs["v"], backend="triton", **attention_options(inputs), **kw)
    with record_launches(execute=False) as both:
        out = pk.attention(inputs["q"], inputs["k"], inputs["v"], backend="triton", **attention_options(inputs), **kw)
        out.backward(inputs["grad_out"])
    return forward.kernels, both.kernels


FWD, DQ, DKDV, DELTA, SUM_ROTATE, MERGE = (
    "_fwd_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel", "_bwd_delta_kernel", "_sum_rotate_kernel",
    "_merge_splits_kernel",
)  # fmt: skip


@pytest.mark.parametrize(
    "name,forward,both",
    [
        # One launch forward; the backward is the dQ kernel (which also computes delta), then dK/dV.
        ("plain", [FWD], [FWD, DQ, DKDV]),
        ("kv-lengths", [FWD], [FWD, DQ, DKDV]),
        ("key-padding", [FWD], [FWD, DQ, DKDV]),
        ("prefix-dropout", [FWD], [FWD, DQ, DKDV, SUM_ROTATE, SUM_ROTATE]),
        # A broadcast query's dQ partials are summed over the batch by one more kernel.
        ("broadcast-query", [FWD], [FWD, DQ, DKDV, SUM_ROTATE]),
        # Rotary: dK and dQ are computed in the rotated frame and turned back (one kernel each).
        ("rotary-default", [FWD], [FWD, DQ, DKDV, SUM_ROTATE, SUM_ROTATE]),
        # Head dims above the fast path: delta's own pass, dV and dK/dQ launches, dQ's float32 buffer cast.
        ("wide-head", [FWD], [FWD, DELTA, DKDV, DKDV, SUM_ROTATE]),
    ],
)
def test_launches_per_call(name, forward, both, device):
    assert count_launches(CASES[name], device) == (forward, both)


def test_split_kv_launches(device):
    """Forced key splits: the forward merges them (one more launch), the backward sums dQ's partials."""
    from perceiver_kernels.ops import triton_attention
    from perceiver_kernels.testing import backend_fn

    inputs = make_inputs(CASES["plain"], torch.float32, device)
    with record_launches(execute=False) as log:
        out, _ = backend_fn(triton_attention, num_splits=3)(inputs["q"], inputs["k"], inputs["v"])
        out.backward(inputs["grad_out"])
    assert log.kernels == [FWD, MERGE, DQ, DKDV, SUM_ROTATE]


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_gradients_have_the_inputs_layout(backend, device):
    """A (B, H, N, D) tensor viewed as (B, N, H, D) gets its gradient back in (B, H, N, D) order, so
    autograd stores it as is (no copy into the caller's layout)."""
    x = [torch.randn(2, 3, n, 16, device=device, requires_grad=True) for n in (7, 20, 20)]  # (B, H, N, D)
    q, k, v = (t.transpose(1, 2) for t in x)
    captured = {}
    for name, view in zip("qkv", (q, k, v), strict=True):
        view.register_hook(lambda grad, name=name: captured.setdefault(name, grad))
    pk.attention(q, k, v, causal=True, backend=backend).sum().backward()
    if backend == "triton":
        for name, view in zip("qkv", (q, k, v), strict=True):
            assert captured[name].stride() == view.stride(), name
    for leaf in x:
        assert leaf.grad.is_contiguous()


def test_value_checks_are_opt_in(device):
    """Off: out-of-range kv_lengths are clamped to [0, Nk] (as the reference clamps them) and out-of-range
    kv_index rows to [0, Nk); on: a ValueError naming the argument."""
    q, k, v = (torch.randn(2, n, 2, 16, device=device) for n in (3, 9, 9))
    lengths = torch.tensor([20, -3], device=device)
    previous = pk.set_value_checks(False)
    try:
        assert not pk.value_checks_enabled()
        out = pk.attention(q, k, v, kv_lengths=lengths, backend="triton")
        clamped = pk.attention(q, k, v, kv_lengths=lengths.clamp(0, 9), backend="reference")
        torch.testing.assert_close(out, clamped, rtol=1e-4, atol=1e-5)
        index = torch.tensor([[0, 4, 100], [1, 2, 3]], device=device)
        out = pk.attention(q, k, v, kv_index=index, backend="triton")
        torch.testing.assert_close(out, pk.attention(q, k, v, kv_index=index.clamp(0, 8), backend="reference"))
        pk.set_value_checks(True)
        with pytest.raises(ValueError, match=r"kv_lengths values must lie in \[0, Nk=9\]"):
            pk.attention(q, k, v, kv_lengths=lengths, backend="triton")
        with pytest.raises(ValueError, match=r"kv_index values must lie in \[0, Nk=9\)"):
            pk.attention(q, k, v, kv_index=index, backend="triton")
    finally:
        pk.set_value_checks(previous)
    with pytest.raises(TypeError, match="enabled must be a bool"):
        pk.set_value_checks(1)


def test_value_checks_default_comes_from_the_environment():
    import subprocess
    import sys

    code = "import perceiver_kernels as pk; print(pk.value_checks_enabled())"
    for value, expected in (("1", "True"), ("0", "False")):
        env = {**__import__("os").environ, "PERCEIVER_KERNELS_CHECK_VALUES": value}
        result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert result.stdout.strip() == expected


def decode_problem(batch=4, capacity=256, heads=4, head_dim=64, dtype=torch.bfloat16):
    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=dtype)

    k_cache, v_cache = rand(batch, capacity, heads, head_dim), rand(batch, capacity, heads, head_dim)
    lengths = torch.tensor([17, 100, 1, 200][:batch], device="cuda", dtype=torch.int32)
    return k_cache, v_cache, lengths, rand(batch, 1, heads, head_dim)


@pytest.mark.gpu
def test_decode_loop_never_syncs(no_value_checks):
    """A decode loop (append to the cache, then attend with rotary and per-sample lengths) under CUDA's
    sync debug mode set to raise on any host-device synchronisation."""
    k_cache, v_cache, lengths, q = decode_problem()
    options = dict(causal=True, rotary_dim=32)
    pk.attention(q, k_cache, v_cache, kv_lengths=lengths, **options)  # compile the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(4):
            lengths = pk.append_to_cache(k_cache, v_cache, lengths, torch.randn_like(q), torch.randn_like(q))
            out = pk.attention(q, k_cache, v_cache, kv_lengths=lengths, **options)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    expected = pk.attention(q, k_cache, v_cache, kv_lengths=lengths, backend="reference", **options)
    torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_decode_step_replays_in_a_cuda_graph(no_value_checks):
    """One decode step captured once and replayed with new lengths and queries: the host path keeps no
    value it read at capture time (the lengths steer masks, default rotary positions and splits on the
    device)."""
    k_cache, v_cache, lengths, q = decode_problem()
    options = dict(causal=True, rotary_dim=32)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm up outside the capture (compilation, cached tables)
        pk.attention(q, k_cache, v_cache, kv_lengths=lengths, **options)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = pk.attention(q, k_cache, v_cache, kv_lengths=lengths, **options)
    # A longer eager call grows the cached rotary table; the graph still reads the old one.
    longer = torch.randn(q.shape[0], 4 * k_cache.shape[1], *k_cache.shape[2:], device="cuda", dtype=k_cache.dtype)
    pk.attention(q, longer, longer, **options)
    for new_lengths in ([5, 60, 256, 1], [256, 0, 33, 128]):
        lengths.copy_(torch.tensor(new_lengths, dtype=lengths.dtype))
        q.copy_(torch.randn_like(q))
        graph.replay()
        torch.cuda.synchronize()
        expected = pk.attention(q, k_cache, v_cache, kv_lengths=lengths, backend="reference", **options)
        torch.testing.assert_close(out.float(), expected.float(), atol=2e-2, rtol=2e-2)


def test_launch_retries_with_fewer_stages_when_shared_memory_runs_out():
    """A card with less shared memory than the plan assumed: the launch drops pipeline stages until it
    fits, and the plan's dict keeps the count that fit; other errors pass through."""
    from triton.runtime.errors import OutOfResources

    from perceiver_kernels.kernels.launch import launch

    class Kernel:
        __name__ = "fake_kernel"

        def __init__(self, fits_at: int):
            self.fits_at, self.tried = fits_at, []

        def __getitem__(self, grid):
            def run(*args, num_stages=3, **constexprs):
                self.tried.append(num_stages)
                if num_stages > self.fits_at:
                    raise OutOfResources(100_000 * num_stages, 232_448, "shared memory")

            return run

    kernel, plan = Kernel(fits_at=1), {"num_warps": 4, "num_stages": 3}
    launch(kernel, (1,), (), plan)
    assert kernel.tried == [3, 2, 1] and plan["num_stages"] == 1
    launch(kernel, (1,), (), plan)
    assert kernel.tried[3:] == [1]  # paid once
    with pytest.raises(OutOfResources):  # one stage that does not fit is a real error
        launch(Kernel(fits_at=0), (1,), (), {"num_stages": 2})

    class Broken(Kernel):
        def __getitem__(self, grid):
            def run(*args, **constexprs):
                raise RuntimeError("not a shared-memory refusal")

            return run

    with pytest.raises(RuntimeError, match="not a shared-memory"):
        launch(Broken(0), (1,), (), {"num_stages": 3})


def test_rotary_tables_made_in_inference_mode_serve_training(device):
    """The cached rotary table is built outside inference mode: an inference call first, then a training
    call of the same shape that saves the table for its backward."""
    from perceiver_kernels import rotary

    rotary._position_tables.clear()
    q, k, v = (torch.randn(1, n, 2, 16, device=device) for n in (4, 8, 8))
    with torch.inference_mode():
        pk.attention(q, k, v, rotary_dim=8, causal=True)
    q.requires_grad_()
    pk.attention(q, k, v, rotary_dim=8, causal=True).sum().backward()
    expected = torch.autograd.grad(pk.attention(q, k, v, rotary_dim=8, causal=True, backend="reference").sum(), q)
    torch.testing.assert_close(q.grad, expected[0], atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("tracing_mode", ["real", "fake"])
def test_make_fx_traces_the_custom_op(tracing_mode, device):
    """``make_fx`` (what ``torch.export`` and AOT tools build on) sees the custom op, not the launchers,
    and a fake trace leaves no fake tensor in the rotary cache for the eager calls after it."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from perceiver_kernels import rotary

    rotary._position_tables.clear()
    q, k, v = (torch.randn(2, n, 2, 16, device=device) for n in (4, 8, 8))
    lengths = torch.tensor([8, 5], device=device)

    def call(q, k, v, lengths):
        return pk.attention(q, k, v, rotary_dim=8, causal=True, kv_lengths=lengths)

    graph = make_fx(call, tracing_mode=tracing_mode)(q, k, v, lengths)
    assert torch.ops.perceiver_kernels.triton_attention_fwd.default in {node.target for node in graph.graph.nodes}
    assert not rotary._position_tables
    torch.testing.assert_close(graph(q, k, v, lengths), call(q, k, v, lengths))


def test_append_to_cache_rejects_negative_lengths_without_checks(no_value_checks):
    """With the checks off, a negative length is an indexing error, not a write into the cache's last rows."""
    k_cache, v_cache = torch.zeros(1, 4, 1, 2), torch.zeros(1, 4, 1, 2)
    with pytest.raises(IndexError):
        pk.append_to_cache(k_cache, v_cache, torch.tensor([-1]), torch.ones(1, 1, 1, 2), torch.ones(1, 1, 1, 2))
    assert not k_cache.any()
