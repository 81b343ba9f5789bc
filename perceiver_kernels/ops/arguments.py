"""A problem as the attention ops take it: the one translation shared by the Triton and CUDA ops."""

from __future__ import annotations

from ..problem import AttentionProblem
from ..rotary import rope_tables


def op_arguments(problem: AttentionProblem) -> tuple:
    """The arguments of ``perceiver_kernels::{triton,cuda}_attention_fwd`` for a described problem:
    ``(q, k, v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, rotary_dim, rotary_interleaved,
    causal, scale, num_splits, keys_after)``.

    With rotary, ``q_rope``/``k_rope`` are the float32 cos/sin tables ``(2, 1 or B, N, rotary_dim / 2)``
    of the queries and of the (original) key rows (``rotary.rope_tables``), and a broadcast batch-1
    query that meets per-sample positions is expanded (a view), so that each sample's dQ is rotated
    back before autograd sums them. Without rotary both tables are None.
    """
    q, k, v, causal, key_padding_mask, kv_lengths, kv_index, scale, rotary_dim = problem[:9]
    q_rope = k_rope = None
    if rotary_dim:
        q_rope, k_rope = rope_tables(problem)
        if q.shape[0] == 1 and q_rope.shape[1] > 1:
            q = q.expand(problem.batch, -1, -1, -1)
    return (
        q, k, v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, rotary_dim, problem.rotary_interleaved,
        causal, scale, problem.num_splits, problem.keys_after,
    )  # fmt: skip
