"""Sum-and-rotate: the one elementwise Triton kernel besides attention.

``out = R(sum_p parts[p])``: the sum of float32 slices, rotated (or turned back) by rotary tables, cast
to ``out``'s dtype and written in ``out``'s layout. It serves

* ``pk.apply_rotary`` (one part, rotated forward): callers that keep a KV cache of rotated keys;
* the attention backward, whose float32 buffers become gradients here in one pass: the split dQ
  partials (summed, and for a broadcast query summed over the batch too), and with rotary dQ and dK,
  computed in the rotated frame and turned back (the inverse rotation is the transpose).

The rotation is ``common._rotate_values``, the same arithmetic the attention kernels apply on load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .common import _rotary_pairs, _rotate_values, acc_dtype
from .launch import launch


@triton.jit
def _sum_rotate_kernel(
    Parts, Out, Rope,
    stride_pp, stride_pb, stride_pn, stride_ph,
    stride_ob, stride_on, stride_oh,
    stride_rs, stride_rb, stride_rn,
    H, N, D, ROT_DIM, num_parts, num_n_blocks,
    ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_N rows of one (batch, head), every channel. A rotated channel needs the sum of
    # its pair partner too, which is summed alongside (the parts are few; their rows are in cache).
    pid = tl.program_id(0)
    pid_n = pid % num_n_blocks
    pid_bh = pid // num_n_blocks
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = offs_n[:, None].to(tl.int64)
    n_mask = offs_n < N
    part_base = Parts + b * stride_pb + h * stride_ph + rows * stride_pn
    for c in range(NUM_D):
        offs_d = c * BLOCK_D + tl.arange(0, BLOCK_D)
        mask = n_mask[:, None] & (offs_d[None, :] < D)
        x = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
        for p in range(num_parts):
            x += tl.load(part_base + p * stride_pp + offs_d[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
        if ROTARY:
            partner, pair, first = _rotary_pairs(offs_d, ROT_DIM, INTERLEAVED)
            rot_mask = n_mask[:, None] & (offs_d < ROT_DIM)[None, :]
            x_partner = tl.zeros([BLOCK_N, BLOCK_D], ACC_DTYPE)
            for p in range(num_parts):
                x_partner += tl.load(part_base + p * stride_pp + partner[None, :], mask=rot_mask, other=0.0).to(
                    ACC_DTYPE
                )
            rope = Rope + b * stride_rb + rows * stride_rn + pair[None, :]
            cos = tl.load(rope, mask=rot_mask, other=1.0).to(ACC_DTYPE)
            sin = tl.load(rope + stride_rs, mask=rot_mask, other=0.0).to(ACC_DTYPE)
            x = _rotate_values(x, x_partner, cos, sin, first, INVERSE)
        out_ptrs = Out + b * stride_ob + h * stride_oh + rows * stride_on + offs_d[None, :]
        tl.store(out_ptrs, x.to(Out.dtype.element_ty), mask=mask)


def sum_and_rotate(
    parts: torch.Tensor,
    out: torch.Tensor,
    table: torch.Tensor | None,
    rotary_dim: int,
    interleaved: bool,
    *,
    inverse: bool,
) -> torch.Tensor:
    """Write ``R(parts.sum(0))`` into ``out`` and return it.

    Args:
        parts: ``(P, B or 1, N, H, D)`` (any strides, last dim contiguous); a batch-1 part is shared by
            every output batch... of one. ``P`` is usually small (split-KV partials, a batch).
        out: ``(B, N, H, D)``, any layout with a contiguous last dim, any float dtype.
        table: float32 cos/sin ``(2, 1 or B, N, rotary_dim / 2)``, or None (sum and cast only).
        inverse: turn back (the transpose: gradients) instead of rotating forward.
    The arithmetic is float32 (float64 for float64 parts).
    """
    num_parts, _, num_rows, heads, head_dim = parts.shape
    batch = out.shape[0]
    if out.numel() == 0:
        return out
    block_n = 64 if configs.targets_gpu(out.device) else 16
    block_d = min(configs.next_power_of_2(max(head_dim, 16)), 128)
    num_n_blocks = configs.cdiv(num_rows, block_n)
    rope = (0, 0, 0)
    if table is not None:
        rope = (table.stride(0), 0 if table.shape[1] == 1 else table.stride(1), table.stride(2))
    launch(
        _sum_rotate_kernel, (num_n_blocks * batch * heads,),
        (parts, out, out if table is None else table,
         parts.stride(0), 0 if parts.shape[1] == 1 else parts.stride(1), parts.stride(2), parts.stride(3),
         *out.stride()[:3], *rope, heads, num_rows, head_dim, rotary_dim if table is not None else 0, num_parts,
         num_n_blocks),
        dict(ROTARY=table is not None and rotary_dim > 0, INTERLEAVED=interleaved, INVERSE=inverse, BLOCK_N=block_n,
             BLOCK_D=block_d, NUM_D=configs.cdiv(head_dim, block_d), ACC_DTYPE=acc_dtype(parts.dtype)),
    )  # fmt: skip
    return out


def rotate(x: torch.Tensor, table: torch.Tensor, rotary_dim: int, interleaved: bool, inverse: bool) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of ``x (B, N, H, D)`` (last dim contiguous) by the float32
    cos/sin ``table (2, 1 or B, N, rotary_dim / 2)``; a new contiguous tensor in ``x``'s dtype (a batch-1
    ``x`` with a per-sample table becomes per-sample)."""
    batch = max(x.shape[0], table.shape[1])
    out = x.new_empty((batch, *x.shape[1:]))
    return sum_and_rotate(x.unsqueeze(0), out, table, rotary_dim, interleaved, inverse=inverse)
