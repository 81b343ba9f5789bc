"""Attention over inputs sharded across ranks (``torch.distributed``): Perceiver's keys outgrow a GPU long
before its latents do, so each rank attends its own key shard and the ranks exchange only the small
``(out, lse)`` partials.

- :func:`merge_attention`: the exact, -inf safe, differentiable merge of partial attentions (one process).
- :func:`sharded_attention`: ``pk.attention`` over the concatenation of all ranks' keys.
"""

from .merge import merge_attention, merge_weights
from .sharded import sharded_attention

__all__ = ["merge_attention", "merge_weights", "sharded_attention"]
