"""``perceiver_kernels::cuda_attention_{fwd,bwd}``: the CUDA C++ kernels (``csrc/``) as PyTorch ops.

The schemas (the Triton ops' arguments, so both backends share one contract) and the CUDA
implementations are registered in C++ (``TORCH_LIBRARY_FRAGMENT``) when the extension loads; this module
adds what the contract needs around them, once:

* a CPU implementation of each schema: the PyTorch reference (so the registration is testable, with
  ``opcheck``, on a machine without a GPU);
* fake implementations (``torch.compile``, meta tensors);
* autograd: the forward's gradient is the backward op.

What the CUDA kernels support is decided here too (:func:`unsupported_reason`), before the op runs,
so that ``backend="cuda"`` raises a clear error naming the feature and ``backend="auto"`` can choose
Triton instead.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kernels import configs
from ..problem import AttentionProblem, tracing
from ..reference import attention_reference
from ..rotary import rotate
from . import cuda_extension
from .arguments import op_arguments

OP = "perceiver_kernels::cuda_attention_fwd"
BACKWARD_OP = "perceiver_kernels::cuda_attention_bwd"
MAX_HEAD_DIM = 256
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MIN_CAPABILITY = (8, 0)  # sm_80: mma.sync m16n8k16 with bfloat16, cp.async, ldmatrix
BLOCK_M = BLOCK_N = 64  # the tensor-core forward's tile (csrc/attention_fwd.cuh), for the split heuristic
INT32_MAX = 2**31 - 1
MAX_ROWS = INT32_MAX - 256  # csrc/host.h kMaxRows

_registered = False


def load() -> str | None:
    """Load the extension and register the Python side of the op once; None, or why it is unavailable."""
    global _registered
    reason = cuda_extension.load()
    if reason is None and not _registered:
        torch.library.register_kernel(OP, "cpu", _reference_impl)
        torch.library.register_fake(OP, _fake_impl)
        torch.library.register_kernel(BACKWARD_OP, "cpu", _reference_backward)
        torch.library.register_fake(BACKWARD_OP, _fake_backward)
        torch.library.register_autograd(OP, _backward, setup_context=_setup_context)
        torch.library.register_autograd(BACKWARD_OP, _no_double_backward, setup_context=_no_context)
        _registered = True
    return reason


def unsupported_reason(q: Tensor, k: Tensor, v: Tensor, scale: float | None = None) -> str | None:
    """Why the CUDA kernels cannot run these (already validated) inputs, or None.

    The C++ side chooses between its tensor-core kernels and its SIMT kernels (float32, head dims that are
    not multiples of 8, unaligned rows, axes beyond the tensor-core grid); between them they take every
    float32/float16/bfloat16 input with head dims up to 256 on a GPU of compute capability 8.0 or newer."""
    if q.device.type != "cuda":
        return f"the CUDA backend runs on CUDA tensors, got a {q.device.type} tensor"
    if q.dtype not in DTYPES:
        return f"the CUDA backend computes float32, float16 and bfloat16, not {q.dtype}"
    if scale is not None and not torch.finfo(torch.float32).tiny <= scale <= torch.finfo(torch.float32).max:
        return f"the CUDA kernels need a positive float32 scale, got {scale}"
    dqk, dv = q.shape[-1], v.shape[-1]
    if dqk > MAX_HEAD_DIM or dv > MAX_HEAD_DIM:
        return f"the CUDA kernels take head dims up to {MAX_HEAD_DIM}, got {dqk} and {dv}"
    batch, heads, rows = k.shape[0], k.shape[2], max(q.shape[1], k.shape[1])
    if rows > MAX_ROWS or batch * heads * configs.cdiv(rows, 16) > INT32_MAX or batch * heads * q.shape[1] > INT32_MAX:
        return f"the CUDA kernels count rows and CTAs in int32: B={batch}, H={heads}, max(Nq, Nk)={rows} is too large"
    if tracing():  # no device queries while tracing; the op checks itself
        return None
    if torch.cuda.get_device_capability(q.device) < MIN_CAPABILITY:
        major, minor = torch.cuda.get_device_capability(q.device)
        return f"the CUDA kernels are built for compute capability 8.0 and newer, this GPU has {major}.{minor}"
    return None


def cuda_attention(problem: AttentionProblem) -> tuple[Tensor, Tensor]:
    """Differentiable CUDA attention ``(out, lse)`` of a described problem (supported per
    :func:`unsupported_reason`). ``num_splits`` 0: the split-KV heuristic of ``kernels/configs.py``
    (shared with the Triton forward)."""
    args = op_arguments(problem)
    num_splits = problem.num_splits
    if num_splits == 0:
        base_programs = problem.batch * problem.heads * configs.cdiv(problem.num_queries, BLOCK_M)
        num_splits = configs.num_kv_splits(
            base_programs, configs.cdiv(problem.num_keys, BLOCK_N), configs.sm_count(problem.q.device)
        )
    return torch.ops.perceiver_kernels.cuda_attention_fwd(*args[:12], num_splits, args[13])


def _reference_impl(q, k, v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, rotary_dim, rotary_interleaved,
                    causal, scale, num_splits, keys_after=None):  # fmt: skip
    """The schema on CPU: the reference, rotating by the given cos/sin tables ``(2, 1|B, N, R/2)``."""
    if rotary_dim:
        q = rotate(q, q_rope[0], q_rope[1], rotary_dim, rotary_interleaved)
        k = rotate(k, k_rope[0], k_rope[1], rotary_dim, rotary_interleaved)
    out, lse = attention_reference(
        q, k, v, causal=causal, key_padding_mask=key_padding_mask, kv_lengths=kv_lengths, scale=scale,
        return_lse=True, kv_index=kv_index, keys_after=keys_after,
    )  # fmt: skip
    batch = k.shape[0]
    return out.expand(batch, -1, -1, -1).contiguous(), lse.to(torch.float32).contiguous()


def _fake_impl(q, k, v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, rotary_dim, rotary_interleaved,
               causal, scale, num_splits, keys_after=None):  # fmt: skip
    batch, num_queries, heads = k.shape[0], q.shape[1], q.shape[2]
    out = q.new_empty((batch, num_queries, heads, v.shape[3]))
    return out, q.new_empty((batch, heads, num_queries), dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    q, k, v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, rotary_dim, interleaved, causal, scale, splits = (
        inputs[:13]
    )
    keys_after = inputs[13] if len(inputs) > 13 else None
    ctx.save_for_backward(q, k, v, *output, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, keys_after)
    ctx.num_inputs = len(inputs)
    # The tensor-core backward's dQ pass has the forward's grid (query blocks of 64), so the forward's split
    # of the key axis serves it too.
    ctx.options = (rotary_dim, interleaved, causal, scale, splits)
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, keys_after = ctx.saved_tensors
    if grad_out is None:
        grad_out = torch.zeros_like(out)
    dq, dk, dv = torch.ops.perceiver_kernels.cuda_attention_bwd(
        grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, *ctx.options,
        keys_after,
    )  # fmt: skip
    return dq, dk, dv, *([None] * (ctx.num_inputs - 3))


def _no_context(ctx, inputs, output):
    pass


def _no_double_backward(ctx, *grads):
    raise NotImplementedError("perceiver_kernels: the CUDA backward is not differentiable (no double backward)")


def _reference_backward(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, kv_lengths, kv_index, q_rope,
                        k_rope, rotary_dim, rotary_interleaved, causal, scale, num_splits,
                        keys_after=None):  # fmt: skip
    """The backward schema on CPU: gradients of the reference (``dq`` summed over a broadcast batch).

    ``torch.func.vjp`` rather than ``torch.autograd``: a kernel runs below the autograd dispatch keys,
    where autograd records nothing, while functorch's transforms still differentiate."""

    def forward(q, k, v):
        out_ref, lse_ref = _reference_impl(q, k, v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope,
                                           rotary_dim, rotary_interleaved, causal, scale, num_splits,
                                           keys_after)  # fmt: skip
        return out_ref, torch.where(torch.isfinite(lse_ref), lse_ref, 0.0)  # -inf rows carry no gradient

    (out_ref, lse_ref), vjp = torch.func.vjp(forward, q.detach(), k.detach(), v.detach())
    cotangent_lse = torch.zeros_like(lse_ref) if grad_lse is None else grad_lse.to(lse_ref.dtype)
    return tuple(g.contiguous() for g in vjp((grad_out.to(out_ref.dtype), cotangent_lse)))


def _fake_backward(grad_out, grad_lse, q, k, v, out, lse, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope,
                   rotary_dim, rotary_interleaved, causal, scale, num_splits, keys_after=None):  # fmt: skip
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) for t in (q, k, v))
