"""Perceiver AR pieces around the attention kernels: the rotary math, pk.apply_rotary, default
positions, the KV cache helper (decoding equals a full forward), and argument validation."""

import pytest
import torch

import perceiver_kernels as pk
from perceiver_kernels.rotary import default_positions, rotary_tables, rotate


def perceiver_io_rotary(x, positions, rotate_dim):
    """A direct transcription of perceiver-io's FrequencyPositionEncoding + RotaryPositionEmbedding:
    inverse frequencies 1 / 10000^(2i/d), each frequency repeated for its channel pair, and
    t * cos + rotate_half(t) * sin on the first rotate_dim channels, rotate_half(x1, x2) = (-x2, x1)."""
    inv_freq = 1.0 / (10000 ** (torch.arange(0, rotate_dim, 2).float() / rotate_dim))
    freqs = positions.float()[..., None] * inv_freq  # (b, n, d/2)
    enc = freqs.repeat_interleave(2, dim=-1)[:, :, None, :]  # (b, n, 1, d): f0 f0 f1 f1 ...
    t_rot, t_pass = x[..., :rotate_dim], x[..., rotate_dim:]
    pairs = t_rot.unflatten(-1, (-1, 2))
    half = torch.stack((-pairs[..., 1], pairs[..., 0]), dim=-1).flatten(-2)
    return torch.cat((t_rot * enc.cos() + half * enc.sin(), t_pass), dim=-1)


@pytest.mark.parametrize("rotary_dim", [2, 16, 32])
def test_rotary_matches_perceiver_io(rotary_dim):
    x = torch.randn(2, 11, 3, 32)
    positions = (torch.arange(11)[None, :] - torch.tensor([[0], [4]])).clamp(min=0)  # left padding
    cos, sin = rotary_tables(positions, rotary_dim, 10000.0)
    torch.testing.assert_close(rotate(x, cos, sin, rotary_dim, True), perceiver_io_rotary(x, positions, rotary_dim))


def test_neox_layout_pairs_halves():
    x = torch.randn(1, 5, 1, 8)
    positions = torch.arange(5)[None, :]
    cos, sin = rotary_tables(positions, 8, 10000.0)
    # NeoX pairs (i, i + 4) are interleaved pairs (2i, 2i + 1) after moving the channels.
    perm = torch.tensor([0, 4, 1, 5, 2, 6, 3, 7])
    expected = rotate(x[..., perm], cos, sin, 8, True)[..., perm.argsort()]
    torch.testing.assert_close(rotate(x, cos, sin, 8, False), expected)


def test_inverse_rotation_undoes_rotation():
    x = torch.randn(2, 7, 2, 16, dtype=torch.float64)
    cos, sin = rotary_tables(torch.randint(0, 1000, (2, 7)), 12, 500.0)
    for interleaved in (True, False):
        there = rotate(x, cos, sin, 12, interleaved)
        torch.testing.assert_close(rotate(there, cos, sin, 12, interleaved, inverse=True), x)


