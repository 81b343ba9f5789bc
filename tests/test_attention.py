"""The Triton backend against the float64 reference: forward, lse and all three gradients."""

import functools
import itertools
from dataclasses import replace

import pytest
import torch

import perceiver_kernels as pk
from perceiver_kernels.ops import triton_attention
from perceiver_kernels.testing import (
    AR_CASES,
    FEATURE_CASES,
    AttentionCase,
    backend_fn,
    check_case,
    compare,
    far_apart_inputs,
    far_rows_inputs,
    forward_backward,
    make_inputs,
)

# float32 and float16 run everywhere; the interpreter cannot do bfloat16 dots, so bfloat16 is GPU-only.
DTYPES = [
    pytest.param(torch.float32, id="float32"),
    pytest.param(torch.float16, id="float16"),
    pytest.param(torch.bfloat16, id="bfloat16", marks=pytest.mark.gpu),
]


def triton_fn(num_splits: int = 0):
    return backend_fn(triton_attention, num_splits)


def assert_case(case: AttentionCase, dtype, device, num_splits: int = 0):
    results = check_case(case, dtype, device, triton_fn(num_splits))
    failed = {n: f"err {c.max_abs_error:.2e} > limit {c.limit:.2e}" for n, c in results.items() if not c.ok}
    assert not failed, f"{case.describe()} {dtype}: {failed}"


@pytest.mark.dtypes_in_turn
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize(
    "nq,nk",
    [
        # 100 x 300 adds nothing the other sizes do not cover (several query and key blocks, partial
        # blocks), at a minute of interpreter time: an exhaustive profile, run with --run-slow.
        pytest.param(nq, nk, marks=pytest.mark.slow) if (nq, nk) == (100, 300) else (nq, nk)
        for nq, nk in itertools.product([1, 5, 33, 100], [1, 17, 129, 300])
    ],
)
def test_lengths_sweep(nq, nk, causal, dtype, device):
    # Odd lengths, Nq < Nk and Nq > Nk; Dqk != Dv, neither a power of two.
    case = AttentionCase(batch=2, nq=nq, nk=nk, heads=3, dqk=24, dv=40, causal=causal)
    assert_case(case, dtype, device)


@pytest.mark.dtypes_in_turn
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(FEATURE_CASES))
def test_features(name, dtype, device):
    assert_case(FEATURE_CASES[name], dtype, device)


@pytest.mark.dtypes_in_turn
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", list(AR_CASES))
def test_perceiver_ar(name, dtype, device):
    assert_case(AR_CASES[name], dtype, device)


@pytest.mark.dtypes_in_turn
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", ["rotary-left-pad", "prefix-dropout-rotary-left-pad", "decode-rotary"])
def test_perceiver_ar_split_kv(name, dtype, device):
    assert_case(AR_CASES[name], dtype, device, num_splits=3)


SPLIT_CASES = {
    "plain": AttentionCase(batch=2, nq=5, nk=300, heads=2),
    "causal-padding": AttentionCase(batch=3, nq=33, nk=129, causal=True, pad_fraction=0.3, all_padded_sample=True),
    "kv-lengths": AttentionCase(batch=4, q_batch=1, nq=1, nk=300, kv_lengths=(0, 300, 150, 7), causal=True),
    "wide-head": AttentionCase(batch=1, nq=5, nk=100, heads=1, dqk=261, dv=261),
}


@pytest.mark.dtypes_in_turn
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_splits", [2, 7])
@pytest.mark.parametrize("name", list(SPLIT_CASES))
def test_forced_split_kv(name, num_splits, dtype, device):
    """Split-KV (the Perceiver cross-attention path on a GPU) forced on small shapes."""
    assert_case(SPLIT_CASES[name], dtype, device, num_splits=num_splits)


def test_more_splits_than_key_blocks(device):
    # The launcher drops splits that would own no key block.
    assert_case(AttentionCase(nq=5, nk=17), torch.float32, device, num_splits=64)


