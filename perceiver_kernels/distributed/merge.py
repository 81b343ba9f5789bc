"""The exact merge of partial attentions over disjoint key sets (shards, splits).

Each part ``r`` attended to its own keys: ``out_r`` (normalised over those keys) and ``lse_r`` (their
log-sum-exp of scaled scores). Over the union of the keys, ``lse = log sum_r exp(lse_r)`` and
``out = sum_r exp(lse_r - lse) * out_r``, computed in float32. A part that saw no key of a row has
``lse_r = -inf`` and weight 0; a row that no part saw keeps ``out = 0`` and ``lse = -inf``, never NaN
(the guarded maximum below is the same as the Triton split-KV merge's, ``kernels/attention_fwd.py``
``_merge_splits_kernel``; both are tested against the reference: forced splits there, per-chunk partials
here).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor


def merge_weights(lses: Tensor) -> tuple[Tensor, Tensor]:
    """``lses (R, B, H, Nq)`` -> ``(lse (B, H, Nq), weights (R, B, H, Nq))``, float32 (float64 for float64),
    -inf safe and differentiable: ``weights[r] = exp(lses[r] - lse)``, 0 where ``lses[r] = -inf`` and for
    rows no part saw."""
    lses = lses if lses.dtype == torch.float64 else lses.float()
    top = lses.amax(dim=0)
    # Rows no part saw: every lse_r is -inf. Shift by 0 there (exp(-inf - 0) = 0) instead of by -inf (NaN).
    top = torch.where(top == float("-inf"), torch.zeros_like(top), top).detach()
    total = torch.exp(lses - top).sum(dim=0)
    empty = total == 0
    lse = torch.where(empty, float("-inf"), top + torch.log(torch.where(empty, torch.ones_like(total), total)))
    lse_safe = torch.where(empty, torch.zeros_like(lse), lse)
    return lse, torch.exp(lses - lse_safe)


def merge_attention(outs: Sequence[Tensor] | Tensor, lses: Sequence[Tensor] | Tensor) -> tuple[Tensor, Tensor]:
    """Merge partial attentions of one query set over disjoint key sets.

    Args:
        outs: ``R`` tensors ``(B, Nq, H, Dv)`` (or one ``(R, B, Nq, H, Dv)``), each normalised over its keys,
            as ``pk.attention`` returns them (zeros for rows that saw no key).
        lses: ``R`` tensors ``(B, H, Nq)`` (or one ``(R, B, H, Nq)``), their log-sum-exps (``-inf``: no key).

    Returns:
        ``out (B, Nq, H, Dv)`` in the parts' dtype and ``lse (B, H, Nq)`` float32: attention over the union of
        the keys. Differentiable in every part (float64 parts are merged, and their lse returned, in float64).
    """
    outs = torch.stack(list(outs)) if not isinstance(outs, Tensor) else outs
    lses = torch.stack(list(lses)) if not isinstance(lses, Tensor) else lses
    if outs.dim() != 5 or lses.dim() != 4 or outs.shape[0] != lses.shape[0]:
        raise ValueError(
            f"outs must be R x (B, Nq, H, Dv) and lses R x (B, H, Nq), got {tuple(outs.shape)} and {tuple(lses.shape)}"
        )
    num_parts, batch, num_queries, heads, _ = outs.shape
    if tuple(lses.shape) != (num_parts, batch, heads, num_queries):
        raise ValueError(f"lses {tuple(lses.shape)} do not match outs {tuple(outs.shape)}: expected "
                         f"{(num_parts, batch, heads, num_queries)}")  # fmt: skip
    compute = torch.float64 if torch.float64 in (outs.dtype, lses.dtype) else torch.float32
    lse, weights = merge_weights(lses.to(compute))
    weights = weights.transpose(-1, -2).unsqueeze(-1)  # (R, B, Nq, H, 1)
    out = (weights * outs.to(compute)).sum(dim=0)
    return out.to(outs.dtype), lse
