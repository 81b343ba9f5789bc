"""``perceiver_kernels::triton_attention_{fwd,bwd}``: the Triton kernels as ``torch.library`` custom ops.

Registered with ``custom_op`` + ``register_fake`` + ``register_autograd`` so that ``torch.compile``
traces through them without a graph break and ``opcheck`` passes (``triton_op`` cannot be fake-traced
under the Triton interpreter). The kernel modules are imported on first use, not at import time:
``@triton.jit`` reads ``TRITON_INTERPRET`` when a kernel is defined, so deferring lets the command line
switch the interpreter on, and keeps ``import perceiver_kernels`` free of any GPU or driver probe.

Inputs are validated by ``perceiver_kernels.functional``; these ops assume valid arguments.
"""

import torch
from torch import Tensor

from ..kernels import configs
from ..rotary import default_positions, rotary_tables


@torch.library.custom_op("perceiver_kernels::triton_attention_fwd", mutates_args=())
def triton_attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    key_padding_mask: Tensor | None,
    kv_lengths: Tensor | None,
    kv_index: Tensor | None,
    q_rope: Tensor | None,
    k_rope: Tensor | None,
    rotary_dim: int,
    rotary_interleaved: bool,
    causal: bool,
    scale: float,
    num_splits: int,
) -> tuple[Tensor, Tensor]:
    """``q (Bq, Nq, H, Dqk)``, ``k (B, Nk, H, Dqk)``, ``v (B, Nk, H, Dv)`` -> ``out (B, Nq, H, Dv)``,
    ``lse (B, H, Nq)``. ``kv_index (B, Nk')`` gathers key rows; ``q_rope``/``k_rope`` are the
    ``(2, 1 or B, N, rotary_dim / 2)`` cos/sin tables of the queries and the (original) keys.
    ``num_splits`` 0 lets the launcher choose the split-KV factor."""
    from ..kernels.attention_fwd import attention_forward

    batch, num_queries, heads = k.shape[0], q.shape[1], q.shape[2]
    if batch == 0 or num_queries == 0 or heads == 0:
        return _empty_outputs(q, k, v)
    rope = _rope(q_rope, k_rope, rotary_dim, rotary_interleaved)
    return attention_forward(
        q, k, v, key_padding_mask, kv_lengths, causal, scale, num_splits, kv_index=kv_index, rope=rope
    )


def _rope(q_rope, k_rope, rotary_dim, interleaved):
    from ..kernels.common import Rope

    return Rope(q_rope, k_rope, rotary_dim, interleaved) if rotary_dim else None


@triton_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, rotary_dim, rotary_interleaved, causal, scale,
      num_splits):  # fmt: skip
    return _empty_outputs(q, k, v)


