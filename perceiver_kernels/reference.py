"""The pure-PyTorch contract of Perceiver attention.

Every kernel in this package is checked against :func:`attention_reference`. It materialises the
``(B, H, Nq, Nk)`` score matrix, so it is meant for tests, benchmarks and as a fallback backend on
small problems, not for speed.

Semantics (see the README's table): bottom-right aligned causal mask, ``key_padding_mask`` with
True = padding, ``kv_lengths`` ignoring keys at index ``>= kv_lengths[b]``, and a query row that sees
no key returns zeros with ``lse = -inf`` (no NaN, zero gradients).
"""

from __future__ import annotations

import torch
from torch import Tensor

from .problem import AttentionProblem, causal_offset, describe
from .rotary import default_positions, rotary_tables, rotate


def visible_keys(
    batch: int,
    num_queries: int,
    num_keys: int,
    *,
    causal: bool,
    key_padding_mask: Tensor | None,
    kv_lengths: Tensor | None,
    device: torch.device,
    keys_after: Tensor | None = None,
) -> Tensor:
    """Boolean mask, broadcastable to ``(B, 1, Nq, Nk)``, True where query ``i`` of sample ``b`` may see
    key ``j``. As small as the masks allow (it also serves as the benchmarks' SDPA mask):
    ``(B, 1, 1, Nk)`` for padding or lengths alone, ``(1, 1, Nq, Nk)`` for a causal mask shared by the
    batch, ``(B, 1, Nq, Nk)`` where per-sample lengths (or ``keys_after``) meet the causal mask."""
    key_index = torch.arange(num_keys, device=device)
    visible = torch.ones(1, 1, 1, num_keys, dtype=torch.bool, device=device)
    lengths: Tensor | int = num_keys
    if kv_lengths is not None:
        # Clamped to [0, Nk] as the kernels clamp them (value checks are opt-in).
        lengths = kv_lengths.to(device=device, dtype=torch.long).clamp(0, num_keys)[:, None, None, None]  # (B,1,1,1)
        visible = visible & (key_index < lengths)
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, None, :].to(device)
    if causal:
        # Bottom-right alignment: the last query row lines up with the last valid key of its sample.
        query_index = torch.arange(num_queries, device=device)[:, None]
        after: Tensor | int = 0
        if keys_after is not None:  # clamped to [0, Nk] as the kernels clamp it: more shifts nothing further
            after = keys_after.to(device=device, dtype=torch.long).clamp(0, num_keys)[:, None, None, None]
        visible = visible & (key_index <= query_index + causal_offset(lengths, num_queries, after))
    return visible


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    return_lse: bool = False,
    compute_dtype: torch.dtype | None = None,
    dropout_p: float = 0.0,
    **options,
) -> Tensor | tuple[Tensor, Tensor]:
    """Perceiver attention computed with plain PyTorch ops (differentiable).

    Args:
        q, k, v, and ``options`` (``causal``, ``key_padding_mask``, ``kv_lengths``, ``scale``,
            ``rotary_dim``, ``q_positions``, ``k_positions``, ``rotary_base``, ``rotary_interleaved``,
            ``kv_index``): exactly as in :func:`perceiver_kernels.attention`, validated the same way.
        return_lse: also return the float32 ``(B, H, Nq)`` log-sum-exp (natural log).
        compute_dtype: dtype of the arithmetic. Default float32 (float64 for float64 inputs). Tests
            pass the input dtype to measure what a naive low-precision computation gets wrong.
        dropout_p: dropout on the attention probabilities (perceiver-io's attention ``dropout``; the
            fused kernels have none, so the model layer trains with it through this path). The lse is
            that of the probabilities before dropout.

    Returns:
        ``(B, Nq, H, Dv)`` in q's dtype, and the lse when ``return_lse``.
    """
    out, lse = reference_attention(describe(q, k, v, **options), compute_dtype, dropout_p)
    return (out, lse) if return_lse else out


