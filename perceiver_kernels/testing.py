"""Numerical acceptance rule shared by the tests and ``perceiver-kernels check``: the one place for
tolerances.

float32 (and float64) results must match a float64 reference to a relative error of
``FP32_RTOL`` (max abs error over max abs reference value). float16/bfloat16 results follow
FlashAttention's rule: the max error against the float64 reference may be at most
``LOWP_ERROR_FACTOR`` times the max error of the same computation done naively in that dtype, plus
one unit of rounding at the reference's magnitude.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

FP32_RTOL = 1e-4
FP64_RTOL = 1e-10
LOWP_ERROR_FACTOR = 2.0

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
        limit = LOWP_ERROR_FACTOR * naive_err + ulp
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


def check_case(case: AttentionCase, dtype: torch.dtype, device, attention_fn) -> dict[str, Comparison]:
    """Run ``attention_fn(q, k, v, causal=..., key_padding_mask=..., kv_lengths=..., [rotary and
    kv_index keywords when the case uses them]) -> (out, lse)``
    forward and backward on fresh random inputs and judge out, lse, dq, dk, dv against the float64
    reference (and, for float16/bfloat16, against the naive computation in that dtype)."""
    from .reference import attention_reference

    inputs = make_inputs(case, dtype, device)
    q, k, v = inputs["q"], inputs["k"], inputs["v"]
    options = ("causal", "key_padding_mask", "kv_lengths", "rotary_dim", "rotary_interleaved", "q_positions",
               "k_positions", "kv_index")  # fmt: skip
    masks = {n: inputs[n] for n in options if n in inputs}

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