def _empty_outputs(q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
    batch, heads, num_queries = k.shape[0], q.shape[2], q.shape[1]
    out = q.new_empty((batch, num_queries, heads, v.shape[3]))
    lse = q.new_empty((batch, heads, num_queries), dtype=configs.stats_dtype(q.dtype))
    return out, lse


@torch.library.custom_op("perceiver_kernels::triton_attention_bwd", mutates_args=())
def triton_attention_bwd(
    grad_out: Tensor,
    grad_lse: Tensor | None,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    key_padding_mask: Tensor | None,
    kv_lengths: Tensor | None,
    kv_index: Tensor | None,
    q_rope: Tensor | None,
    k_rope: Tensor | None,
    rotary_dim: int,
    rotary_interleaved: bool,
    causal: bool,
    scale: float,
    num_splits: int,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` shaped like ``(q, k, v)``; ``dq`` is summed over the batch for a
    broadcast batch-1 query. ``grad_lse`` is the gradient flowing into the returned lse, or None."""
    from ..kernels.attention_bwd import attention_backward

    num_keys = k.shape[1] if kv_index is None else kv_index.shape[1]
    if out.numel() == 0 or num_keys == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if grad_out.stride(-1) != 1:  # e.g. the all-zero-stride gradient of out.sum()
        grad_out = grad_out.contiguous()
    if grad_lse is not None:
        grad_lse = grad_lse.contiguous()
    rope = _rope(q_rope, k_rope, rotary_dim, rotary_interleaved)
    return attention_backward(
        grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, kv_lengths, causal, scale, num_splits,
        kv_index=kv_index, rope=rope,
    )  # fmt: skip


@triton_attention_bwd.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, rotary_dim,
      rotary_interleaved, causal, scale, num_splits):  # fmt: skip
    # The kernels return fresh contiguous gradients whatever the inputs' strides.
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, rotary_dim, interleaved, causal, scale, splits = (
        inputs
    )
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope)
    ctx.rotary_dim = rotary_dim
    ctx.rotary_interleaved = interleaved
    ctx.causal = causal
    ctx.scale = scale
    ctx.num_splits = splits
    # Unused outputs arrive as None instead of materialised zeros (no zero-filled dlse pass).
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = triton_attention_bwd(
        grad_out,
        grad_lse,
        q,
        k,
        v,
        out,
        lse,
        key_padding_mask,
        kv_lengths,
        kv_index,
        q_rope,
        k_rope,
        ctx.rotary_dim,
        ctx.rotary_interleaved,
        ctx.causal,
        ctx.scale,
        ctx.num_splits,
    )
    return dq, dk, dv, *([None] * 10)


triton_attention_fwd.register_autograd(_backward, setup_context=_setup_context)


def rotary_inputs(
    q: Tensor,
    k: Tensor,
    rotary_dim: int,
    q_positions: Tensor | None,
    k_positions: Tensor | None,
    rotary_base: float,
    kv_lengths: Tensor | None,
    kv_index: Tensor | None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    """``(q, q_rope, k_rope)`` for the ops (Triton and CUDA alike): the ``(2, 1 or B, N, rotary_dim / 2)``
    float32 cos/sin tables of the queries and the (original) keys, default positions filled in; ``q``
    expanded (a view) when a broadcast query meets per-sample positions, so that each sample's dQ is
    rotated back before autograd sums them. Without rotary: ``(q, None, None)``."""
    if not rotary_dim:
        return q, None, None
    default_q = default_k = None
    if q_positions is None or k_positions is None:
        default_q, default_k = default_positions(
            k.shape[0], q.shape[1], k.shape[1], kv_lengths if kv_index is None else None, q.device
        )
    q_rope, k_rope = (
        torch.stack(rotary_tables(default if given is None else given, rotary_dim, rotary_base))
        for default, given in ((default_q, q_positions), (default_k, k_positions))
    )
    if q.shape[0] == 1 and q_rope.shape[1] > 1:
        q = q.expand(k.shape[0], -1, -1, -1)
    return q, q_rope, k_rope


def triton_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    causal: bool = False,
    key_padding_mask: Tensor | None = None,
    kv_lengths: Tensor | None = None,
    scale: float,
    num_splits: int = 0,
    rotary_dim: int = 0,
    q_positions: Tensor | None = None,
    k_positions: Tensor | None = None,
    rotary_base: float = 10000.0,
    rotary_interleaved: bool = True,
    kv_index: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Differentiable Triton attention returning ``(out, lse)``; arguments as in ``pk.attention``
    (already validated). Builds the rotary tables and calls the custom op.

    ``num_splits`` forces the number of key-axis splits of the forward and of the backward's dQ pass
    (0 = choose from the SM count); tests use it to exercise split-KV on the CPU interpreter.
    """
    q, q_rope, k_rope = rotary_inputs(q, k, rotary_dim, q_positions, k_positions, rotary_base, kv_lengths, kv_index)
    return torch.ops.perceiver_kernels.triton_attention_fwd(
        q, k, v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, rotary_dim, rotary_interleaved, causal,
        float(scale), num_splits,
    )  # fmt: skip
