"""Pieces shared by the forward and backward Triton kernels."""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import configs, interpreter

if configs.interpreter_enabled():
    interpreter.install()

LOG2E = 1.4426950408889634


@triton.jit
def causal_offset(length, num_queries):
    """The causal diagonal, bottom-right aligned: query ``i`` sees key ``j`` iff ``j <= i + offset``,
    ``offset = L_b - Nq`` (the same helper as ``perceiver_kernels.problem.causal_offset`` and the CUDA
    kernels' ``causal_offset``)."""
    return length - num_queries


@triton.jit
def _visible(
    query_idx,
    key_idx,
    key_end,
    offset,
    CAUSAL: tl.constexpr,
):
    """Bool tile: which (query, key) pairs take part, before key padding.

    ``query_idx`` and ``key_idx`` come shaped for broadcasting (``[:, None]`` and ``[None, :]``, or
    the transpose), so the forward and the transposed backward share this. ``key_end`` folds ``Nk``,
    ``kv_lengths[b]`` and a split's end; ``offset`` is :func:`causal_offset`.
    """
    visible = (key_idx < key_end) & (query_idx >= 0)
    if CAUSAL:
        visible = visible & (key_idx <= query_idx + offset)
    return visible


@triton.jit
def _keys_after(KeysAfter, b, Nk, HAS_KEYS_AFTER: tl.constexpr):
    """``keys_after[b]`` clamped to ``[0, Nk]`` (more moves the diagonal past every key already), or 0: added
    to :func:`causal_offset`."""
    after = 0
    if HAS_KEYS_AFTER:
        after = tl.minimum(tl.maximum(tl.load(KeysAfter + b).to(tl.int32), 0), Nk)
    return after


@triton.jit
def _kv_length(KvLen, b, Nk, HAS_KVLEN: tl.constexpr):
    """Valid keys of sample ``b``: ``kv_lengths[b]`` clamped to ``[0, Nk]``, or ``Nk``."""
    kv_len = Nk
    if HAS_KVLEN:
        kv_len = tl.minimum(tl.maximum(tl.load(KvLen + b).to(tl.int32), 0), Nk)
    return kv_len


