"""The Triton kernels behind ``pk.attention``: a thin eager path, and ``torch.library`` custom ops for
``torch.compile``.

Eager calls (the common case) go straight to the launchers: without gradients a plain function call,
with gradients one ``torch.autograd.Function``. Inside ``torch.compile`` the same launchers run behind
the custom ops ``perceiver_kernels::triton_attention_{fwd,bwd}`` (``custom_op`` + ``register_fake`` +
``register_autograd``), which dynamo traces without a graph break and which pass ``opcheck``. Both
paths share one ``setup_context`` and one backward. Why two paths: the custom op's Python dispatch
costs more host time than the kernels' own launches on small problems (numbers in docs/DESIGN.md,
"Host path").

The kernel modules are imported on first use, not at import time: ``@triton.jit`` reads
``TRITON_INTERPRET`` when a kernel is defined, so deferring lets the command line switch the
interpreter on, and keeps ``import perceiver_kernels`` free of any GPU or driver probe.

Inputs are validated by ``perceiver_kernels.problem.describe``; these functions assume valid arguments.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import configs
from ..problem import AttentionProblem, tracing
from .arguments import op_arguments

_launchers = None


def launchers():
    """``(attention_forward, attention_backward)``, imported on first use (see the module docstring)."""
    global _launchers
    if _launchers is None:
        from ..kernels.attention_bwd import attention_backward
        from ..kernels.attention_fwd import attention_forward

        _launchers = attention_forward, attention_backward
    return _launchers


def triton_attention(problem: AttentionProblem) -> tuple[Tensor, Tensor]:
    """``(out, lse)`` of a described problem on the Triton kernels, differentiable."""
    args = op_arguments(problem)
    if tracing():
        return torch.ops.perceiver_kernels.triton_attention_fwd(*args)
    q, k, v = args[:3]
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad):
        return _EagerAttention.apply(*args)
    return launchers()[0](*args[:13], keys_after=args[13])


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
    keys_after: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``q (Bq, Nq, H, Dqk)``, ``k (B, Nk, H, Dqk)``, ``v (B, Nk, H, Dv)`` -> ``out (B, Nq, H, Dv)``,
    ``lse (B, H, Nq)``. ``kv_index (B, Nk')`` gathers key rows; ``q_rope``/``k_rope`` are the
    ``(2, 1 or B, N, rotary_dim / 2)`` cos/sin tables of the queries and the (original) keys.
    ``num_splits`` 0 lets the launcher choose the split-KV factor. ``keys_after (B,)`` moves the causal
    diagonal by the keys of the sequence that follow these."""
    return launchers()[0](
        q, k, v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, rotary_dim, rotary_interleaved, causal,
        scale, num_splits, keys_after=keys_after,
    )  # fmt: skip


@triton_attention_fwd.register_fake
def _(q, k, v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, rotary_dim, rotary_interleaved, causal, scale,
      num_splits, keys_after=None):  # fmt: skip
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
    keys_after: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Gradients ``(dq, dk, dv)`` shaped and laid out like ``(q, k, v)`` (``torch.empty_like``); ``dq``
    is summed over the batch for a broadcast batch-1 query. ``grad_lse`` is the gradient flowing into the
    returned lse, or None."""
    return launchers()[1](
        grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, rotary_dim,
        rotary_interleaved, causal, scale, num_splits, keys_after=keys_after,
    )  # fmt: skip


@triton_attention_bwd.register_fake
def _(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, rotary_dim,
      rotary_interleaved, causal, scale, num_splits, keys_after=None):  # fmt: skip
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, rotary_dim, interleaved, causal, scale, splits = (
        inputs[:13]
    )
    keys_after = inputs[13] if len(inputs) > 13 else None
    ctx.save_for_backward(q, k, v, *output, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, keys_after)
    ctx.options = (rotary_dim, interleaved, causal, scale, splits)
    ctx.num_inputs = len(inputs)
    # Unused outputs arrive as None instead of materialised zeros (no zero-filled dlse pass).
    ctx.set_materialize_grads(False)


def _gradients(ctx, grad_out, grad_lse, backward):
    q, k, v, out, lse, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, keys_after = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    elif grad_out.stride(-1) != 1:  # e.g. the all-zero-stride gradient of out.sum()
        grad_out = grad_out.contiguous()
    if grad_lse is not None and grad_lse.stride(-1) != 1:
        grad_lse = grad_lse.contiguous()
    dq, dk, dv = backward(
        grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, *ctx.options,
        keys_after=keys_after,
    )  # fmt: skip
    return dq, dk, dv, *([None] * (ctx.num_inputs - 3))


def _compiled_backward(ctx, grad_out, grad_lse):
    return _gradients(ctx, grad_out, grad_lse, torch.ops.perceiver_kernels.triton_attention_bwd)


triton_attention_fwd.register_autograd(_compiled_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The eager twin of the custom op's autograd: the same context and backward, without the dispatcher.

    Written in the form with ``ctx`` in ``forward``: with a separate ``setup_context``, ``apply`` binds
    the arguments with ``inspect.signature`` on every call (measured: ~15% of a small fwd+bwd's host
    time). functorch transforms (``torch.func``) need that form; the custom op's ``register_autograd``
    does not have it either, so neither path supports them."""

    @staticmethod
    def forward(ctx, *args):
        output = launchers()[0](*args[:13], keys_after=args[13])
        _setup_context(ctx, args, output)
        return output

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        return _gradients(ctx, grad_out, grad_lse, launchers()[1])
