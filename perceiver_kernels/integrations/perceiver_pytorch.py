"""lucidrains' ``perceiver-pytorch``: ``Attention`` of ``Perceiver`` and ``PerceiverIO``."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from ..functional import attention
from .base import TRAINING_DROPOUT, Fallback, Integration, dtype_problem, training_dropout

if TYPE_CHECKING:
    from .core import PatchedForward


def _perceiver_pytorch_forward(patch: PatchedForward, arguments: dict[str, Any]):
    """perceiver-pytorch's ``Attention.forward(x, context=None, mask=None, inverted_attention=False)``.

    ``x (B, Nq, query_dim)`` attends to ``context (B, Nk, context_dim)`` (default ``x``); ``mask`` is
    bool with True = *keep*, shaped ``(B, ...)`` over the context's positions (flattened, as they do).
    With ``queries_contribute_kv`` the queries join the keys (and the mask) in front of the context.
    Heads split channels head-major; scores are multiplied by ``module.scale``. Returns ``(B, Nq, query_dim)``.
    """
    module = patch.module
    x, context, mask = arguments["x"], arguments.get("context"), arguments.get("mask")
    if arguments.get("inverted_attention"):
        return Fallback("inverted_attention=True")
    if dropped := training_dropout(module):
        return dropped
    has_context = context is not None
    joined = getattr(module, "queries_contribute_kv", False) and has_context
    kv = torch.cat((x, context), dim=1) if joined else (context if has_context else x)
    batch, num_keys = kv.shape[0], kv.shape[1]
    if x.shape[0] != batch:
        return Fallback("queries and context with different batch sizes")
    keep = None
    if mask is not None:
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool or mask.dim() < 2 or (joined and mask.dim() != 2):
            return Fallback("a mask that is not a bool (B, ...) tensor")
        keep = mask.flatten(1)
        if joined:
            keep = torch.cat((keep.new_ones(batch, x.shape[1]), keep), dim=1)
        if tuple(keep.shape) != (batch, num_keys):
            return Fallback(f"a mask of shape {tuple(mask.shape)} for {num_keys} keys")

    heads = module.heads
    q = module.to_q(x).unflatten(-1, (heads, -1))
    k, v = (t.unflatten(-1, (heads, -1)) for t in module.to_kv(kv).chunk(2, dim=-1))
    if problem := dtype_problem(q, k, v):
        return problem
    padding = None if keep is None else ~keep
    out = attention(q, k, v, key_padding_mask=padding, scale=float(module.scale), backend=patch.backend)
    if keep is not None:
        # perceiver-pytorch fills masked scores with -finfo.max, not -inf: a sample with every key masked
        # gets the plain average of its values (the softmax of equal scores), where our kernels give zeros.
        # Reproduced with a select rather than a data-dependent branch (no device synchronisation).
        nothing_kept = ~keep.any(dim=1)
        out = torch.where(nothing_kept[:, None, None, None], v.mean(dim=1, keepdim=True), out)
    return module.to_out(out.flatten(2))


def _perceiver_pytorch_describe(module: nn.Module) -> str:
    extra = ", queries join the keys" if getattr(module, "queries_contribute_kv", False) else ""
    return f"{type(module).__name__} ({module.heads} head(s){extra})"


INTEGRATIONS = (
    Integration(
        key="perceiver-pytorch",
        name="perceiver-pytorch",
        classes=(("perceiver_pytorch.perceiver_pytorch", "Attention"), ("perceiver_pytorch.perceiver_io", "Attention")),
        forward=_perceiver_pytorch_forward,
        describe=_perceiver_pytorch_describe,
        fallbacks=f"inverted_attention=True; {TRAINING_DROPOUT}; masks that are not bool (B, ...) over the keys",
        required=("to_q", "to_kv", "to_out", "heads", "scale"),
    ),
)
