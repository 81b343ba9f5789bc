"""The rotary embedding as its own elementwise Triton kernel.

Used for ``pk.apply_rotary`` (callers that keep a KV cache of already-rotated keys) and by the
attention backward, which computes dQ and dK in the rotated frame and turns them back here. The
rotation itself is ``common._rotate_tile``, the same code the attention kernels apply on load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .common import _load_rows, _rotate_tile, acc_dtype


@triton.jit
def _rotary_kernel(
    X, Out, Rope,
    stride_xb, stride_xn, stride_xh,
    stride_ob, stride_on, stride_oh,
    stride_rs, stride_rb, stride_rn,
    H, N, D, ROT_DIM, num_n_blocks,
    INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_N rows of one (batch, head); the channels past ROT_DIM are copied.
    pid = tl.program_id(0)
    pid_n = pid % num_n_blocks
    pid_bh = pid // num_n_blocks
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < N
    x_base = X + b * stride_xb + h * stride_xh
    rope = Rope + b * stride_rb
    for c in range(NUM_D):
        offs_d = c * BLOCK_D + tl.arange(0, BLOCK_D)
        x = _load_rows(x_base, offs_n, n_mask, stride_xn, offs_d, D)
        x = _rotate_tile(
            x, x_base, offs_n, n_mask, stride_xn, offs_d, rope, stride_rs, stride_rn, ROT_DIM,
            INTERLEAVED, INVERSE, ACC_DTYPE,
        )  # fmt: skip
        out_ptrs = Out + b * stride_ob + h * stride_oh + offs_n[:, None].to(tl.int64) * stride_on + offs_d[None, :]
        tl.store(out_ptrs, x.to(Out.dtype.element_ty), mask=n_mask[:, None] & (offs_d[None, :] < D))


def rotate(
    x: torch.Tensor,
    table: torch.Tensor,
    rotary_dim: int,
    interleaved: bool,
    inverse: bool = False,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Rotate the first ``rotary_dim`` channels of ``x (B, N, H, D)`` (last dim contiguous).

    ``table``: float32 ``(2, 1 or B, N, rotary_dim / 2)`` cos/sin. Returns a new contiguous tensor
    in ``out_dtype`` (default ``x``'s); the arithmetic is float32 (float64 for float64 input).
    """
    batch, num_rows, heads, head_dim = x.shape
    out = torch.empty((batch, num_rows, heads, head_dim), device=x.device, dtype=out_dtype or x.dtype)
    if out.numel() == 0:
        return out
    block_n = 64 if x.device.type == "cuda" else 16
    block_d = min(configs.next_power_of_2(max(head_dim, 16)), 128)
    num_n_blocks = triton.cdiv(num_rows, block_n)
    _rotary_kernel[(num_n_blocks * batch * heads,)](
        x, out, table,
        x.stride(0), x.stride(1), x.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        table.stride(0), 0 if table.shape[1] == 1 else table.stride(1), table.stride(2),
        heads, num_rows, head_dim, rotary_dim, num_n_blocks,
        INTERLEAVED=interleaved, INVERSE=inverse,
        BLOCK_N=block_n, BLOCK_D=block_d, NUM_D=triton.cdiv(head_dim, block_d), ACC_DTYPE=acc_dtype(x.dtype),
    )  # fmt: skip
    return out
