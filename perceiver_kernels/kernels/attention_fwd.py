"""Triton forward kernels: fused attention with online softmax, split-KV and the split merge.

Layout: ``q (Bq, Nq, H, Dqk)``, ``k (B, Nk, H, Dqk)``, ``v (B, Nk, H, Dv)`` with any strides but a
contiguous last dim; a broadcast batch-1 query is passed with batch stride 0. Scores live in the log2
domain (``log2(e)`` folded into the scale) so the softmax uses ``exp2``. Masks are computed from
indices in-kernel; nothing of size ``Nq x Nk`` is ever written.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from . import configs
from .common import (
    LOG2E,
    Prologue,
    _key_kept,
    _key_rows,
    _keys_after,
    _kv_length,
    _load_rows,
    _load_tile,
    _scores,
    _split_key_range,
    _visible,
    causal_offset,
    kernel_inputs,
    prologue,
    signature,
)
from .launch import launch


@triton.jit
def _fwd_key_loop(
    acc, l_i, m_i, q, q_base, k_base, v_base, pad_row, kv_index_row, q_rope, k_rope, offs_m, m_mask, offs_dv,
    start, end, key_end, offset, qk_scale,
    stride_qm, stride_kn, stride_vn, stride_pn, stride_qrs, stride_qrn, stride_krs, stride_krn,
    Nk_rows, DQK, DV, ROT_DIM,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_KV_INDEX: tl.constexpr,
    ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """Online softmax over key blocks ``[start, end)`` (indices on the gathered key axis). ``MASKED``
    blocks straddle the causal diagonal or the end of the keys and get the full index mask; the
    others only key padding."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < key_end
        rows = _key_rows(kv_index_row, offs_n, n_mask, Nk_rows, HAS_KV_INDEX)
        # Padded keys are never loaded (zeros instead): whatever their memory holds (NaN, Inf) cannot reach
        # the output through a zero probability times a non-finite value.
        kept = n_mask
        if HAS_PAD:
            kept = _key_kept(pad_row, rows, n_mask, stride_pn)
        s = _scores(
            q, q_base, k_base, offs_m, rows, m_mask, kept, stride_qm, stride_kn, DQK,
            q_rope, stride_qrs, stride_qrn, k_rope, stride_krs, stride_krn, ROT_DIM,
            BLOCK_M, BLOCK_N, BLOCK_DK, NUM_DK, ROTARY, INTERLEAVED, DOT_PRECISION, ACC_DTYPE,
        )  # fmt: skip
        s = s * qk_scale
        if MASKED:
            visible = _visible(offs_m[:, None], offs_n[None, :], key_end, offset, CAUSAL)
            if HAS_PAD:
                visible = visible & kept[None, :]
            s = tl.where(visible, s, float("-inf"))
        elif HAS_PAD:
            s = tl.where(kept[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; subtracting 0 instead keeps exp2 finite.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, rows, kept, stride_vn, offs_dv, DV)
        acc = acc * alpha[:, None]
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, KeyPad, KvLen, KvIndex, QRope, KRope, KeysAfter,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_os, stride_ob, stride_om, stride_oh,
    stride_ls, stride_lb, stride_lh,
    stride_pb, stride_pn,
    stride_ib,
    stride_qrs, stride_qrb, stride_qrn,
    stride_krs, stride_krb, stride_krn,
    H, Nq, Nk, Nk_rows, DQK, DV, ROT_DIM, DV_OUT,
    qk_scale, keys_per_split, num_m_blocks, num_z,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_KV_INDEX: tl.constexpr,
    HAS_KEYS_AFTER: tl.constexpr,
    ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_M queries x one v-dim chunk x one key split of one (batch, head).
    # Query blocks of the same (batch, head, split) are adjacent in launch order so they share
    # K/V tiles in L2. Nk is the (gathered) key axis the program walks; Nk_rows the rows of k/v.
    # DQK/DV are the loaded (16-aligned) head dims, DV_OUT the output's.
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    rest = pid // num_m_blocks
    pid_z = rest % num_z
    pid_bh = rest // num_z
    split = pid_z // NUM_DV
    dv_chunk = pid_z % NUM_DV
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    pad_row = KeyPad + b * stride_pb
    kv_index_row = KvIndex + b * stride_ib
    q_rope = QRope + b * stride_qrb
    k_rope = KRope + b * stride_krb

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_dv = dv_chunk * BLOCK_DV + tl.arange(0, BLOCK_DV)
    m_mask = offs_m < Nq

    kv_len = _kv_length(KvLen, b, Nk, HAS_KVLEN)
    offset = causal_offset(kv_len, Nq) + _keys_after(KeysAfter, b, Nk, HAS_KEYS_AFTER)
    lo, key_end, hi, full_end = _split_key_range(pid_m, split, keys_per_split, kv_len, offset, CAUSAL, BLOCK_M, BLOCK_N)

    if NUM_DK == 1:
        # Fast path: the whole (rotated) q tile stays in registers for the key loop.
        q = _load_tile(
            q_base, offs_m, m_mask, stride_qm, tl.arange(0, BLOCK_DK), DQK, q_rope, stride_qrs, stride_qrn, ROT_DIM,
            ROTARY, INTERLEAVED, ACC_DTYPE,
        )  # fmt: skip
    else:
        q = q_base  # unused: the chunked path reloads q chunk by chunk

    m_i = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    l_i = tl.zeros([BLOCK_M], ACC_DTYPE)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC_DTYPE)
    acc, l_i, m_i = _fwd_key_loop(
        acc, l_i, m_i, q, q_base, k_base, v_base, pad_row, kv_index_row, q_rope, k_rope, offs_m, m_mask, offs_dv,
        lo, full_end, key_end, offset, qk_scale,
        stride_qm, stride_kn, stride_vn, stride_pn, stride_qrs, stride_qrn, stride_krs, stride_krn,
        Nk_rows, DQK, DV, ROT_DIM,
        False, CAUSAL, HAS_PAD, HAS_KV_INDEX, ROTARY, INTERLEAVED,
        BLOCK_M, BLOCK_N, BLOCK_DK, NUM_DK, DOT_PRECISION, ACC_DTYPE,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_key_loop(
        acc, l_i, m_i, q, q_base, k_base, v_base, pad_row, kv_index_row, q_rope, k_rope, offs_m, m_mask, offs_dv,
        full_end, hi, key_end, offset, qk_scale,
        stride_qm, stride_kn, stride_vn, stride_pn, stride_qrs, stride_qrn, stride_krs, stride_krn,
        Nk_rows, DQK, DV, ROT_DIM,
        True, CAUSAL, HAS_PAD, HAS_KV_INDEX, ROTARY, INTERLEAVED,
        BLOCK_M, BLOCK_N, BLOCK_DK, NUM_DK, DOT_PRECISION, ACC_DTYPE,
    )  # fmt: skip

    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)

    out_ptrs = (
        Out
        + split.to(tl.int64) * stride_os
        + b * stride_ob
        + h * stride_oh
        + offs_m[:, None].to(tl.int64) * stride_om
        + offs_dv[None, :]
    )
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=m_mask[:, None] & (offs_dv[None, :] < DV_OUT))
    lse_ptrs = Lse + split.to(tl.int64) * stride_ls + b * stride_lb + h * stride_lh + offs_m
    tl.store(lse_ptrs, lse, mask=m_mask & (dv_chunk == 0))


