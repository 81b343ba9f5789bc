"""Attention over inputs sharded across ranks (``torch.distributed``): Perceiver's keys outgrow a GPU long
before its latents do, so each rank attends its own key shard and the ranks exchange only the small
``(out, lse)`` partials.

- :func:`merge_attention`: the exact, -inf safe, differentiable merge of partial attentions (one process).
- :func:`sharded_attention`: ``pk.attention`` over the concatenation of all ranks' keys.
- :class:`ShardPlan`, :func:`shard_sequence`: which contiguous rows each rank holds (Perceiver AR's latents
  kept together on the last rank).

The models take a ``context_group`` and do the sharding themselves (``perceiver_kernels.models``).
"""

from .merge import merge_attention, merge_weights
from .plan import ShardPlan, shard_sequence
from .sharded import sharded_attention

__all__ = ["ShardPlan", "merge_attention", "merge_weights", "shard_sequence", "sharded_attention"]