def test_public_api_matches_reference(device):
    case = AttentionCase(batch=2, nq=9, nk=40, causal=True, pad_fraction=0.2)
    inputs = make_inputs(case, torch.float32, device)
    args = dict(causal=True, key_padding_mask=inputs["key_padding_mask"])
    out, lse = pk.attention(inputs["q"], inputs["k"], inputs["v"], **args, backend="triton", return_lse=True)
    ref_out, ref_lse = pk.attention(inputs["q"], inputs["k"], inputs["v"], **args, backend="reference", return_lse=True)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-5)
    assert out.shape == (2, 9, 2, 16) and lse.shape == (2, 2, 9) and lse.dtype == torch.float32


def test_custom_scale(device):
    case = AttentionCase(nq=9, nk=40)

    fn = backend_fn(triton_attention, scale=0.37)

    def ref(q, k, v, **kw):
        return pk.attention_reference(q, k, v, scale=0.37, return_lse=True, **kw)

    inputs = make_inputs(case, torch.float32, device)
    out, _ = fn(inputs["q"], inputs["k"], inputs["v"])
    ref_out, _ = ref(inputs["q"], inputs["k"], inputs["v"])
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)


def test_rows_without_keys_are_zero_and_finite(device):
    """A fully padded sample: zero output, -inf lse, zero (not NaN) gradients."""
    case = FEATURE_CASES["padding-all-padded-sample"]
    inputs = make_inputs(case, torch.float32, device)
    out, lse = backend_fn(triton_attention, scale=0.25)(
        inputs["q"], inputs["k"], inputs["v"], key_padding_mask=inputs["key_padding_mask"]
    )
    assert torch.all(out[0] == 0) and torch.all(lse[0] == float("-inf"))
    out.sum().backward()
    assert torch.all(inputs["k"].grad[0] == 0) and torch.all(inputs["v"].grad[0] == 0)
    assert torch.isfinite(inputs["q"].grad).all()


NO_AR = (None, None, None, 0, True)  # kv_index, q_rope, k_rope, rotary_dim, rotary_interleaved


class _KernelAttention(torch.autograd.Function):
    """The kernel launchers with an explicit backward config, bypassing the op's default."""

    @staticmethod
    def forward(ctx, q, k, v, causal, key_padding_mask, kv_lengths, bwd_config, num_splits):
        from perceiver_kernels.kernels.attention_fwd import attention_forward

        scale = q.shape[-1] ** -0.5
        out, lse = attention_forward(q, k, v, key_padding_mask, kv_lengths, *NO_AR, causal, scale, num_splits)
        ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, kv_lengths)
        ctx.args = (causal, scale, num_splits, bwd_config)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        from perceiver_kernels.kernels.attention_bwd import attention_backward

        q, k, v, out, lse, key_padding_mask, kv_lengths = ctx.saved_tensors
        causal, scale, num_splits, bwd_config = ctx.args
        grads = attention_backward(
            grad_out.contiguous(), grad_lse.contiguous(), q, k, v, out, lse,
            key_padding_mask, kv_lengths, *NO_AR, causal, scale, num_splits, bwd_config,
        )  # fmt: skip
        return (*grads, None, None, None, None, None)


@pytest.mark.dtypes_in_turn
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dq_mode,num_splits", [("atomic", 0), ("split", 1), ("split", 3)])
@pytest.mark.parametrize(
    "name", ["broadcast-query-causal", "kv-lengths-causal", "padding-all-padded-sample", "mlm-32-160"]
)
def test_dq_modes(name, dq_mode, num_splits, dtype, device):
    """Both dQ strategies (atomics in the dK/dV kernel, or a split-KV dQ kernel) are exact."""
    from perceiver_kernels.kernels import configs

    case = FEATURE_CASES[name]
    default = configs.backward_config(case.dqk, case.dv, device.type == "cuda", element_size=dtype.itemsize)
    bwd_config = replace(default, dq_mode=dq_mode)

    def fn(q, k, v, causal, key_padding_mask, kv_lengths):
        return _KernelAttention.apply(q, k, v, causal, key_padding_mask, kv_lengths, bwd_config, num_splits)

    results = check_case(case, dtype, device, fn)
    failed = {n: f"err {c.max_abs_error:.2e} > limit {c.limit:.2e}" for n, c in results.items() if not c.ok}
    assert not failed, f"{case.describe()} {dtype} {dq_mode}: {failed}"