@triton.jit
def _merge_splits_kernel(
    OutPart, LsePart, Out, Lse,
    stride_ps, stride_pb, stride_pm, stride_ph,
    stride_qs, stride_qb, stride_qh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    H, Nq, DV, num_splits, num_m_blocks,
    BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    # Merge the per-split (normalised output, lse) pairs of one query block:
    # lse = log sum_s exp(lse_s), out = sum_s exp(lse_s - lse) * out_s.
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    pid_bh = pid // num_m_blocks
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Nq
    lse_part = LsePart + b * stride_qb + h * stride_qh + offs_m

    lse_max = tl.full([BLOCK_M], float("-inf"), ACC_DTYPE)
    for s in range(num_splits):
        lse_s = tl.load(lse_part + s * stride_qs, mask=m_mask, other=float("-inf"))
        lse_max = tl.maximum(lse_max, lse_s)
    max_safe = tl.where(lse_max == float("-inf"), 0.0, lse_max)
    total = tl.zeros([BLOCK_M], ACC_DTYPE)
    for s in range(num_splits):
        lse_s = tl.load(lse_part + s * stride_qs, mask=m_mask, other=float("-inf"))
        total += tl.exp(lse_s - max_safe)
    empty = total == 0.0
    lse = tl.where(empty, float("-inf"), max_safe + tl.log(tl.where(empty, 1.0, total)))
    tl.store(Lse + b * stride_lb + h * stride_lh + offs_m, lse, mask=m_mask)
    lse_safe = tl.where(empty, 0.0, lse)

    for c in range(NUM_DV):
        offs_dv = c * BLOCK_DV + tl.arange(0, BLOCK_DV)
        tile_mask = m_mask[:, None] & (offs_dv[None, :] < DV)
        acc = tl.zeros([BLOCK_M, BLOCK_DV], ACC_DTYPE)
        for s in range(num_splits):
            lse_s = tl.load(lse_part + s * stride_qs, mask=m_mask, other=float("-inf"))
            weight = tl.exp(lse_s - lse_safe)
            part = tl.load(
                OutPart
                + s * stride_ps
                + b * stride_pb
                + h * stride_ph
                + offs_m[:, None].to(tl.int64) * stride_pm
                + offs_dv[None, :],
                mask=tile_mask,
                other=0.0,
            )
            acc += weight[:, None] * part
        out_ptrs = Out + b * stride_ob + h * stride_oh + offs_m[:, None].to(tl.int64) * stride_om + offs_dv[None, :]
        tl.store(out_ptrs, acc.to(Out.dtype.element_ty), mask=tile_mask)


class ForwardPlan(NamedTuple):
    """A forward launch, planned once per input signature: all but the tensors' data."""

    pro: Prologue
    num_splits: int
    grid: tuple[int]
    out_shape: tuple[int, ...]  # (B, Nq, H, Dv)
    lse_shape: tuple[int, ...]  # (B, H, Nq)
    ints: tuple  # the forward kernel's scalar arguments, after its ten pointers
    constexprs: dict
    merge_grid: tuple[int] | None  # split-KV merge (None: a single split writes out directly)
    merge_ints: tuple
    merge_constexprs: dict


@functools.lru_cache(maxsize=1024)
def forward_plan(sig: tuple, scale: float, num_splits: int, config: configs.LaunchConfig | None) -> ForwardPlan:
    """The :class:`ForwardPlan` of a :func:`~.common.signature`; ``num_splits`` 0 asks the heuristic."""
    pro = prologue(sig)
    batch, heads, num_queries, num_keys = pro.batch, pro.heads, pro.num_queries, pro.num_keys
    head_dim_v = pro.head_dim_v
    cfg = config or configs.forward_config(
        pro.kernel_head_dim_qk, pro.kernel_head_dim_v, pro.flags["CAUSAL"], pro.is_cuda, num_queries,
        element_size=pro.element_size, rotary=pro.flags["ROTARY"],
    )  # fmt: skip
    v_tiles = pro.v_tiles
    num_m_blocks = configs.cdiv(num_queries, cfg.block_m)
    num_splits, keys_per_split = configs.plan_kv_splits(
        num_splits, batch * heads * num_m_blocks * v_tiles.num_chunks, num_keys, cfg.block_n, pro.sms
    )
    out_shape, lse_shape = (batch, num_queries, heads, head_dim_v), (batch, heads, num_queries)
    # The kernel writes per-split float32 partials when the key axis is split, else out itself.
    part_strides = configs.contiguous_strides((num_splits, *out_shape))[:4]
    lse_part_strides = configs.contiguous_strides((num_splits, *lse_shape))[:3]
    num_z = num_splits * v_tiles.num_chunks
    grid = (num_m_blocks * num_z * batch * heads,)
    ints = (
        *pro.input_strides, *part_strides, *lse_part_strides, *pro.mask_strides, *pro.sizes, head_dim_v,
        scale * LOG2E, keys_per_split, num_m_blocks, num_z,
    )  # fmt: skip
    constexprs = dict(
        **pro.flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_DK=pro.qk_tiles.block, NUM_DK=pro.qk_tiles.num_chunks, BLOCK_DV=v_tiles.block, NUM_DV=v_tiles.num_chunks,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    merge_grid, merge_ints, merge_constexprs = None, (), {}
    if num_splits > 1:
        merge_block_m = 16
        merge_blocks = configs.cdiv(num_queries, merge_block_m)
        merge_grid = (merge_blocks * batch * heads,)
        merge_ints = (
            *part_strides, *lse_part_strides, *configs.contiguous_strides(out_shape)[:3],
            *configs.contiguous_strides(lse_shape)[:2], heads, num_queries, head_dim_v, num_splits, merge_blocks,
        )  # fmt: skip
        merge_constexprs = dict(
            BLOCK_M=merge_block_m, BLOCK_DV=v_tiles.block, NUM_DV=v_tiles.num_chunks, ACC_DTYPE=pro.flags["ACC_DTYPE"]
        )
    return ForwardPlan(
        pro, num_splits, grid, out_shape, lse_shape, ints, constexprs, merge_grid, merge_ints, merge_constexprs
    )


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    kv_lengths: torch.Tensor | None,
    kv_index: torch.Tensor | None,
    q_rope: torch.Tensor | None,
    k_rope: torch.Tensor | None,
    rotary_dim: int,
    rotary_interleaved: bool,
    causal: bool,
    scale: float,
    num_splits: int = 0,
    config: configs.LaunchConfig | None = None,
    keys_after: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward; the arguments are the ``triton_attention_fwd`` op's (already validated).

    Args:
        q: ``(Bq, Nq, H, Dqk)``, ``Bq`` in ``{1, B}``; k: ``(B, Nk, H, Dqk)``; v: ``(B, Nk, H, Dv)``.
        key_padding_mask: bool ``(B, Nk)`` (True = padding) or None.
        kv_lengths: int ``(B,)`` or None (on the gathered axis when ``kv_index`` is given).
        kv_index: int64 ``(B, Nk')`` key rows to attend to, or None.
        q_rope, k_rope: float32 cos/sin tables ``(2, 1 or B, N, rotary_dim / 2)``, or None.
        num_splits: key-axis splits; 0 picks them from the SM count (see ``configs.plan_kv_splits``).
        config: tile shape override (benchmarks sweep it); default ``configs.forward_config``.
        keys_after: int ``(B,)`` or None: keys of the sequence after these, added to the causal diagonal.

    Returns:
        ``out (B, Nq, H, Dv)`` (contiguous) in q's dtype and ``lse (B, H, Nq)`` (float32; float64 for
        float64).
    """
    if kv_index is not None and k.shape[1] == 0:
        kv_index = kv_index[:, :0]  # nothing to gather from: no key is visible
    sig = signature(q, k, v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, rotary_dim, rotary_interleaved,
                    causal, keys_after)  # fmt: skip
    plan = forward_plan(sig, scale, num_splits, config)
    out = q.new_empty(plan.out_shape)
    lse = q.new_empty(plan.lse_shape, dtype=configs.stats_dtype(q.dtype))
    if plan.grid[0] == 0:
        return out, lse
    inputs = kernel_inputs(plan.pro, q, k, v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, keys_after)
    if plan.merge_grid is None:
        launch(_fwd_kernel, plan.grid, (*inputs[:3], out, lse, *inputs[3:], *plan.ints), plan.constexprs)
        return out, lse
    out_part = q.new_empty((plan.num_splits, *plan.out_shape), dtype=lse.dtype)
    lse_part = q.new_empty((plan.num_splits, *plan.lse_shape), dtype=lse.dtype)
    launch(_fwd_kernel, plan.grid, (*inputs[:3], out_part, lse_part, *inputs[3:], *plan.ints), plan.constexprs)
    launch(_merge_splits_kernel, plan.merge_grid, (out_part, lse_part, out, lse, *plan.merge_ints),
           plan.merge_constexprs)  # fmt: skip
    return out, lse