def reference_attention(
    problem: AttentionProblem, compute_dtype: torch.dtype | None = None, dropout_p: float = 0.0
) -> tuple[Tensor, Tensor]:
    """The reference backend: ``(out, lse)`` of a described problem (see :func:`attention_reference`)."""
    q, k, v, causal, key_padding_mask, kv_lengths, kv_index, scale = problem[:8]
    batch, num_queries, num_keys = problem.batch, problem.num_queries, problem.num_keys
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    rotary_dim = problem.rotary_dim
    if rotary_dim:
        default_q, default_k = default_positions(
            batch, num_queries, k.shape[1], kv_lengths if kv_index is None else None, q.device
        )
        base, interleaved = problem.rotary_base, problem.rotary_interleaved
        q_positions = default_q if problem.q_positions is None else problem.q_positions
        k_positions = default_k if problem.k_positions is None else problem.k_positions
        q = rotate(q, *rotary_tables(q_positions, rotary_dim, base), rotary_dim, interleaved)
        k = rotate(k, *rotary_tables(k_positions, rotary_dim, base), rotary_dim, interleaved)
    if kv_index is not None:
        # Out-of-range rows are clamped as the kernels clamp them (value checks are opt-in).
        rows = kv_index.clamp(0, max(k.shape[1] - 1, 0))

        def gather(t: Tensor) -> Tensor:
            return t.gather(1, rows[:, :, None, None].expand(-1, -1, *t.shape[2:]))

        if k.shape[1] == 0:  # nothing to gather from: every gathered key is invisible
            k, v = k.new_zeros((batch, num_keys, *k.shape[2:])), v.new_zeros((batch, num_keys, *v.shape[2:]))
            key_padding_mask = torch.ones(batch, num_keys, dtype=torch.bool, device=q.device)
        else:
            k, v = gather(k), gather(v)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.gather(1, rows)

    ignored = key_padding_mask
    if kv_lengths is not None and num_keys:
        past = torch.arange(num_keys, device=q.device)[None] >= kv_lengths.to(q.device).clamp(0, num_keys)[:, None]
        ignored = past if ignored is None else ignored.to(q.device) | past
    if ignored is not None and num_keys:
        # Ignored keys (padded, past kv_lengths) are zeros, whatever their memory holds: a NaN there must not reach
        # the output or dq through a zero probability (0 x NaN = NaN). Their gradients are zeros (masked_fill's).
        ignored = ignored[:, :, None, None].to(q.device)
        k, v = k.masked_fill(ignored, 0), v.masked_fill(ignored, 0)
    qc = q.to(compute_dtype).expand(batch, -1, -1, -1)
    scores = torch.einsum("bqhd,bkhd->bhqk", qc, k.to(compute_dtype)) * scale  # (B, H, Nq, Nk)
    visible = visible_keys(
        batch,
        num_queries,
        num_keys,
        causal=causal,
        key_padding_mask=key_padding_mask,
        kv_lengths=kv_lengths,
        device=q.device,
        keys_after=problem.keys_after,
    )
    scores = scores.masked_fill(~visible, float("-inf"))
    if num_keys == 0:  # amax over an empty axis is undefined: one invisible zero key, joined (q, k, v keep their
        # place in the graph, so their gradients are zeros, not missing)
        scores = torch.cat([scores, scores.new_full((*scores.shape[:-1], 1), float("-inf"))], dim=-1)
        v = torch.cat([v, v.new_zeros((batch, 1, *v.shape[2:]))], dim=1)
    # Stable softmax written out so that rows with no visible key give exact zeros and zero
    # gradients: torch.softmax and logsumexp would produce NaN for an all -inf row.
    row_max = scores.amax(dim=-1, keepdim=True).detach()
    row_max = torch.where(torch.isinf(row_max), torch.zeros_like(row_max), row_max)
    weights = torch.exp(scores - row_max)
    row_sum = weights.sum(dim=-1, keepdim=True)
    empty = row_sum == 0
    safe_sum = torch.where(empty, torch.ones_like(row_sum), row_sum)
    probs = weights / safe_sum
    if dropout_p:
        probs = torch.nn.functional.dropout(probs, dropout_p)
    out = torch.einsum("bhqk,bkhd->bqhd", probs, v.to(compute_dtype)).to(q.dtype)
    lse = (row_max + torch.log(safe_sum)).masked_fill(empty, float("-inf")).squeeze(-1)
    return out, lse.to(torch.float32 if compute_dtype != torch.float64 else torch.float64)
