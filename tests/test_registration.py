"""torch.library registration: opcheck, float64 gradcheck, torch.compile without graph breaks."""

import pytest
import torch
from torch.library import opcheck

import perceiver_kernels as pk
from perceiver_kernels.kernels.configs import interpreter_enabled
from perceiver_kernels.ops import triton_attention


def small_inputs(device, dtype=torch.float32, q_batch=2, requires_grad=True, heads=2, nq=5, nk=11, dqk=8, dv=4):
    def rand(*shape):
        return torch.randn(*shape, device=device, dtype=dtype, requires_grad=requires_grad)

    q, k, v = rand(q_batch, nq, heads, dqk), rand(2, nk, heads, dqk), rand(2, nk, heads, dv)
    mask = torch.rand(2, nk, device=device) < 0.3
    lengths = torch.tensor([nk, nk - 4], device=device, dtype=torch.int32)
    return q, k, v, mask, lengths


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("q_batch", [1, 2])
def test_opcheck_forward(causal, q_batch, device):
    q, k, v, mask, lengths = small_inputs(device, q_batch=q_batch)
    opcheck(torch.ops.perceiver_kernels.triton_attention_fwd.default, (q, k, v, mask, lengths, causal, 0.3, 0))
    opcheck(torch.ops.perceiver_kernels.triton_attention_fwd.default, (q, k, v, None, None, causal, 0.3, 2))


def test_opcheck_backward(device):
    q, k, v, mask, lengths = small_inputs(device, requires_grad=False)
    out, lse = torch.ops.perceiver_kernels.triton_attention_fwd(q, k, v, mask, lengths, True, 0.3, 0)
    grad_out, grad_lse = torch.randn_like(out), torch.randn_like(lse)
    args = (grad_out, grad_lse, q, k, v, out, lse, mask, lengths, True, 0.3, 0)
    opcheck(torch.ops.perceiver_kernels.triton_attention_bwd.default, args)
    opcheck(torch.ops.perceiver_kernels.triton_attention_bwd.default, (grad_out, None, *args[2:]))


@pytest.mark.skipif(
    not interpreter_enabled(), reason="Triton has no float64 dot on GPUs; float64 runs in the CPU interpreter"
)
@pytest.mark.parametrize("causal", [False, True])
def test_gradcheck_float64(causal):
    """Finite differences through the Triton op, out and lse, in float64 (tiny shapes)."""
    q, k, v, mask, lengths = small_inputs("cpu", dtype=torch.float64, q_batch=1, heads=1, nq=3, nk=7, dqk=4, dv=3)
    mask[:, 0] = False  # keep every sample with at least one key so lse stays finite

    def fn(q, k, v):
        out, lse = triton_attention(
            q, k, v, causal=causal, key_padding_mask=mask, kv_lengths=lengths, scale=0.4, num_splits=2
        )
        return out, torch.where(torch.isfinite(lse), lse, 0.0)

    assert torch.autograd.gradcheck(fn, (q, k, v), atol=1e-6, rtol=1e-5)


def test_torch_compile_fullgraph(device):
    q, k, v, mask, _ = small_inputs(device)

    def step(q, k, v, mask):
        out = pk.attention(q, k, v, causal=True, key_padding_mask=mask)
        return (out.float() ** 2).sum()

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
