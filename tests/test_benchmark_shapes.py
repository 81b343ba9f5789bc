"""The benchmark FLOP model: visible (query, key) pairs follow the bottom-right causal mask."""

import pytest

from benchmarks.shapes import PERCEIVER_SUITE, SHAPES, Shape
from perceiver_kernels.reference import visible_keys


@pytest.mark.parametrize("nq,nk", [(1, 1), (1, 9), (5, 9), (9, 9), (12, 9), (64, 1000)])
@pytest.mark.parametrize("causal", [False, True])
def test_visible_pairs_match_the_reference_mask(nq, nk, causal):
    shape = Shape("t", batch=1, heads=1, nq=nq, nk=nk, dqk=8, dv=8, causal=causal)
    mask = visible_keys(1, nq, nk, causal=causal, key_padding_mask=None, kv_lengths=None, device="cpu")
    assert shape.visible_pairs() == int(mask.sum())


def test_flops_formula():
    shape = SHAPES["mlm-qk-v"]  # B32 H8 256x2048, Dqk 32, Dv 160, not causal
    forward = 2 * 32 * 8 * 256 * 2048 * (32 + 160)
    assert shape.flops("fwd") == forward
    assert shape.flops("fwd+bwd") == 3.5 * forward
    ar_cross = SHAPES["ar-cross"]  # 1024 latents over 8192 keys, bottom-right causal
    assert ar_cross.visible_pairs() == sum(8192 - 1024 + i + 1 for i in range(1024))


def test_suite_names_are_unique():
    assert len(SHAPES) == len(PERCEIVER_SUITE) == 11