@pytest.mark.parametrize("interleaved", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_apply_rotary_kernel_matches_reference(interleaved, dtype, device):
    x = torch.randn(3, 19, 2, 40, device=device).to(dtype).requires_grad_()
    positions = torch.randint(0, 5000, (3, 19), device=device)
    out = pk.apply_rotary(x, positions, 24, base=500.0, interleaved=interleaved, backend="triton")
    ref = pk.apply_rotary(x, positions, 24, base=500.0, interleaved=interleaved, backend="reference")
    assert out.dtype == dtype and out.shape == x.shape
    torch.testing.assert_close(out, ref, rtol=0, atol=torch.finfo(dtype).eps * 4 * ref.abs().max().item())
    grad = torch.randn_like(out)
    (g_out,) = torch.autograd.grad((out.float() * grad.float()).sum(), x)
    (g_ref,) = torch.autograd.grad((ref.float() * grad.float()).sum(), x)
    torch.testing.assert_close(g_out, g_ref, rtol=0, atol=torch.finfo(dtype).eps * 4 * g_ref.abs().max().item())


def test_apply_rotary_gradcheck_and_opcheck(device):
    x = torch.randn(2, 5, 1, 8, device=device, dtype=torch.float64 if device.type == "cpu" else torch.float32)
    positions = torch.tensor([[3, 4, 5, 6, 7]], device=device)
    if device.type == "cpu":
        assert torch.autograd.gradcheck(
            lambda t: pk.apply_rotary(t, positions, 6, backend="triton"), (x.requires_grad_(),)
        )
    from torch.library import opcheck

    table = torch.stack(rotary_tables(positions, 6, 10000.0))
    opcheck(torch.ops.perceiver_kernels.rotary.default, (x.detach().float(), table, 6, True, False))


def test_default_positions_put_queries_last():
    q_pos, k_pos = default_positions(2, 3, 10, None, "cpu")
    assert q_pos.tolist() == [[7, 8, 9]] and k_pos.tolist() == [list(range(10))]
    q_pos, _ = default_positions(2, 3, 10, torch.tensor([10, 4]), "cpu")  # a cache filled to 10 and 4
    assert q_pos.tolist() == [[7, 8, 9], [1, 2, 3]]


def test_explicit_default_positions_change_nothing(device):
    q, k, v = (torch.randn(2, n, 2, 16, device=device) for n in (5, 30, 30))
    out = pk.attention(q, k, v, causal=True, rotary_dim=8, backend="triton")
    positions = dict(
        q_positions=torch.arange(25, 30, device=device)[None], k_positions=torch.arange(30, device=device)[None]
    )
    torch.testing.assert_close(out, pk.attention(q, k, v, causal=True, rotary_dim=8, backend="triton", **positions))


def test_prefix_dropout_keeps_positions(device):
    """Attending to gathered rows = attending to the gathered tensors with their original positions."""
    q, k, v = (torch.randn(2, n, 2, 16, device=device) for n in (4, 20, 20))
    kv_index = torch.tensor([[0, 3, 7, 9, 16, 17, 18, 19], [2, 4, 5, 11, 16, 17, 18, 19]], device=device)
    out = pk.attention(q, k, v, causal=True, rotary_dim=8, kv_index=kv_index, backend="triton")
    rows = kv_index[:, :, None, None].expand(-1, -1, 2, 16)
    k_pos = kv_index  # each kept key keeps its own position
    q_pos = torch.arange(16, 20, device=device)[None]  # the latents are still the last 4 of 20
    ref = pk.attention(
        q, k.gather(1, rows), v.gather(1, rows), causal=True, rotary_dim=8, q_positions=q_pos, k_positions=k_pos,
        backend="reference",
    )  # fmt: skip
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)


def test_decoding_with_the_cache_equals_a_full_forward(device):
    """Prefill different prompt lengths, then decode one token at a time into a preallocated cache."""
    batch, heads, dim, capacity, total = 3, 2, 16, 48, 20
    k_all, v_all, q_all = (torch.randn(batch, total, heads, dim, device=device) for _ in range(3))
    k_cache = torch.zeros(batch, capacity, heads, dim, device=device)
    v_cache = torch.zeros_like(k_cache)
    prompt = torch.tensor([6, 1, 9], device=device)
    lengths = torch.zeros(batch, dtype=torch.int64, device=device)
    for b in range(batch):  # prefill each sample's prompt (lengths differ per sample)
        one = torch.tensor([0], device=device)
        n = int(prompt[b])
        sub = pk.append_to_cache(
            k_cache[b : b + 1], v_cache[b : b + 1], one, k_all[b : b + 1, :n], v_all[b : b + 1, :n]
        )
        lengths[b] = sub[0]
    for _ in range(6):
        step = lengths.clone()  # the position of the token decoded now, per sample
        rows = step[:, None, None, None].expand(-1, 1, heads, dim)
        lengths = pk.append_to_cache(k_cache, v_cache, lengths, k_all.gather(1, rows), v_all.gather(1, rows))
        q = q_all.gather(1, rows)
        out = pk.attention(q, k_cache, v_cache, causal=True, kv_lengths=lengths, rotary_dim=8, backend="triton")
        for b in range(batch):
            n = int(lengths[b])
            full = pk.attention(q_all[b : b + 1, :n], k_all[b : b + 1, :n], v_all[b : b + 1, :n], causal=True,
                                rotary_dim=8, backend="reference")  # fmt: skip
            torch.testing.assert_close(out[b, 0], full[0, -1], rtol=1e-4, atol=1e-5)


