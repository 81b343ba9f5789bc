"""torch.library registration: opcheck, float64 gradcheck, torch.compile without graph breaks."""

import pytest
import torch
from torch.library import opcheck

import perceiver_kernels as pk
from perceiver_kernels.kernels.configs import interpreter_enabled
from perceiver_kernels.ops import triton_attention
from perceiver_kernels.testing import backend_fn


def small_inputs(device, dtype=torch.float32, q_batch=2, requires_grad=True, heads=2, nq=5, nk=11, dqk=8, dv=4):
    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=requires_grad)

    q, k, v = rand(q_batch, nq, heads, dqk), rand(2, nk, heads, dqk), rand(2, nk, heads, dv)
    mask = torch.rand(2, nk, device=device) < 0.3
    lengths = torch.tensor([nk, nk - 4], device=device, dtype=torch.int32)
    return q, k, v, mask, lengths


def ar_args(device, q, k, nk=11, rotary_dim=4):
    """kv_index (every other key row), q/k rotary tables and the rotary settings, as the op takes them."""
    from perceiver_kernels.rotary import default_positions, rotary_tables

    kv_index = torch.arange(0, nk, 2, device=device).expand(2, -1).contiguous()
    q_pos, k_pos = default_positions(2, q.shape[1], nk, None, device)
    q_rope, k_rope = (torch.stack(rotary_tables(p, rotary_dim, 10000.0)) for p in (q_pos, k_pos))
    return kv_index, q_rope, k_rope, rotary_dim, True


NO_AR = (None, None, None, 0, True)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_batch", [1, 2])
def test_opcheck_forward(causal, q_batch, device):
    q, k, v, mask, lengths = small_inputs(device, q_batch=q_batch)
    fwd = torch.ops.perceiver_kernels.triton_attention_fwd.default
    opcheck(fwd, (q, k, v, mask, lengths, *NO_AR, causal, 0.3, 0))
    opcheck(fwd, (q, k, v, None, None, *NO_AR, causal, 0.3, 2))
    kv_index, q_rope, k_rope, rotary_dim, interleaved = ar_args(device, q, k)
    opcheck(fwd, (q, k, v, mask, None, kv_index, q_rope, k_rope, rotary_dim, interleaved, causal, 0.3, 0))


@pytest.mark.parametrize("perceiver_ar", [False, True])
def test_opcheck_backward(perceiver_ar, device):
    q, k, v, mask, lengths = small_inputs(device, requires_grad=False)
    ar = ar_args(device, q, k) if perceiver_ar else NO_AR
    if perceiver_ar:
        lengths = torch.tensor([6, 3], device=device, dtype=torch.int32)  # on the gathered axis
    out, lse = torch.ops.perceiver_kernels.triton_attention_fwd(q, k, v, mask, lengths, *ar, True, 0.3, 0)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    args = (grad_out, grad_lse, q, k, v, out, lse, mask, lengths, *ar, True, 0.3, 0)
    opcheck(torch.ops.perceiver_kernels.triton_attention_bwd.default, args)
    opcheck(torch.ops.perceiver_kernels.triton_attention_bwd.default, (grad_out, None, *args[2:]))


@pytest.mark.skipif(
    not interpreter_enabled(), reason="Triton has no float64 dot on GPUs; float64 runs in the CPU interpreter"
)
def gradcheck(fn, inputs, request) -> bool:
    """float64 finite differences. In CI, PyTorch's fast mode (one random projection of the Jacobian, uJv,
    against its finite difference: a wrong gradient fails it but with probability ~0, at a few forward calls
    instead of two per input element); every element with --run-slow."""
    fast = not request.config.getoption("--run-slow")
    return torch.autograd.gradcheck(fn, inputs, atol=1e-6, rtol=1e-5, fast_mode=fast)


@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(causal, request):
    """Finite differences through the Triton op, out and lse, in float64 (tiny shapes)."""
    q, k, v, mask, lengths = small_inputs("cpu", dtype=torch.float64, q_batch=1, heads=1, nq=3, nk=7, dqk=4, dv=3)
    mask[:, 0] = False  # keep every sample with at least one key so lse stays finite

    def fn(q, k, v):
        out, lse = backend_fn(triton_attention, num_splits=2, scale=0.4)(
            q, k, v, causal=causal, key_padding_mask=mask, kv_lengths=lengths
        )
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    assert gradcheck(fn, (q, k, v), request)


@pytest.mark.skipif(
    not interpreter_enabled(), reason="Triton has no float64 dot on GPUs; float64 runs in the CPU interpreter"
)
@pytest.mark.parametrize("interleaved", [True, False])
def test_gradcheck_float64_rotary_and_gather(interleaved, request):
    """Finite differences through fused rotary (partial, per-sample positions) and a kv_index gather."""
    q, k, v, mask, _ = small_inputs("cpu", dtype=torch.float64, heads=1, nq=3, nk=9, dqk=6, dv=3)
    q_positions = torch.tensor([[5, 6, 7], [2, 3, 4]])
    k_positions = torch.tensor([list(range(9)), [0, 0, 0, 1, 2, 3, 4, 5, 6]])  # sample 1 left-padded
    kv_index = torch.tensor([[0, 2, 3, 5, 8], [1, 4, 6, 7, 8]])
    mask[:, -1] = False  # every sample keeps a visible key

    def fn(q, k, v):
        out, lse = pk.attention(
            q, k, v, causal=True, key_padding_mask=mask, backend="triton", return_lse=True, rotary_dim=4,
            q_positions=q_positions, k_positions=k_positions, rotary_interleaved=interleaved, kv_index=kv_index,
        )  # fmt: skip
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    assert gradcheck(fn, (q, k, v), request)


def test_torch_compile_fullgraph(device):
    q, k, v, mask, _ = small_inputs(device)

    kv_index = torch.arange(0, 11, 2, device=device).expand(2, -1)

    def step(q, k, v, mask):
        out = pk.attention(q, k, v, causal=True, key_padding_mask=mask)
        ar = pk.attention(q, k, v, causal=True, key_padding_mask=mask, rotary_dim=4, kv_index=kv_index)
        return (out.float() ** 2).sum() + (ar.float() ** 3).sum()

    eager_loss = step(q, k, v, mask)
    eager_grads = torch.autograd.grad(eager_loss, (q, k, v))
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager" if device.type == "cpu" else "inductor")
    loss = compiled(q, k, v, mask)
    grads = torch.autograd.grad(loss, (q, k, v))
    torch.testing.assert_close(loss, eager_loss)
    for got, expected in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, expected)


def test_ops_are_registered_in_namespace():
    for name in ("triton_attention_fwd", "triton_attention_bwd"):
        assert hasattr(torch.ops.perceiver_kernels, name)
