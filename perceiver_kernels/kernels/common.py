"""Pieces shared by the forward and backward Triton kernels."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def _visible(
    query_idx,
    key_idx,
    key_end,
    causal_offset,
    CAUSAL: tl.constexpr,
):
    """Bool tile: which (query, key) pairs take part, before key padding.

    ``query_idx`` and ``key_idx`` come shaped for broadcasting (``[:, None]`` and ``[None, :]``, or
    the transpose), so the forward and the transposed backward share this. ``key_end`` folds ``Nk``,
    ``kv_lengths[b]`` and a split's end; ``causal_offset`` is ``L_b - Nq`` (bottom-right alignment).
    """
    visible = (key_idx < key_end) & (query_idx >= 0)
    if CAUSAL:
        visible = visible & (key_idx <= query_idx + causal_offset)
    return visible


@triton.jit
def _kv_length(KvLen, b, Nk, HAS_KVLEN: tl.constexpr):
    """Valid keys of sample ``b``: ``kv_lengths[b]`` clamped to ``[0, Nk]``, or ``Nk``."""
    kv_len = Nk
    if HAS_KVLEN:
        kv_len = tl.minimum(tl.maximum(tl.load(KvLen + b).to(tl.int32), 0), Nk)
    return kv_len


@triton.jit
def _split_key_range(
    pid_m, split, keys_per_split, kv_len, causal_offset,
    CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Key range of one (query block, key split) program: ``[lo, hi)`` holds every key some row
    may see, ``key_end`` is where valid keys of this split end, and keys in ``[lo, full_end)`` (whole
    blocks) are visible to every row of the block, so they need no index mask."""
    lo = split * keys_per_split
    key_end = tl.minimum(lo + keys_per_split, kv_len)
    hi = key_end
    full_end = key_end
    if CAUSAL:
        # Row i sees keys j <= i + causal_offset: the block's last row bounds hi, its first full_end.
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + causal_offset)
        full_end = tl.minimum(full_end, pid_m * BLOCK_M + causal_offset + 1)
    full_end = tl.maximum(lo + ((full_end - lo) // BLOCK_N) * BLOCK_N, lo)
    full_end = tl.minimum(full_end, hi)
    return lo, key_end, hi, full_end


@triton.jit
def _key_kept(pad_row, offs_n, key_end, stride_pn):
    """1-D bool over keys: not padded (``key_padding_mask`` is False). Out-of-range keys count as padded."""
    is_pad = tl.load(pad_row + offs_n.to(tl.int64) * stride_pn, mask=offs_n < key_end, other=1)
    return is_pad == 0


@triton.jit
def _scores(
    a, a_base, b_base, offs_a, offs_b, a_mask, b_mask, stride_a, stride_b, HEAD_DIM,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """``A B^T`` of shape ``(BLOCK_A, BLOCK_B)`` for row blocks of two ``(rows, HEAD_DIM)`` matrices.

    With one head-dim chunk ``a`` is the preloaded ``A`` tile (it stays in registers across the
    caller's loop) and only ``B`` is loaded; with several, both are loaded chunk by chunk.
    """
    if NUM_D == 1:
        offs_d = tl.arange(0, BLOCK_D)
        b_t = tl.load(
            b_base + offs_b[None, :].to(tl.int64) * stride_b + offs_d[:, None],
            mask=b_mask[None, :] & (offs_d[:, None] < HEAD_DIM),
            other=0.0,
        )
        return tl.dot(a, b_t, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    s = tl.zeros([BLOCK_A, BLOCK_B], ACC_DTYPE)
    for c in range(NUM_D):
        offs_d = c * BLOCK_D + tl.arange(0, BLOCK_D)
        a_c = tl.load(
            a_base + offs_a[:, None].to(tl.int64) * stride_a + offs_d[None, :],
            mask=a_mask[:, None] & (offs_d[None, :] < HEAD_DIM),
            other=0.0,
        )
        b_t = tl.load(
            b_base + offs_b[None, :].to(tl.int64) * stride_b + offs_d[:, None],
            mask=b_mask[None, :] & (offs_d[:, None] < HEAD_DIM),
            other=0.0,
        )
        s += tl.dot(a_c, b_t, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return s


@triton.jit
def _load_rows(base, offs_rows, row_mask, stride_row, offs_d, HEAD_DIM):
    """Load a ``(rows, BLOCK_D)`` tile of a ``(rows, HEAD_DIM)`` matrix, zeros outside."""
    return tl.load(
        base + offs_rows[:, None].to(tl.int64) * stride_row + offs_d[None, :],
        mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )


def with_head_dim(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``x`` with its last dim zero-padded to ``head_dim`` and 16-element aligned strides (a copy
    only when needed; see ``configs.aligned_head_dim``)."""
    aligned = all(stride % 16 == 0 for size, stride in zip(x.shape[:-1], x.stride()[:-1], strict=True) if size > 1)
    if x.shape[-1] == head_dim and aligned:
        return x
    return torch.nn.functional.pad(x, (0, head_dim - x.shape[-1])).contiguous()


def mask_args(
    like: torch.Tensor, key_padding_mask: torch.Tensor | None, kv_lengths: torch.Tensor | None
) -> tuple[torch.Tensor, int, int, torch.Tensor]:
    """Kernel arguments for the optional masks: ``(padding as uint8, its two strides, lengths)``,
    with empty placeholders (never read: HAS_PAD / HAS_KVLEN are off) for what is absent."""
    empty = like.new_empty(0)
    if key_padding_mask is None:
        pad, stride_b, stride_n = empty, 0, 0
    else:
        pad, (stride_b, stride_n) = key_padding_mask.view(torch.uint8), key_padding_mask.stride()
    return pad, stride_b, stride_n, kv_lengths if kv_lengths is not None else empty


def dot_precision(dtype: torch.dtype) -> str:
    # float32 must be computed at float32 accuracy: never let tl.dot fall back to TF32 silently.
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32
