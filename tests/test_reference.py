"""The reference itself against PyTorch SDPA (float64), and its Perceiver-specific semantics."""

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention.bias import causal_lower_right

from perceiver_kernels import attention_reference
from perceiver_kernels.reference import visible_keys


def to_bhnd(x):
    return x.transpose(1, 2)


@pytest.mark.filterwarnings("ignore:Lower right causal bias:UserWarning")
@pytest.mark.parametrize("nq,nk", [(1, 17), (5, 17), (33, 33), (40, 17)])
@pytest.mark.parametrize("q_batch", [1, 3])
def test_matches_sdpa_causal_lower_right(nq, nk, q_batch):
    q = torch.randn(q_batch, nq, 2, 8, dtype=torch.float64)
    k = torch.randn(3, nk, 2, 8, dtype=torch.float64)
    v = torch.randn(3, nk, 2, 6, dtype=torch.float64)
    for causal in (False, True):
        out = attention_reference(q, k, v, causal=causal)
        mask = causal_lower_right(nq, nk) if causal else None
        expected = F.scaled_dot_product_attention(
            to_bhnd(q.expand(3, -1, -1, -1)), to_bhnd(k), to_bhnd(v), attn_mask=mask
        )
        expected = to_bhnd(expected)
        if causal and nq > nk:
            # Rows with no visible key: SDPA gives NaN, the contract says zeros.
            empty = nq - nk
            assert torch.all(out[:, :empty] == 0)
            out, expected = out[:, empty:], expected[:, empty:]
        torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)


def test_matches_sdpa_with_padding_and_lengths():
    q = torch.randn(3, 7, 2, 8, dtype=torch.float64)
    k = torch.randn(3, 20, 2, 8, dtype=torch.float64)
    v = torch.randn(3, 20, 2, 8, dtype=torch.float64)
    pad = torch.rand(3, 20) < 0.3
    pad[:, 0] = False
    lengths = torch.tensor([20, 9, 13])
    out, lse = attention_reference(q, k, v, key_padding_mask=pad, kv_lengths=lengths, causal=True, return_lse=True)
    visible = visible_keys(3, 7, 20, causal=True, key_padding_mask=pad, kv_lengths=lengths, device=q.device)
    expected = F.scaled_dot_product_attention(to_bhnd(q), to_bhnd(k), to_bhnd(v), attn_mask=visible)
    torch.testing.assert_close(out, to_bhnd(expected), rtol=1e-12, atol=1e-12)
    scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * 8**-0.5
    expected_lse = scores.masked_fill(~visible, float("-inf")).logsumexp(-1)
    torch.testing.assert_close(lse, expected_lse, rtol=1e-12, atol=1e-12)


def test_causal_is_bottom_right_aligned_per_sample():
    # Query i of sample b sees key j iff j <= i + kv_lengths[b] - Nq.
    visible = visible_keys(2, 3, 6, causal=True, key_padding_mask=None, kv_lengths=torch.tensor([6, 4]), device="cpu")
    assert visible.shape == (2, 1, 3, 6)
    expected_first = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    expected_second = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0]], dtype=torch.bool)
    assert torch.equal(visible[0, 0], expected_first)
    assert torch.equal(visible[1, 0], expected_second)


def test_rows_without_keys_give_zeros_and_zero_gradients():
    q = torch.randn(2, 4, 1, 8, requires_grad=True)
    k = torch.randn(2, 6, 1, 8, requires_grad=True)
    v = torch.randn(2, 6, 1, 8, requires_grad=True)
    pad = torch.zeros(2, 6, dtype=torch.bool)
    pad[1] = True
    out, lse = attention_reference(q, k, v, key_padding_mask=pad, return_lse=True)
    assert torch.all(out[1] == 0) and torch.all(lse[1] == float("-inf"))
    out.sum().backward()
    for t in (q, k, v):
        assert torch.isfinite(t.grad).all()
    assert torch.all(q.grad[1] == 0) and torch.all(k.grad[1] == 0)


def test_broadcast_query_gradient_is_summed_over_batch():
    q = torch.randn(1, 4, 2, 8, dtype=torch.float64, requires_grad=True)
    k, v = torch.randn(3, 6, 2, 8, dtype=torch.float64), torch.randn(3, 6, 2, 8, dtype=torch.float64)
    attention_reference(q, k, v).sum().backward()
    expected = torch.zeros_like(q)
    for b in range(3):
        qb = q.detach().clone().requires_grad_()
        attention_reference(qb, k[b : b + 1], v[b : b + 1]).sum().backward()
        expected += qb.grad
    torch.testing.assert_close(q.grad, expected)
