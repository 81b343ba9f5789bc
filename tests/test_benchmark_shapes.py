"""The benchmark FLOP and byte models: visible (query, key) pairs follow the reference's mask."""

import pytest
import torch

from perceiver_kernels.bench.shapes import PERCEIVER_SUITE, QUICK_SUITE, SHAPES, Shape
from perceiver_kernels.reference import visible_keys


def reference_pairs(shape: Shape) -> int:
    pad, index = shape.key_padding_mask(), shape.kv_index()
    if pad is not None and index is not None:
        pad = pad.gather(1, index)  # padding follows the gathered rows
    mask = visible_keys(
        shape.batch,
        shape.nq,
        shape.nk_attended,
        causal=shape.causal,
        key_padding_mask=pad,
        kv_lengths=shape.kv_lengths(),
        device="cpu",
    )
    return int(mask.expand(shape.batch, 1, shape.nq, shape.nk_attended).sum())


@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 9), (5, 9), (9, 9), (12, 9), (64, 1000)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("pad_fraction,lengths", [(0.0, False), (0.3, False), (0.0, True), (0.25, True)])
def test_visible_pairs_match_the_reference_mask(nq, nk, causal, pad_fraction, lengths):
    shape = Shape("t", 3, 1, nq, nk, 8, 8, causal=causal, pad_fraction=pad_fraction, per_sample_lengths=lengths)
    assert shape.visible_pairs() == reference_pairs(shape)


@pytest.mark.parametrize("left_pad,prefix_dropout", [(0.3, 0.0), (0.0, 0.5), (0.25, 0.5)])
def test_perceiver_ar_pairs(left_pad, prefix_dropout):
    shape = Shape("t", 3, 1, 16, 100, 8, 8, causal=True, rotary_dim=4, left_pad=left_pad, prefix_dropout=prefix_dropout)
    assert shape.visible_pairs() == reference_pairs(shape)
    if prefix_dropout:
        index = shape.kv_index()
        assert index.shape == (3, 84 - int(0.5 * 84) + 16) and (index.diff(dim=1) > 0).all()
        assert index[:, -16:].tolist() == [list(range(84, 100))] * 3  # every latent row is kept
    if left_pad:
        q_positions, k_positions = shape.positions()
        most = shape.left_padding()[2]  # the last sample is padded most; its first real key is at 0
        assert k_positions[0].tolist() == list(range(100)) and k_positions[2, : most + 1].eq(0).all()
        assert k_positions[2, most + 1] == 1 and shape.key_padding_mask()[2].sum() == most
        assert q_positions.tolist() == k_positions[:, 84:].tolist()


@pytest.mark.parametrize(
    "shape", [s for s in PERCEIVER_SUITE + QUICK_SUITE if s.batch * s.nq * s.nk <= 2**25], ids=lambda s: s.name
)
def test_suite_shapes_count_exactly(shape):
    assert shape.visible_pairs() == reference_pairs(shape)


def test_masks_are_deterministic_and_exact():
    shape = SHAPES["io-padded"]
    pad = shape.key_padding_mask()
    assert torch.equal(pad, shape.key_padding_mask())
    assert pad.sum(dim=1).tolist() == [round(0.3 * 8192)] * 4  # exactly 30% of every sample's keys
    assert not torch.equal(pad[0], pad[1])  # at different positions per sample
    lengths = SHAPES["decode"].kv_lengths()
    assert lengths[0] == 32768 and lengths[-1] >= 32768 // 2 and (lengths.diff() < 0).all()


def test_flops_formula():
    shape = SHAPES["mlm-qk-v"]  # B32 H8 256x2048, Dqk 32, Dv 160, not causal
    forward = 2 * 32 * 8 * 256 * 2048 * (32 + 160)
    assert shape.flops("fwd") == forward
    assert shape.flops("fwd+bwd") == 3.5 * forward
    ar_cross = SHAPES["ar-cross"]  # 1024 latents over 8192 keys, bottom-right causal
    assert ar_cross.visible_pairs() == 4 * sum(8192 - 1024 + i + 1 for i in range(1024))
    padded = SHAPES["io-padded"]  # only the kept keys count
    assert padded.flops("fwd") == 2 * 8 * 4 * 512 * (8192 - round(0.3 * 8192)) * 128
    with pytest.raises(ValueError, match="mode"):
        shape.flops("bwd")


def test_bytes_formula():
    # B2 H3, 5 queries over 7 keys, Dqk 4, Dv 6, 2-byte elements.
    shape = Shape("t", 2, 3, 5, 7, 4, 6)
    q, k, v, out, lse = 2 * 3 * 5 * 4, 2 * 3 * 7 * 4, 2 * 3 * 7 * 6, 2 * 3 * 5 * 6, 2 * 3 * 5
    forward = 2 * (q + k + v + out) + 4 * lse
    assert shape.bytes("fwd", 2) == forward
    # backward: read q, k, v, out, dout, lse; write dq, dk, dv
    assert shape.bytes("fwd+bwd", 2) == forward + 2 * (q + k + v + 2 * out + q + k + v) + 4 * lse
    # kv_lengths: the forward reads only the rows inside each sample's length, plus the lengths.
    cache = Shape("c", 2, 1, 1, 8, 4, 4, causal=True, per_sample_lengths=True)  # lengths 8 and 4
    assert cache.kv_lengths().tolist() == [8, 4]
    assert cache.bytes("fwd", 2) == 2 * (2 * 4 + 12 * 8 + 2 * 4) + 4 * 2 + 8 * 2


def test_suites():
    assert [s.name for s in PERCEIVER_SUITE] == [
        "io-encoder",
        "io-large-input",
        "io-batch",
        "io-padded",
        "mlm-qk-v",
        "io-imagenet",
        "flow-decoder",
        "ar-cross",
        "ar-self",
        "ar-d128",
        "decode",
        "ar-cross-rotary",
        "ar-cross-prefix-dropout",
        "decode-rotary",
    ]
    assert len(SHAPES) == len(PERCEIVER_SUITE) + len(QUICK_SUITE)  # names are unique
    assert SHAPES["decode"].modes == ("fwd",) and SHAPES["ar-cross"].modes == ("fwd", "fwd+bwd")
    with pytest.raises(ValueError, match="pad_fraction"):
        Shape("bad", 1, 1, 1, 1, 1, 1, pad_fraction=1.0)
