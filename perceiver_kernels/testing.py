"""Numerical acceptance rule shared by the tests and ``perceiver-kernels check``: the one place for
tolerances.

float32 (and float64) results must match a float64 reference to a relative error of
``FP32_RTOL`` (max abs error over max abs reference value). float16/bfloat16 results follow
FlashAttention's rule: the max error against the float64 reference may be at most
``LOWP_ERROR_FACTOR`` times the max error of the same computation done naively in that dtype, plus
``LOWP_ULPS`` units of rounding at the reference's magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FP32_RTOL = 1e-4
FP64_RTOL = 1e-10
LOWP_ERROR_FACTOR = 2.0
# Two, not one: the backward forms delta = rowsum(dO * O) from the output rounded to the input dtype (as
# FlashAttention does), where the naive computation differentiates the softmax from P and dP, so the two round
# differently; where a broadcast query's dq sums samples that cancel, the naive one can be luckily exact. Found
# by the fuzz: dq of a float16 case (tests/test_fuzz.py's first @example) at 1.03x the one-ulp limit.
LOWP_ULPS = 2

# The same float32 computation run in another order, e.g. a model sharded over ranks against the same model in
# one process (both float32): max abs difference over max abs value.
REORDERED_FP32_RTOL = 1e-5

# The benchmark suite compares every provider's forward output with a float32 reference on shapes
# far too large for the rule above (it needs a float64 run and a naive low-precision run). This
# looser bound (max abs difference over max abs reference) flags a wrong result, not a rounding one.
BENCH_AGREEMENT_RTOL = {torch.float32: 1e-3, torch.float16: 1e-2, torch.bfloat16: 3e-2}


@dataclass(frozen=True)
class Comparison:
    max_abs_error: float
    limit: float  # largest max_abs_error that passes
    ok: bool

    @property
    def ratio(self) -> float:
        """Error over its limit: below 1 passes."""
        return self.max_abs_error / self.limit if self.limit > 0 else float("inf")


def compare(
    actual: Tensor, reference: Tensor, naive: Tensor | None = None, dtype: torch.dtype | None = None
) -> Comparison:
    """Judge ``actual`` against a float64 ``reference``.

    ``dtype`` is the precision of the computation (default ``actual.dtype``): the float32 lse of a
    float16 attention is judged by the float16 rule, since its inputs (e.g. rotated q and k, rounded
    to float16 before the matmul, as a naive computation rounds them too) carry float16 error.
    ``naive`` is the same computation done in that low precision; it is required for
    float16/bfloat16 and ignored otherwise. NaN or inf where the reference is finite always fails.
    """
    dtype = dtype or actual.dtype
    ref = reference.detach().double()
    act = actual.detach().double()
    if act.shape != ref.shape:
        raise ValueError(f"shape mismatch: actual {tuple(act.shape)} vs reference {tuple(ref.shape)}")
    finite = torch.isfinite(ref)
    # -inf lse entries (rows with no visible key) must be reproduced exactly.
    if not torch.equal(torch.isfinite(act), finite) or not torch.equal(act[~finite], ref[~finite]):
        return Comparison(float("inf"), 0.0, False)
    err = (act[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0
    scale = ref[finite].abs().max().item() if finite.any() else 0.0
    if dtype in (torch.float32, torch.float64):
        rtol = FP32_RTOL if dtype == torch.float32 else FP64_RTOL
        limit = rtol * max(scale, 1e-30)
    else:
        if naive is None:
            raise ValueError(f"a naive {dtype} result is needed to judge a {dtype} computation")
        naive_err = (naive.detach().double()[finite] - ref[finite]).abs().max().item() if finite.any() else 0.0
        ulp = torch.finfo(dtype).eps * max(scale, 1e-30)
        limit = LOWP_ERROR_FACTOR * naive_err + LOWP_ULPS * ulp
    return Comparison(err, limit, err <= limit)


def compare_reordered(
    actual: Tensor, expected: Tensor, rtol: float = REORDERED_FP32_RTOL, min_scale: float = 0.0
) -> Comparison:
    """Judge a float32 ``actual`` against ``expected``, the same computation in another order (no float64
    reference): max abs difference at most ``rtol`` times the max abs of ``expected`` (at least ``min_scale``:
    a value that is zero in exact arithmetic, such as a key bias's gradient, holds only rounding noise)."""
    if actual.shape != expected.shape:
        raise ValueError(f"shape mismatch: actual {tuple(actual.shape)} vs expected {tuple(expected.shape)}")
    act, exp = actual.detach().double(), expected.detach().double()
    if not torch.isfinite(act).all() or not torch.isfinite(exp).all():
        return Comparison(float("inf"), 0.0, False)
    err = (act - exp).abs().max().item() if act.numel() else 0.0
    limit = rtol * max(exp.abs().max().item() if exp.numel() else 0.0, min_scale, 1e-30)
    return Comparison(err, limit, err <= limit)


@dataclass(frozen=True)
class AttentionCase:
    """One attention problem for correctness checks. Random data is drawn by :func:`make_inputs`."""

    batch: int = 2
    q_batch: int | None = None  # None: same as batch; 1: broadcast latent array
    nq: int = 5
    nk: int = 17
    heads: int = 2
    dqk: int = 16
    dv: int = 16
    causal: bool = False
    pad_fraction: float = 0.0  # fraction of keys padded per sample, at random
    all_padded_sample: bool = False  # sample 0 has every key padded
    kv_lengths: tuple[int, ...] | None = None
    permuted: bool = False  # q/k/v are (B, H, N, D) tensors permuted to (B, N, H, D)
    # Perceiver AR
    rotary_dim: int = 0
    rotary_interleaved: bool = True
    # "default": the op's default positions; "left-pad": per-sample left padding (keys padded, and
    # positions clamp(arange(Nk) - n_pad_b, 0), the queries taking the last Nq); "random": any ints.
    positions: str = "default"
    prefix_dropout: bool = False  # kv_index keeping P - int(0.5 P) random prefix rows (P = Nk - Nq), then the latents

    def describe(self) -> str:
        parts = [f"B{self.batch}", f"H{self.heads}", f"{self.nq}x{self.nk}", f"D{self.dqk}/{self.dv}"]
        if self.q_batch == 1:
            parts.append("q-bcast")
        if self.causal:
            parts.append("causal")
        if self.pad_fraction or self.all_padded_sample:
            parts.append("pad")
        if self.kv_lengths is not None:
            parts.append("kvlen")
        if self.permuted:
            parts.append("permuted")
        if self.rotary_dim:
            parts.append(f"rotary{self.rotary_dim}{'' if self.rotary_interleaved else '-neox'}")
        if self.positions != "default":
            parts.append(self.positions)
        if self.prefix_dropout:
            parts.append("prefix-dropout")
        return " ".join(parts)


def make_inputs(case: AttentionCase, dtype: torch.dtype, device: torch.device | str) -> dict:
    """Random q, k, v (requiring grad), masks and an output gradient for ``case``."""

    def rand(batch: int, n: int, d: int) -> Tensor:
        if case.permuted:
            x = torch.randn(batch, case.heads, n, d, device=device).to(dtype).permute(0, 2, 1, 3)
        else:
            x = torch.randn(batch, n, case.heads, d, device=device).to(dtype)
        return x.requires_grad_()

    q_batch = case.batch if case.q_batch is None else case.q_batch
    inputs = {
        "q": rand(q_batch, case.nq, case.dqk),
        "k": rand(case.batch, case.nk, case.dqk),
        "v": rand(case.batch, case.nk, case.dv),
        "causal": case.causal,
        "key_padding_mask": None,
        "kv_lengths": None,
    }
    if case.pad_fraction or case.all_padded_sample:
        mask = torch.rand(case.batch, case.nk, device=device) < case.pad_fraction
        if case.all_padded_sample:
            mask[0] = True
        inputs["key_padding_mask"] = mask
    if case.kv_lengths is not None:
        inputs["kv_lengths"] = torch.tensor(case.kv_lengths, device=device, dtype=torch.int32)
    if case.rotary_dim:
        inputs.update(rotary_dim=case.rotary_dim, rotary_interleaved=case.rotary_interleaved)
    if case.positions == "left-pad":
        num_pad = torch.randint(0, case.nk // 2 + 1, (case.batch,), device=device)
        key_index = torch.arange(case.nk, device=device)[None, :]
        inputs["k_positions"] = (key_index - num_pad[:, None]).clamp(min=0)
        inputs["q_positions"] = inputs["k_positions"][:, case.nk - case.nq :]
        left_pad = key_index < num_pad[:, None]
        mask = inputs["key_padding_mask"]
        inputs["key_padding_mask"] = left_pad if mask is None else mask | left_pad
    elif case.positions == "random":
        inputs["q_positions"] = torch.randint(0, 4 * case.nk, (case.batch, case.nq), device=device)
        inputs["k_positions"] = torch.randint(0, 4 * case.nk, (case.batch, case.nk), device=device)
    if case.prefix_dropout:
        prefix = case.nk - case.nq
        keep = prefix - int(0.5 * prefix)
        rows = [torch.randperm(prefix, device=device)[:keep].sort().values for _ in range(case.batch)]
        latents = torch.arange(prefix, case.nk, device=device)
        inputs["kv_index"] = torch.stack([torch.cat((r, latents)) for r in rows])
    inputs["grad_out"] = torch.randn(case.batch, case.nq, case.heads, case.dv, device=device).to(dtype)
    inputs["grad_lse"] = torch.randn(case.batch, case.heads, case.nq, device=device)
    return inputs


def backend_fn(run, num_splits: int = 0, scale: float | None = None):
    """An ``attention_fn`` for :func:`check_case`: ``fn(q, k, v, **options) -> (out, lse)`` describes the
    call (``perceiver_kernels.problem.describe``, with ``num_splits`` forced) and hands the problem to
    ``run``, e.g. ``ops.triton_attention`` or ``ops.cuda_attention.cuda_attention``."""
    from .problem import describe

    def fn(q, k, v, **options):
        return run(describe(q, k, v, scale=scale, num_splits=num_splits, **options))

    return fn


def forward_backward(fn, q: Tensor, k: Tensor, v: Tensor, **options) -> list[Tensor]:
    """``[out, lse, dq, dk, dv]`` of one call ``fn(q, k, v, **options) -> (out, lse)`` on new leaves of q, k and v
    (detached views: same memory and strides), backpropagating a fixed ramp of weights through out (for tests
    that compare whole runs bitwise)."""
    inputs = [t.detach().requires_grad_() for t in (q, k, v)]
    out, lse = fn(*inputs, **options)
    (out.float() * torch.linspace(-1, 1, out.numel(), device=out.device).view_as(out)).sum().backward()
    return [out, lse, *(t.grad for t in inputs)]


def attention_options(inputs: dict) -> dict:
    """The keyword arguments of ``pk.attention`` among :func:`make_inputs`' entries (masks, rotary, kv_index)."""
    names = ("causal", "key_padding_mask", "kv_lengths", "rotary_dim", "rotary_interleaved", "q_positions",
             "k_positions", "kv_index")  # fmt: skip
    return {name: inputs[name] for name in names if name in inputs}


def check_case(case: AttentionCase, dtype: torch.dtype, device, attention_fn) -> dict[str, Comparison]:
    """Run ``attention_fn(q, k, v, causal=..., key_padding_mask=..., kv_lengths=..., [rotary and
    kv_index keywords when the case uses them]) -> (out, lse)``
    forward and backward on fresh random inputs and judge out, lse, dq, dk, dv against the float64
    reference (and, for float16/bfloat16, against the naive computation in that dtype)."""
    from .reference import attention_reference

    inputs = make_inputs(case, dtype, device)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    masks = attention_options(inputs)

    def run(fn, q, k, v):
        out, lse = fn(q, k, v, **masks)
        # Only finite lse entries carry gradient (rows with no visible key have lse = -inf).
        lse_term = torch.where(torch.isfinite(lse), lse, 0.0) * inputs["grad_lse"].to(lse.dtype)
        loss = (out * inputs["grad_out"].to(out.dtype)).sum() + lse_term.sum()
        grads = torch.autograd.grad(loss, (q, k, v))
        return {"out": out, "lse": lse, "dq": grads[0], "dk": grads[1], "dv": grads[2]}

    def detached64(t: Tensor) -> Tensor:
        return t.detach().double().requires_grad_()

    results = run(attention_fn, q, k, v)
    reference = run(
        lambda *a, **kw: attention_reference(*a, **kw, return_lse=True),
        detached64(q), detached64(k), detached64(v),
    )  # fmt: skip
    naive = None
    if dtype in (torch.float16, torch.bfloat16):
        naive = run(
            lambda *a, **kw: attention_reference(*a, **kw, return_lse=True, compute_dtype=dtype),
            q.detach().clone().requires_grad_(), k.detach().clone().requires_grad_(),
            v.detach().clone().requires_grad_(),
        )  # fmt: skip
    return {
        name: compare(results[name], reference[name], naive[name] if naive else None, dtype=dtype) for name in results
    }


# The correctness matrix every backend is checked against (tests/test_attention.py for Triton,
# tests/test_cuda_backend.py for the CUDA kernels): features, awkward head dims, Perceiver AR.
FEATURE_CASES = {
    "broadcast-query": AttentionCase(batch=3, q_batch=1, nq=33, nk=129, heads=2),
    "broadcast-query-causal": AttentionCase(batch=3, q_batch=1, nq=20, nk=70, causal=True),
    "single-head": AttentionCase(batch=1, nq=5, nk=300, heads=1, dqk=32, dv=32),
    "padding": AttentionCase(batch=3, nq=33, nk=129, pad_fraction=0.3),
    "padding-all-padded-sample": AttentionCase(batch=3, nq=33, nk=129, pad_fraction=0.3, all_padded_sample=True),
    "padding-causal": AttentionCase(batch=3, nq=33, nk=129, causal=True, pad_fraction=0.3),
    "kv-lengths": AttentionCase(batch=4, nq=5, nk=129, kv_lengths=(0, 129, 64, 1)),
    "kv-lengths-causal": AttentionCase(batch=4, nq=33, nk=129, causal=True, kv_lengths=(0, 129, 40, 17)),
    "kv-lengths-and-padding": AttentionCase(batch=3, nq=17, nk=100, pad_fraction=0.2, kv_lengths=(100, 50, 3)),
    "causal-equal-lengths": AttentionCase(batch=2, nq=100, nk=100, causal=True),
    "permuted": AttentionCase(batch=2, nq=33, nk=129, heads=3, permuted=True),
    "permuted-broadcast": AttentionCase(batch=2, q_batch=1, nq=33, nk=129, heads=3, permuted=True, causal=True),
    "head-dim-1": AttentionCase(nq=5, nk=17, dqk=1, dv=1),
    "head-dims-odd": AttentionCase(nq=33, nk=129, dqk=7, dv=13),
    "mlm-32-160": AttentionCase(nq=33, nk=129, dqk=32, dv=160),
    "head-dims-96-128": AttentionCase(nq=33, nk=129, dqk=96, dv=128, causal=True, pad_fraction=0.2),
    "head-dim-256": AttentionCase(nq=17, nk=40, heads=1, dqk=256, dv=256),
    "imagenet-261": AttentionCase(batch=2, nq=17, nk=100, heads=1, dqk=261, dv=261, pad_fraction=0.2),
    "wide-qk-narrow-v": AttentionCase(nq=17, nk=40, heads=1, dqk=300, dv=40, causal=True),
    "narrow-qk-wide-v": AttentionCase(nq=17, nk=40, heads=1, dqk=32, dv=322),
    "head-dim-1024": AttentionCase(batch=1, nq=5, nk=33, heads=1, dqk=1024, dv=1024, kv_lengths=(20,)),
}


# Perceiver AR: latents (the last Nq positions) over the whole sequence, rotary on part of each head,
# left padding, prefix dropout as a kv_index gather, decoding against a cache with kv_lengths.
_AR = dict(batch=3, nq=17, nk=80, heads=2, dqk=32, dv=32, causal=True)
AR_CASES = {
    "rotary-partial": AttentionCase(**_AR, rotary_dim=16),
    "rotary-full": AttentionCase(**_AR, rotary_dim=32),
    "rotary-neox": AttentionCase(**_AR, rotary_dim=16, rotary_interleaved=False),
    "rotary-neox-full": AttentionCase(**_AR, rotary_dim=32, rotary_interleaved=False),
    "rotary-left-pad": AttentionCase(**_AR, rotary_dim=16, positions="left-pad"),
    "rotary-random-positions": AttentionCase(**_AR, rotary_dim=8, positions="random", pad_fraction=0.2),
    "rotary-self-attention": AttentionCase(batch=2, nq=40, nk=40, causal=True, rotary_dim=16, positions="left-pad"),
    "rotary-cross-not-causal": AttentionCase(batch=2, nq=9, nk=60, rotary_dim=12, rotary_interleaved=False),
    "rotary-broadcast-query": AttentionCase(batch=3, q_batch=1, nq=9, nk=60, rotary_dim=8, positions="random"),
    "prefix-dropout": AttentionCase(**_AR, prefix_dropout=True),
    "prefix-dropout-rotary-left-pad": AttentionCase(**_AR, rotary_dim=16, positions="left-pad", prefix_dropout=True),
    "prefix-dropout-padding": AttentionCase(**_AR, prefix_dropout=True, pad_fraction=0.3, rotary_dim=16),
    "prefix-dropout-kv-lengths": AttentionCase(**_AR, prefix_dropout=True, kv_lengths=(49, 30, 17), rotary_dim=8),
    "decode-rotary": AttentionCase(batch=4, nq=1, nk=150, causal=True, kv_lengths=(150, 1, 77, 0), rotary_dim=16),
    "decode-16-rotary": AttentionCase(batch=2, nq=16, nk=90, causal=True, kv_lengths=(90, 40), rotary_dim=16),
    "rotary-wide-head": AttentionCase(
        batch=2,
        nq=9,
        nk=40,
        heads=1,
        dqk=300,
        dv=40,
        causal=True,
        rotary_dim=200,
        rotary_interleaved=False,
        prefix_dropout=True,
    ),  # fmt: skip
    "rotary-head-dim-96": AttentionCase(batch=2, nq=17, nk=60, dqk=96, dv=64, causal=True, rotary_dim=96),
}


# Paths specific to the CUDA kernels (tests/test_cuda_backend.py on a GPU, tests/test_simt_emulation.py
# on the CPU): one row, more queries than keys, the 32-key tiles of D = 256, head dims padded to the
# kernels' template D, NeoX rotary at D = 64 with prefix dropout.
CUDA_CASES = {
    "lengths-24-40": AttentionCase(batch=2, nq=33, nk=129, heads=3, dqk=24, dv=40),
    "single-row": AttentionCase(batch=2, nq=1, nk=300, heads=2, dqk=64, dv=64),
    "queries-exceed-keys": AttentionCase(batch=2, nq=100, nk=17, heads=2, dqk=32, dv=32, causal=True),
    "causal-long": AttentionCase(batch=2, nq=100, nk=300, heads=2, dqk=64, dv=64, causal=True),
    "qk-32-v-128": AttentionCase(nq=65, nk=200, dqk=32, dv=128),
    "head-dim-8": AttentionCase(nq=9, nk=70, dqk=8, dv=8),
    "head-dim-256-causal-padding": AttentionCase(
        nq=17, nk=100, heads=1, dqk=256, dv=256, causal=True, pad_fraction=0.2
    ),
    "qk-256-v-64": AttentionCase(nq=65, nk=70, heads=2, dqk=256, dv=64, kv_lengths=(70, 33)),
    "prefix-dropout-left-pad-neox-64": AttentionCase(
        batch=2,
        nq=33,
        nk=200,
        dqk=64,
        dv=64,
        causal=True,
        rotary_dim=32,
        rotary_interleaved=False,
        positions="left-pad",
        prefix_dropout=True,
    ),  # fmt: skip
}


def far_apart_inputs(dtype: torch.dtype, nq: int = 5, nk: int = 40, heads: int = 2, dim: int = 16, seed: int = 0):
    """q, k, v whose second sample lies more than 2**31 elements past the first: k and v are views of one
    uninitialised storage of ~2**31 elements (4 GiB in 16 bits, virtual: only the viewed rows are written, so
    only their pages are ever resident). A kernel that forms ``b * batch_stride`` or a row offset in 32 bits
    reads the wrong memory. Returns ``(q, k, v)`` (k and v leaves of autograd, requiring grad)."""
    generator = torch.Generator().manual_seed(seed)
    row = heads * dim
    batch_stride = 2**31 + 64 * row  # elements: past int32, by a whole number of rows
    storage = torch.empty(batch_stride + 2 * nk * row, dtype=dtype)
    k, v = (
        storage.as_strided((2, nk, heads, dim), (batch_stride, row, dim, 1), storage_offset=offset)
        for offset in (0, nk * row)
    )
    for t in (k, v):
        t.copy_(torch.randn(t.shape, generator=generator).to(dtype))
    q = torch.randn(2, nq, heads, dim, generator=generator).to(dtype)
    return q.requires_grad_(), k.requires_grad_(), v.requires_grad_()


def far_rows_inputs(dtype: torch.dtype, nq: int = 5, heads: int = 1, dim: int = 16, seed: int = 0):
    """q, k, v and a ``kv_index`` gathering key rows more than 2**31 elements past the first (one sample; k and v
    interleaved row by row in one uninitialised ~2**31-element storage, only the gathered rows written): a row
    offset formed in 32 bits (row x a small row stride) reads the wrong memory. Nothing requires grad (dk and dv
    would be as large as k and v). Returns ``(q, k, v, kv_index)``."""
    generator = torch.Generator().manual_seed(seed)
    row = heads * dim
    num_rows = 2**31 // (2 * row) + 64
    storage = torch.empty(num_rows * 2 * row, dtype=dtype)
    k, v = (
        storage.as_strided((1, num_rows, heads, dim), (num_rows * 2 * row, 2 * row, dim, 1), storage_offset=offset)
        for offset in (0, row)
    )
    kv_index = torch.tensor([[0, 3, 7, num_rows - 60, num_rows - 33, num_rows - 1]])
    for t in (k, v):
        t[:, kv_index[0]] = torch.randn(1, kv_index.shape[1], heads, dim, generator=generator).to(dtype)
    return torch.randn(1, nq, heads, dim, generator=generator).to(dtype), k, v, kv_index
