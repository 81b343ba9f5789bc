"""Pieces shared by the forward and backward Triton kernels."""

from __future__ import annotations

from dataclasses import dataclass

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
def _key_kept(pad_row, rows, valid, stride_pn):
    """1-D bool over keys: not padded (``key_padding_mask`` is False) at key rows ``rows``. Keys that
    are not ``valid`` (out of range) count as padded."""
    is_pad = tl.load(pad_row + rows.to(tl.int64) * stride_pn, mask=valid, other=1)
    return is_pad == 0


@triton.jit
def _key_rows(kv_index_row, offs_n, valid, num_rows, HAS_KV_INDEX: tl.constexpr):
    """Rows of k/v (and of the padding mask and key positions) behind gathered key indices
    ``offs_n``: ``kv_index[b, offs_n]`` clamped to ``[0, num_rows)``, or ``offs_n`` itself."""
    if HAS_KV_INDEX:
        rows = tl.load(kv_index_row + offs_n, mask=valid, other=0)
        return tl.minimum(tl.maximum(rows, 0), num_rows - 1)
    return offs_n


@triton.jit
def _rotate_tile(
    x, base, rows, row_mask, stride_row, offs_d, rope, stride_rs, stride_rn, ROT_DIM,
    INTERLEAVED: tl.constexpr, INVERSE: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """Rotary embedding of a ``(rows, BLOCK_D)`` tile ``x`` loaded from ``base`` (channels ``offs_d``).

    Each channel needs its pair partner: it is loaded again from memory (the tile's own cache lines)
    rather than shuffled in registers, which works for both pair layouts and any ``ROT_DIM``. ``rope``
    points at this sample's cos table, ``rope + stride_rs`` at its sin table, one row per position
    row, ``ROT_DIM / 2`` pairs. ``INVERSE`` turns the other way (the transpose, for gradients).
    """
    in_rot = offs_d < ROT_DIM
    if INTERLEAVED:
        first = (offs_d % 2) == 0
        partner = offs_d ^ 1
        pair = offs_d // 2
    else:
        half = ROT_DIM // 2
        first = offs_d < half
        partner = tl.where(first, offs_d + half, offs_d - half)
        pair = tl.where(first, offs_d, offs_d - half)
    mask = row_mask[:, None] & in_rot[None, :]
    r = rows[:, None].to(tl.int64)
    x_partner = tl.load(base + r * stride_row + partner[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    cos = tl.load(rope + r * stride_rn + pair[None, :], mask=mask, other=1.0).to(ACC_DTYPE)
    sin = tl.load(rope + stride_rs + r * stride_rn + pair[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    sign = tl.where(first, -1.0, 1.0)
    if INVERSE:
        sign = -sign
    return (x.to(ACC_DTYPE) * cos + sign[None, :].to(ACC_DTYPE) * x_partner * sin).to(x.dtype)


@triton.jit
def _load_tile(
    base, rows, row_mask, stride_row, offs_d, HEAD_DIM, rope, stride_rs, stride_rn, ROT_DIM,
    ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """``_load_rows``, then the rotary embedding when ``ROTARY`` (q and k tiles)."""
    x = _load_rows(base, rows, row_mask, stride_row, offs_d, HEAD_DIM)
    if ROTARY:
        x = _rotate_tile(
            x, base, rows, row_mask, stride_row, offs_d, rope, stride_rs, stride_rn, ROT_DIM, INTERLEAVED, False,
            ACC_DTYPE,
        )  # fmt: skip
    return x


@triton.jit
def _scores(
    a, a_base, b_base, rows_a, rows_b, a_mask, b_mask, stride_a, stride_b, HEAD_DIM,
    a_rope, a_stride_rs, a_stride_rn, b_rope, b_stride_rs, b_stride_rn, ROT_DIM,
    BLOCK_A: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr, NUM_D: tl.constexpr,
    ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """``A B^T`` of shape ``(BLOCK_A, BLOCK_B)`` for row blocks (memory rows ``rows_a``, ``rows_b``)
    of two ``(rows, HEAD_DIM)`` matrices, both rotated when ``ROTARY`` (q and k).

    With one head-dim chunk ``a`` is the preloaded (already rotated) ``A`` tile, which stays in
    registers across the caller's loop, and only ``B`` is loaded; with several, both are loaded
    chunk by chunk.
    """
    if NUM_D == 1:
        offs_d = tl.arange(0, BLOCK_D)
        if ROTARY:
            b = _load_tile(
                b_base, rows_b, b_mask, stride_b, offs_d, HEAD_DIM, b_rope, b_stride_rs, b_stride_rn, ROT_DIM,
                True, INTERLEAVED, ACC_DTYPE,
            )  # fmt: skip
            b_t = tl.trans(b)
        else:
            b_t = tl.load(
                b_base + rows_b[None, :].to(tl.int64) * stride_b + offs_d[:, None],
                mask=b_mask[None, :] & (offs_d[:, None] < HEAD_DIM),
                other=0.0,
            )
        return tl.dot(a, b_t, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    s = tl.zeros([BLOCK_A, BLOCK_B], ACC_DTYPE)
    for c in range(NUM_D):
        offs_d = c * BLOCK_D + tl.arange(0, BLOCK_D)
        a_c = _load_tile(
            a_base, rows_a, a_mask, stride_a, offs_d, HEAD_DIM, a_rope, a_stride_rs, a_stride_rn, ROT_DIM,
            ROTARY, INTERLEAVED, ACC_DTYPE,
        )  # fmt: skip
        b_c = _load_tile(
            b_base, rows_b, b_mask, stride_b, offs_d, HEAD_DIM, b_rope, b_stride_rs, b_stride_rn, ROT_DIM,
            ROTARY, INTERLEAVED, ACC_DTYPE,
        )  # fmt: skip
        s += tl.dot(a_c, tl.trans(b_c), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return s


@triton.jit
def _load_rows(base, offs_rows, row_mask, stride_row, offs_d, HEAD_DIM):
    """Load a ``(rows, BLOCK_D)`` tile of a ``(rows, HEAD_DIM)`` matrix, zeros outside."""
    return tl.load(
        base + offs_rows[:, None].to(tl.int64) * stride_row + offs_d[None, :],
        mask=row_mask[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )


@dataclass(frozen=True)
class Rope:
    """Rotary tables for one call: ``q (2, 1 or B, Nq, R/2)`` and ``k (2, 1 or B, Nk, R/2)`` float32
    cos/sin (``perceiver_kernels.rotary.rotary_tables``), ``R = rotary_dim``, and the pair layout."""

    q: torch.Tensor
    k: torch.Tensor
    rotary_dim: int
    interleaved: bool


def rope_args(rope: Rope | None, which: str, like: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """Kernel arguments ``(table, stride to sin, batch stride, row stride)`` of one side (``"q"`` or
    ``"k"``); a placeholder (never read: ROTARY is off) without rotary. A batch-1 table gets batch
    stride 0 (shared by the batch)."""
    if rope is None:
        return like.new_empty(0), 0, 0, 0
    table = getattr(rope, which)
    return table, table.stride(0), 0 if table.shape[1] == 1 else table.stride(1), table.stride(2)


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
