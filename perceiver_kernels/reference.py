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
) -> Tensor:
    """Boolean mask, broadcastable to ``(B, 1, Nq, Nk)``, True where query ``i`` of sample ``b`` may see
    key ``j``. As small as the masks allow (it also serves as the benchmarks' SDPA mask):
    ``(B, 1, 1, Nk)`` for padding or lengths alone, ``(1, 1, Nq, Nk)`` for a causal mask shared by the
    batch, ``(B, 1, Nq, Nk)`` where per-sample lengths meet the causal mask."""
    key_index = torch.arange(num_keys, device=device)
    visible = torch.ones(1, 1, 1, num_keys, dtype=torch.bool, device=device)
    lengths: Tensor | int = num_keys
    if kv_lengths is not None:
        lengths = kv_lengths.to(device=device, dtype=torch.long)[:, None, None, None]  # (B, 1, 1, 1)
        visible = visible & (key_index < lengths)
    if key_padding_mask is not None:
        visible = visible & ~key_padding_mask[:, None, None, :].to(device)
    if causal:
        # Bottom-right alignment: the last query row lines up with the last valid key of its sample.
        query_index = torch.arange(num_queries, device=device)[:, None]
        visible = visible & (key_index <= query_index + lengths - num_queries)
    return visible


def attention_reference(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    kv_lengths: Tensor | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    compute_dtype: torch.dtype | None = None,
    rotary_dim: int = 0,
    q_positions: Tensor | None = None,
    k_positions: Tensor | None = None,
    rotary_base: float = 10000.0,
    rotary_interleaved: bool = True,
    kv_index: Tensor | None = None,
    dropout_p: float = 0.0,
) -> Tensor | tuple[Tensor, Tensor]:
    """Perceiver attention computed with plain PyTorch ops (differentiable).

    Args:
        q: ``(Bq, Nq, H, Dqk)`` with ``Bq`` equal to ``B`` or 1 (broadcast over the batch).
        k: ``(B, Nk, H, Dqk)``.
        v: ``(B, Nk, H, Dv)``.
        causal: bottom-right aligned causal mask (query ``i`` sees key ``j`` iff ``j <= i + L_b - Nq``).
        key_padding_mask: bool ``(B, Nk)``, True marks padding.
        kv_lengths: int ``(B,)``; keys at index ``>= kv_lengths[b]`` are ignored.
        scale: score scale, default ``Dqk ** -0.5``.
        return_lse: also return the float32 ``(B, H, Nq)`` log-sum-exp (natural log).
        compute_dtype: dtype of the arithmetic. Default float32 (float64 for float64 inputs). Tests
            pass the input dtype to measure what a naive low-precision computation gets wrong.
        rotary_dim: rotate the first ``rotary_dim`` channels of every q and k head (0: no rotary);
            see :mod:`perceiver_kernels.rotary` for the angles and the two pair layouts.
        q_positions, k_positions: int ``(B or 1, Nq)`` / ``(B or 1, Nk)``; default
            :func:`perceiver_kernels.rotary.default_positions`.
        rotary_base, rotary_interleaved: the frequency base and the pair layout.
        kv_index: int64 ``(B, Nk')``: attend only to these key rows of each sample (sorted, unique).
            Keys keep their own positions and padding flags; ``causal`` and ``kv_lengths`` then refer
            to the gathered axis of length ``Nk'``.
        dropout_p: dropout on the attention probabilities (perceiver-io's attention ``dropout``; the
            fused kernels have none, so the model layer trains with it through this path). The lse is
            that of the probabilities before dropout.

    Returns:
        ``(B, Nq, H, Dv)`` in q's dtype, and the lse when ``return_lse``.
    """
    batch, num_keys = k.shape[0], k.shape[1]
    num_queries, head_dim_qk = q.shape[1], q.shape[3]
    if compute_dtype is None:
        compute_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    if scale is None:
        scale = head_dim_qk**-0.5
    if rotary_dim:
        default_q, default_k = default_positions(
            batch, num_queries, num_keys, kv_lengths if kv_index is None else None, q.device
        )
        q_cos, q_sin = rotary_tables(default_q if q_positions is None else q_positions, rotary_dim, rotary_base)
        k_cos, k_sin = rotary_tables(default_k if k_positions is None else k_positions, rotary_dim, rotary_base)
        q = rotate(q, q_cos, q_sin, rotary_dim, rotary_interleaved)
        k = rotate(k, k_cos, k_sin, rotary_dim, rotary_interleaved)
    if kv_index is not None:
        rows = kv_index.to(device=k.device, dtype=torch.long)

        def gather(t: Tensor) -> Tensor:
            return t.gather(1, rows[:, :, None, None].expand(-1, -1, *t.shape[2:]))

        k, v = gather(k), gather(v)
        if key_padding_mask is not None:
            key_padding_mask = key_padding_mask.gather(1, rows.to(key_padding_mask.device))
        num_keys = rows.shape[1]

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
    )
    scores = scores.masked_fill(~visible, float("-inf"))
    if num_keys == 0:  # amax over an empty axis is undefined; every row simply sees no key
        scores = scores.new_full((*scores.shape[:-1], 1), float("-inf"))
        v = v.new_zeros((batch, 1, *v.shape[2:]))
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
    if not return_lse:
        return out
    lse = (row_max + torch.log(safe_sum)).masked_fill(empty, float("-inf")).squeeze(-1)
    return out, lse.to(torch.float32 if compute_dtype != torch.float64 else torch.float64)