def test_append_to_cache_checks_capacity():
    k_cache, v_cache = torch.zeros(2, 4, 1, 8), torch.zeros(2, 4, 1, 8)
    new = torch.ones(2, 2, 1, 8)
    lengths = pk.append_to_cache(k_cache, v_cache, torch.tensor([0, 2]), new, new)
    assert lengths.tolist() == [2, 4] and k_cache[1, 2:].eq(1).all() and k_cache[1, :2].eq(0).all()
    with pytest.raises(ValueError, match="holds 4 rows"):
        pk.append_to_cache(k_cache, v_cache, lengths, new, new)
    with pytest.raises(ValueError, match="does not fit"):
        pk.append_to_cache(k_cache, v_cache, lengths, torch.ones(2, 1, 2, 8), torch.ones(2, 1, 2, 8))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(rotary_dim=3), ValueError, "rotary_dim must be even"),
        (dict(rotary_dim=18), ValueError, r"rotary_dim must be even and in \[0, Dqk=16\]"),
        (dict(rotary_dim=2.0), TypeError, "rotary_dim must be an int"),
        (dict(rotary_dim=4, rotary_base=0.0), ValueError, "rotary_base must be positive"),
        (dict(rotary_dim=4, rotary_interleaved=1), TypeError, "rotary_interleaved must be a bool"),
        (dict(q_positions=torch.zeros(2, 5, dtype=torch.long)), ValueError, "rotary_dim is 0"),
        (dict(rotary_dim=4, q_positions=torch.zeros(2, 5)), TypeError, "q_positions must be an int32 or int64"),
        (
            dict(rotary_dim=4, k_positions=torch.zeros(2, 9, dtype=torch.long)),
            ValueError,
            r"k_positions must have shape",
        ),
        (dict(kv_index=torch.zeros(2, 3, dtype=torch.int32)), TypeError, "kv_index must be an int64"),
        (dict(kv_index=torch.zeros(3, dtype=torch.long)), ValueError, r"kv_index must have shape \(B, Nk'\)"),
        (dict(kv_index=torch.tensor([[0, 12], [1, 2]])), ValueError, r"kv_index values must lie in \[0, Nk=12\)"),
        (dict(kv_index=torch.tensor([[0, 2, 2], [1, 2, 3]])), ValueError, "sorted and unique"),
        (dict(kv_index=torch.tensor([[3, 2], [1, 2]])), ValueError, "sorted and unique"),
    ],
)
def test_perceiver_ar_arguments_are_validated(kwargs, error, match):
    q, k, v = torch.randn(2, 5, 2, 16), torch.randn(2, 12, 2, 16), torch.randn(2, 12, 2, 16)
    with pytest.raises(error, match=match):
        pk.attention(q, k, v, backend="reference", **kwargs)


def test_apply_rotary_validation():
    x = torch.randn(2, 5, 1, 8)
    with pytest.raises(ValueError, match=r"rotary_dim must be even and in \[0, D=8\]"):
        pk.apply_rotary(x, torch.zeros(2, 5, dtype=torch.long), 10)
    with pytest.raises(ValueError, match="positions must have shape"):
        pk.apply_rotary(x, torch.zeros(2, 4, dtype=torch.long), 4)
    with pytest.raises(TypeError, match="positions must be an int32 or int64"):
        pk.apply_rotary(x, None, 4)
