"""``perceiver_kernels::rotary``: the Triton rotary kernel as a ``torch.library`` custom op.

Backs ``pk.apply_rotary`` for callers that keep a KV cache of already-rotated keys. The gradient
of a rotation is the inverse rotation, so the backward is the same op with ``inverse`` flipped.
"""

import torch
from torch import Tensor


@torch.library.custom_op("perceiver_kernels::rotary", mutates_args=())
def rotary(x: Tensor, table: Tensor, rotary_dim: int, interleaved: bool, inverse: bool) -> Tensor:
    """Rotate the first ``rotary_dim`` channels of ``x (B, N, H, D)`` by the float32 cos/sin
    ``table (2, 1 or B, N, rotary_dim / 2)``; a new contiguous tensor in ``x``'s dtype."""
    from ..kernels.rotary import rotate

    return rotate(x, table, rotary_dim, interleaved, inverse)


@rotary.register_fake
def _(x, table, rotary_dim, interleaved, inverse):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    _, table, rotary_dim, interleaved, inverse = inputs
    ctx.save_for_backward(table)
    ctx.rotary_dim, ctx.interleaved, ctx.inverse = rotary_dim, interleaved, inverse


def _backward(ctx, grad):
    (table,) = ctx.saved_tensors
    if grad.stride(-1) != 1:
        grad = grad.contiguous()
    return rotary(grad, table, ctx.rotary_dim, ctx.interleaved, not ctx.inverse), None, None, None, None


rotary.register_autograd(_backward, setup_context=_setup_context)