def test_mask_and_lengths_layouts(device):
    """A transposed (non-contiguous) padding mask and int64 kv_lengths give the reference's result."""
    q, k, v = (torch.randn(3, n, 2, 16, device=device) for n in (9, 40, 40))
    mask = (torch.rand(40, 3, device=device) < 0.3).t()  # (B, Nk) view with strides (1, 3)
    lengths = torch.tensor([40, 17, 0], device=device, dtype=torch.int64)
    args = dict(causal=True, key_padding_mask=mask, kv_lengths=lengths, return_lse=True)
    out, lse = pk.attention(q, k, v, backend="triton", **args)
    ref_out, ref_lse = pk.attention(q, k, v, backend="reference", **args)
    torch.testing.assert_close(out, ref_out, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_non_finite_lse_gradient_of_empty_rows_is_ignored(backend, device):
    """A row with no visible key has lse = -inf; a NaN gradient flowing into it (e.g. from a logsumexp
    merge of all -inf partials) must not leak into dK/dV/dQ of the other rows."""
    dtype = torch.float16 if backend == "cuda" else torch.float32
    q, k, v = (torch.randn(2, 16, 2, 32, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    mask = torch.zeros(2, 16, dtype=torch.bool, device=device)
    mask[0] = True  # sample 0 sees no key: its lse is -inf
    out, lse = pk.attention(q, k, v, key_padding_mask=mask, return_lse=True, backend=backend)
    grad_out = torch.randn_like(out)
    grad_lse = torch.randn_like(lse)
    grad_lse[0] = float("nan")
    grads = torch.autograd.grad((out, lse), (q, k, v), (grad_out, grad_lse), retain_graph=True)
    clean = grad_lse.clone()
    clean[0] = 0.0
    expected = torch.autograd.grad((out, lse), (q, k, v), (grad_out, clean))
    for got, want in zip(grads, expected, strict=True):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, want)


GARBAGE_CASES = {
    "causal-split-kv": dict(nk=70, dqk=16, dv=24, causal=True, num_splits=3),
    "kv-lengths": dict(nk=70, dqk=16, dv=24, causal=True, kv_lengths=[50, 17]),  # an uninitialised cache's tail
    "rotary-gather": dict(nk=37, dqk=16, dv=24, causal=True, rotary_dim=8, kv_index=True),
    "wide-head": dict(nk=40, dqk=261, dv=261),  # head-dim chunks: scores, dV and dQ (atomics) chunk by chunk
}


def ignored_rows(case: dict, mask, device):
    """``(B, Nk)``: rows the call must ignore (padded, past kv_lengths, not gathered), and the call's options."""
    nk = case["nk"]
    options = dict(key_padding_mask=mask, causal=case.get("causal", False), rotary_dim=case.get("rotary_dim", 0))
    ignored = mask.clone()
    if "kv_lengths" in case:
        options["kv_lengths"] = torch.tensor(case["kv_lengths"], device=device)
        ignored |= torch.arange(nk, device=device)[None] >= options["kv_lengths"][:, None]
    if case.get("kv_index"):
        options["kv_index"] = torch.arange(0, nk, 2, device=device).expand(2, -1).contiguous()
        ignored[:, 1::2] = True  # rows not gathered
    return ignored, options


@pytest.mark.dtypes_in_turn
@pytest.mark.parametrize("dtype", DTYPES[:2])
@pytest.mark.parametrize("name", list(GARBAGE_CASES))
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_nan_and_inf_in_ignored_rows_are_ignored(backend, name, dtype, device):
    """Rows the call ignores (keys marked padded, rows past kv_lengths, rows kv_index leaves out) may hold anything
    (an uninitialised buffer): NaN and Inf there leave the output, the lse and every gradient bitwise equal to
    those of clean inputs, and the ignored rows' gradients zero. (A masked probability of 0 times a NaN value would
    otherwise spread NaN over the whole sample.)"""
    case = GARBAGE_CASES[name]
    nk = case["nk"]
    q = torch.randn(2, 5, 2, case["dqk"], device=device, dtype=dtype)
    k = torch.randn(2, nk, 2, case["dqk"], device=device, dtype=dtype)
    v = torch.randn(2, nk, 2, case["dv"], device=device, dtype=dtype)
    mask = torch.zeros(2, nk, dtype=torch.bool, device=device)
    mask[0, 3:9] = True
    mask[1, nk - 6 :] = True  # the end of sample 1, where its causal diagonal sits
    ignored, options = ignored_rows(case, mask, device)
    dirty_k, dirty_v = k.clone(), v.clone()
    dirty_k[ignored], dirty_v[ignored] = float("nan"), float("inf")
    dirty_k[0, 4, 1], dirty_v[0, 5, 0] = float("-inf"), float("nan")
    if backend == "triton":
        fn = backend_fn(triton_attention, case.get("num_splits", 0))
    else:
        fn = functools.partial(pk.attention, backend="reference", return_lse=True)
    results = [forward_backward(fn, q, keys, values, **options) for keys, values in ((k, v), (dirty_k, dirty_v))]
    for what, clean, dirty in zip(("out", "lse", "dq", "dk", "dv"), *results, strict=True):
        assert torch.equal(clean, dirty), f"{what} changed by garbage in ignored rows"
    assert not results[1][3][ignored].any() and not results[1][4][ignored].any()


def test_nan_in_a_visible_key_still_propagates(device):
    """Only ignored memory is ignored: a NaN in a key that is attended to reaches the output."""
    q, k, v = (
        torch.randn(1, 3, 1, 16, device=device),
        torch.randn(1, 9, 1, 16, device=device),
        torch.randn(1, 9, 1, 16, device=device),
    )
    v[0, 2, 0, 0] = float("nan")
    out = pk.attention(q, k, v, backend="triton", key_padding_mask=torch.zeros(1, 9, dtype=torch.bool, device=device))
    assert torch.isnan(out[..., 0]).all()


@pytest.mark.parametrize("num_splits", [1, 3])
def test_samples_more_than_2_31_elements_apart(num_splits, device):
    """64-bit offsets: k and v's second sample sits past 2**31 elements (a 4 GiB virtual storage, only the viewed
    rows touched). Forward and every gradient equal, bitwise, those of the same values laid out contiguously."""
    q, k, v = far_apart_inputs(torch.float16)
    mask = torch.zeros(2, k.shape[1], dtype=torch.bool)
    mask[1, 5:9] = True
    near = [t.detach().contiguous() for t in (q, k, v)]
    results = [forward_backward(triton_fn(num_splits), *inputs, causal=True, key_padding_mask=mask)
               for inputs in ((q, k, v), near)]  # fmt: skip
    for what, far, near in zip(("out", "lse", "dq", "dk", "dv"), *results, strict=True):
        assert torch.equal(far, near), f"{what} differs when the samples are 2**31 elements apart"


def test_gathered_rows_more_than_2_31_elements_in(device):
    """64-bit row offsets: kv_index gathers key rows past 2**31 elements (row stride 32: small, so only a 64-bit
    row x stride product reaches them). The forward equals, bitwise, attention over the gathered rows copied. (No
    backward: dk and dv would be as large as k and v, 2 GiB each.)"""
    q, k, v, kv_index = far_rows_inputs(torch.float16)
    near_k, near_v = (t[:, kv_index[0]].contiguous() for t in (k, v))
    with torch.no_grad():
        far = triton_fn()(q, k, v, causal=True, kv_index=kv_index)
        near = triton_fn()(q, near_k, near_v, causal=True)
    for what, a, b in zip(("out", "lse"), far, near, strict=True):
        assert torch.equal(a, b), f"{what} differs when the gathered rows lie past 2**31 elements"


def chunked_causal(q, k, v, lengths, bounds, backend):
    """Causal attention over ``k``/``v`` computed chunk by chunk (keys ``[s, e)`` of each bound) with
    ``keys_after`` and per-chunk ``kv_lengths``, merged: what ranks holding the chunks compute."""
    from perceiver_kernels.distributed import merge_attention

    outs, lses = [], []
    for start, end in bounds:
        local = (lengths - start).clamp(0, end - start)
        after = (lengths - end).clamp(min=0)
        out, lse = pk.attention(
            q, k[:, start:end], v[:, start:end], causal=True, kv_lengths=local, keys_after=after, backend=backend,
            return_lse=True,
        )  # fmt: skip
        outs.append(out)
        lses.append(lse)
    return merge_attention(outs, lses)


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_keys_after_lets_chunks_of_a_causal_sequence_merge_to_the_whole(backend, device):
    """``keys_after`` moves the causal diagonal by the keys that follow a chunk: chunks of a right-padded
    causal sequence (the diagonal crossing chunk bounds, a chunk past a sample's length, an empty chunk)
    merge to attention over all keys, forward and every gradient, on the reference and Triton."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, n, 2, d, device=device, dtype=torch.float64, requires_grad=True)
               for n, d in ((5, 8), (23, 8), (23, 6)))  # fmt: skip
    lengths = torch.tensor([23, 17, 9], device=device)  # sample 2's latents (keys 4..8) straddle two chunks
    expected, expected_lse = pk.attention(q, k, v, causal=True, kv_lengths=lengths, return_lse=True,
                                          backend="reference")  # fmt: skip
    grad = torch.randn_like(expected)
    expected_grads = torch.autograd.grad(expected, (q, k, v), grad)
    dtype = torch.float64 if backend == "reference" else torch.float32
    qc, kc, vc = (t.detach().to(dtype).requires_grad_() for t in (q, k, v))
    out, lse = chunked_causal(qc, kc, vc, lengths, [(0, 7), (7, 7), (7, 15), (15, 23)], backend)
    grads = torch.autograd.grad(out, (qc, kc, vc), grad.to(dtype))
    for actual, reference in zip((out, lse, *grads), (expected, expected_lse, *expected_grads), strict=True):
        assert compare(actual, reference, dtype=dtype).ok, (actual - reference).abs().max()
    if backend == "triton":  # the split-KV forward too: each split's key range follows the moved diagonal
        from perceiver_kernels.problem import describe

        local, after = (lengths - 7).clamp(0, 8), (lengths - 15).clamp(min=0)
        problem = describe(qc, kc[:, 7:15], vc[:, 7:15], True, kv_lengths=local, keys_after=after, num_splits=3)
        split_out, split_lse = triton_attention(problem)
        whole_out, whole_lse = pk.attention(qc, kc[:, 7:15], vc[:, 7:15], causal=True, kv_lengths=local,
                                            keys_after=after, backend="reference", return_lse=True)  # fmt: skip
        assert compare(split_out, whole_out.double(), dtype=dtype).ok and compare(split_lse, whole_lse.double()).ok


def test_keys_after_is_validated():
    q, k, v = torch.randn(2, 3, 1, 4), torch.randn(2, 5, 1, 4), torch.randn(2, 5, 1, 4)
    after = torch.tensor([1, 0])
    with pytest.raises(ValueError, match="keys_after only moves the causal diagonal"):
        pk.attention(q, k, v, keys_after=after)
    with pytest.raises(ValueError, match=r"keys_after must have shape \(B,\)"):
        pk.attention(q, k, v, causal=True, keys_after=after[:1])
    with pytest.raises(TypeError, match="keys_after must be an int32 or int64 tensor"):
        pk.attention(q, k, v, causal=True, keys_after=after.float())
    with pytest.raises(ValueError, match="rotary with keys_after needs explicit q_positions"):
        pk.attention(q, k, v, causal=True, keys_after=after, rotary_dim=4)
    previous = pk.set_value_checks(True)
    try:
        with pytest.raises(ValueError, match="keys_after values must be >= 0"):
            pk.attention(q, k, v, causal=True, keys_after=torch.tensor([-1, 0]))
    finally:
        pk.set_value_checks(previous)
