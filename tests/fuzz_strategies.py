"""Hypothesis strategies over the whole ``pk.attention`` contract (tests/test_fuzz.py and the CUDA emulation's fuzz
test), and the example budget: ``PERCEIVER_KERNELS_FUZZ=long`` runs the long profile (before a release, on a GPU),
the default is CI's.

An example is an ``AttentionCase`` (perceiver_kernels.testing: batch, broadcast query, Nq, Nk from 0, head dims
from 1, Dqk != Dv, causal, padding with a whole sample padded, kv_lengths from 0 to Nk, a permuted layout,
rotary in both layouts with default, left-padded or large random positions, prefix dropout as kv_index), a dtype,
forced key splits and a torch seed for the tensors; a failure prints all four, so it can be replayed, and is kept
as an ``@example`` of the test."""

import os

import torch
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from perceiver_kernels.testing import AttentionCase

LONG = os.environ.get("PERCEIVER_KERNELS_FUZZ") == "long"
EXAMPLES = 2000 if LONG else 200
MAX_HEAD_DIM = 300 if LONG else 72  # the interpreter's cost grows with the padded head dim; the long profile goes wide
MAX_HEADS = 3 if LONG else 2  # and with batch x heads (programs); two heads already test the head strides

FUZZ_SETTINGS = settings(
    max_examples=EXAMPLES, deadline=None, derandomize=not LONG, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
FUZZ_SETTINGS_PER_DTYPE = settings(FUZZ_SETTINGS, max_examples=EXAMPLES // 2)  # a backend fuzzed per dtype, in halves


@st.composite
def cases(draw, max_head_dim: int = MAX_HEAD_DIM, max_keys: int = 48) -> AttentionCase:
    batch = draw(st.integers(1, 3))
    nq = draw(st.integers(1, 20))
    nk = draw(st.integers(0, max_keys))
    dqk = draw(st.integers(1, max_head_dim))
    dv = draw(st.one_of(st.just(dqk), st.integers(1, max_head_dim)))
    ar = nk >= nq and draw(st.booleans())  # Perceiver AR features need the latents among the keys
    rotary_dim = 2 * draw(st.integers(1, dqk // 2)) if ar and dqk >= 2 and draw(st.booleans()) else 0
    positions = draw(st.sampled_from(["default", "left-pad", "random"])) if rotary_dim else "default"
    prefix_dropout = ar and nk > nq and draw(st.booleans())
    kv_lengths = None
    if not prefix_dropout and draw(st.booleans()):
        kv_lengths = tuple(draw(st.lists(st.integers(0, nk), min_size=batch, max_size=batch)))
    return AttentionCase(
        batch=batch, q_batch=draw(st.sampled_from([None, 1])), nq=nq, nk=nk, heads=draw(st.integers(1, MAX_HEADS)),
        dqk=dqk, dv=dv, causal=draw(st.booleans()), pad_fraction=draw(st.sampled_from([0.0, 0.3])),
        all_padded_sample=draw(st.booleans()), kv_lengths=kv_lengths, permuted=draw(st.booleans()),
        rotary_dim=rotary_dim, rotary_interleaved=draw(st.booleans()), positions=positions,
        prefix_dropout=prefix_dropout,
    )  # fmt: skip


dtypes = st.sampled_from([torch.float32, torch.float16])
splits = st.sampled_from([0, 1, 3])
seeds = st.integers(0, 2**31 - 1)


def failures(results: dict) -> dict:
    return {n: f"err {c.max_abs_error:.2e} > limit {c.limit:.2e}" for n, c in results.items() if not c.ok}