@triton.jit
def _split_key_range(
    pid_m, split, keys_per_split, kv_len, offset,
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
        # Row i sees keys j <= i + offset: the block's last row bounds hi, its first full_end.
        hi = tl.minimum(hi, (pid_m + 1) * BLOCK_M + offset)
        full_end = tl.minimum(full_end, pid_m * BLOCK_M + offset + 1)
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
    # One return: the compiler type-checks every return statement, taken or not (int64 rows vs int32).
    if HAS_KV_INDEX:
        rows = tl.load(kv_index_row + offs_n, mask=valid, other=0)
        rows = tl.minimum(tl.maximum(rows, 0), num_rows - 1)
    else:
        rows = offs_n
    return rows


@triton.jit
def _rotary_pairs(offs_d, ROT_DIM, INTERLEAVED: tl.constexpr):
    """For channels ``offs_d``: ``(partner, pair, first)``, the other channel of each one's rotary pair,
    the pair's index into the cos/sin tables, and whether the channel is the pair's first."""
    if INTERLEAVED:
        first = (offs_d % 2) == 0
        partner = offs_d ^ 1
        pair = offs_d // 2
    else:
        half = ROT_DIM // 2
        first = offs_d < half
        partner = tl.where(first, offs_d + half, offs_d - half)
        pair = tl.where(first, offs_d, offs_d - half)
    return partner, pair, first


@triton.jit
def _rotate_values(x, x_partner, cos, sin, first, INVERSE: tl.constexpr):
    """A pair ``(a, b)`` becomes ``(a cos - b sin, b cos + a sin)`` (the transpose when ``INVERSE``);
    every operand is a float tile of the same shape but ``first`` (per channel)."""
    sign = tl.where(first, -1.0, 1.0)
    if INVERSE:
        sign = -sign
    return x * cos + sign[None, :].to(x.dtype) * x_partner * sin


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
    partner, pair, first = _rotary_pairs(offs_d, ROT_DIM, INTERLEAVED)
    mask = row_mask[:, None] & (offs_d < ROT_DIM)[None, :]
    r = rows[:, None].to(tl.int64)
    x_partner = tl.load(base + r * stride_row + partner[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    cos = tl.load(rope + r * stride_rn + pair[None, :], mask=mask, other=1.0).to(ACC_DTYPE)
    sin = tl.load(rope + stride_rs + r * stride_rn + pair[None, :], mask=mask, other=0.0).to(ACC_DTYPE)
    return _rotate_values(x.to(ACC_DTYPE), x_partner, cos, sin, first, INVERSE).to(x.dtype)


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


class Prologue(NamedTuple):
    """Everything about one input signature that the forward and the backward launchers share (one
    place): head-dim tiling, which inputs need an aligned copy, the kernels' integer arguments for
    the inputs and masks, and their flags. Built once per signature (:func:`prologue`)."""

    batch: int
    heads: int
    num_queries: int
    num_keys: int  # the (gathered) key axis the kernels walk
    num_rows: int  # rows of k and v
    head_dim_qk: int  # real head dims (outputs and gradients)
    head_dim_v: int
    kernel_head_dim_qk: int  # what the kernels load: a multiple of 16 (see configs.aligned_head_dim)
    kernel_head_dim_v: int
    qk_tiles: configs.HeadDimTiling
    v_tiles: configs.HeadDimTiling
    copy_q: bool  # the input is copied (aligned, zero-padded) before the launch: with_head_dim
    copy_k: bool
    copy_v: bool
    copy_index: bool  # kv_index / kv_lengths copied to unit stride
    copy_lengths: bool
    copy_keys_after: bool
    broadcast_q: bool  # batch-1 q under a larger batch: read with batch stride 0
    is_cuda: bool  # planned for a GPU (configs.targets_gpu): GPU tiles
    element_size: int  # bytes per input element: 16-bit and float32 inputs get different tiles
    sms: int | None  # the GPU's SMs (split-KV); None for the interpreter
    input_strides: tuple[int, ...]  # q (b, m, h), k (b, n, h), v (b, n, h), after any copy
    mask_strides: tuple[int, ...]  # key padding (b, n), kv_index (b), rope q (s, b, n), rope k (s, b, n)
    sizes: tuple[int, ...]  # H, Nq, Nk, Nk_rows, kernel DQK, kernel DV, ROT_DIM
    flags: dict  # constexprs shared by every attention kernel


def signature(
    q, k, v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, rotary_dim, interleaved, causal, keys_after=None
):
    """The key under which launch plans are cached: every shape, stride, dtype, device and flag a launch
    depends on (data pointers are Triton's business: it specialises on their alignment itself)."""
    return (
        q.shape, q.stride(), k.shape, k.stride(), v.shape, v.stride(), q.dtype, q.device,
        None if key_padding_mask is None else key_padding_mask.stride(),
        None if kv_lengths is None else kv_lengths.stride(),
        None if kv_index is None else (kv_index.shape[1], kv_index.stride()),
        None if q_rope is None else (q_rope.shape, q_rope.stride(), k_rope.shape, k_rope.stride()),
        rotary_dim, interleaved, causal, None if keys_after is None else keys_after.stride(),
    )  # fmt: skip


@functools.lru_cache(maxsize=1024)
def prologue(sig: tuple) -> Prologue:
    """The :class:`Prologue` of a :func:`signature`."""
    q_shape, q_stride, k_shape, k_stride, v_shape, v_stride, dtype, device = sig[:8]
    pad_stride, lengths_stride, index, rope, rotary_dim, interleaved, causal, after_stride = sig[8:]
    batch, num_rows, heads, head_dim_qk = k_shape
    num_queries, head_dim_v = q_shape[1], v_shape[3]
    num_keys = num_rows if index is None else index[0]
    kernel_qk = configs.aligned_head_dim(head_dim_qk, configs.QK_CHUNK)
    kernel_v = configs.aligned_head_dim(head_dim_v, configs.V_CHUNK)
    layouts = ((q_shape, q_stride, kernel_qk), (k_shape, k_stride, kernel_qk), (v_shape, v_stride, kernel_v))
    copy_q, copy_k, copy_v = (needs_copy(shape, stride, dim) for shape, stride, dim in layouts)
    broadcast_q = q_shape[0] == 1 and batch > 1
    strides = []
    for (shape, stride, dim), copy in zip(layouts, (copy_q, copy_k, copy_v), strict=True):
        stride = configs.contiguous_strides((*shape[:3], dim)) if copy else stride
        strides.extend(stride[:3])
    if broadcast_q:
        strides[0] = 0
    copy_index = index is not None and index[1][1] != 1 and index[0] > 1
    copy_lengths = lengths_stride is not None and lengths_stride[0] != 1 and batch > 1
    copy_keys_after = after_stride is not None and after_stride[0] != 1 and batch > 1
    index_stride = 0 if index is None else (index[0] if copy_index else index[1][0])
    rope_strides = (0,) * 6
    if rope is not None:
        q_rope_shape, q_rope_stride, k_rope_shape, k_rope_stride = rope
        rope_strides = (
            q_rope_stride[0], 0 if q_rope_shape[1] == 1 else q_rope_stride[1], q_rope_stride[2],
            k_rope_stride[0], 0 if k_rope_shape[1] == 1 else k_rope_stride[1], k_rope_stride[2],
        )  # fmt: skip
    is_cuda = configs.targets_gpu(device)
    return Prologue(
        batch=batch, heads=heads, num_queries=num_queries, num_keys=num_keys, num_rows=num_rows,
        head_dim_qk=head_dim_qk, head_dim_v=head_dim_v, kernel_head_dim_qk=kernel_qk, kernel_head_dim_v=kernel_v,
        qk_tiles=configs.head_dim_tiling(kernel_qk, configs.QK_CHUNK),
        v_tiles=configs.head_dim_tiling(kernel_v, configs.V_CHUNK),
        copy_q=copy_q, copy_k=copy_k, copy_v=copy_v, copy_index=copy_index, copy_lengths=copy_lengths,
        copy_keys_after=copy_keys_after,
        broadcast_q=broadcast_q, is_cuda=is_cuda, element_size=dtype.itemsize, sms=configs.sm_count(device),
        input_strides=tuple(strides),
        mask_strides=(*(pad_stride or (0, 0)), index_stride, *rope_strides),
        sizes=(heads, num_queries, num_keys, num_rows, kernel_qk, kernel_v, rotary_dim),
        flags=dict(
            CAUSAL=causal, HAS_PAD=pad_stride is not None, HAS_KVLEN=lengths_stride is not None,
            HAS_KV_INDEX=index is not None, HAS_KEYS_AFTER=after_stride is not None, ROTARY=rope is not None,
            INTERLEAVED=interleaved,
            DOT_PRECISION=dot_precision(dtype), ACC_DTYPE=acc_dtype(dtype),
        ),
    )  # fmt: skip


def kernel_inputs(
    pro: Prologue, q, k, v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, keys_after=None
) -> tuple:
    """The pointer arguments every attention kernel takes, minus the outputs: ``(q, k, v, padding, lengths,
    kv_index, q_rope, k_rope, keys_after)``, copied where the prologue says so. An absent optional tensor is
    passed as ``q`` (never read: its flag is off), so nothing is allocated for it."""
    if pro.copy_q:
        q = with_head_dim(q, pro.kernel_head_dim_qk)
    if pro.copy_k:
        k = with_head_dim(k, pro.kernel_head_dim_qk)
    if pro.copy_v:
        v = with_head_dim(v, pro.kernel_head_dim_v)
    if pro.copy_index:
        kv_index = kv_index.contiguous()
    if pro.copy_lengths:
        kv_lengths = kv_lengths.contiguous()
    if pro.copy_keys_after:
        keys_after = keys_after.contiguous()
    return (
        q, k, v,
        q if key_padding_mask is None else key_padding_mask.view(torch.uint8),
        q if kv_lengths is None else kv_lengths,
        q if kv_index is None else kv_index,
        q if q_rope is None else q_rope,
        q if k_rope is None else k_rope,
        q if keys_after is None else keys_after,
    )  # fmt: skip


def needs_copy(shape, stride, kernel_head_dim: int) -> bool:
    """Whether rows must be copied to be 16-element aligned and ``kernel_head_dim`` wide."""
    return shape[3] != kernel_head_dim or any(st % 16 for n, st in zip(shape[:3], stride[:3], strict=True) if n > 1)


def with_head_dim(x: torch.Tensor, head_dim: int) -> torch.Tensor:
    """``x`` with its last dim zero-padded to ``head_dim`` and 16-element aligned strides (a copy;
    see ``configs.aligned_head_dim``)."""
    return torch.nn.functional.pad(x, (0, head_dim - x.shape[-1])).contiguous()


def dot_precision(dtype: torch.dtype) -> str:
    """float32 dots at float32 accuracy on tensor cores: "tf32x3" splits each operand into a TF32 head and
    a TF32 tail and sums three products (the 3xTF32 scheme of CUTLASS), about 2**-21 relative error per
    product. Plain TF32 (2**-11) is never used. "ieee" (CUDA-core FMAs) spilled tens of KiB per thread and
    outgrew shared memory on sm_90a (static kernel report); float64 (interpreter only) keeps it. 16-bit
    inputs ignore the setting."""
    if dtype == torch.float64:
        return "ieee"
    return "tf32x3" if dtype == torch.float32 else "tf32"


def acc_dtype(dtype: torch.dtype) -> tl.dtype:
    return tl.float64 if dtype == torch.float64 else tl.float32
