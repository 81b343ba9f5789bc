"""Triton forward kernels: fused attention with online softmax, split-KV and the split merge.

Layout: ``q (Bq, Nq, H, Dqk)``, ``k (B, Nk, H, Dqk)``, ``v (B, Nk, H, Dv)`` with any strides but a
contiguous last dim; a broadcast batch-1 query is passed with batch stride 0. Scores live in the log2
domain (``log2(e)`` folded into the scale) so the softmax uses ``exp2``. Masks are computed from
indices in-kernel; nothing of size ``Nq x Nk`` is ever written.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .common import (
    LOG2E,
    Rope,
    _key_kept,
    _key_rows,
    _kv_length,
    _load_rows,
    _load_tile,
    _scores,
    _split_key_range,
    _visible,
    acc_dtype,
    dot_precision,
    mask_args,
    rope_args,
    with_head_dim,
)


@triton.jit
def _fwd_key_loop(
    acc, l_i, m_i, q, q_base, k_base, v_base, pad_row, kv_index_row, q_rope, k_rope, offs_m, m_mask, offs_dv,
    start, end, key_end, causal_offset, qk_scale,
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
        s = _scores(
            q, q_base, k_base, offs_m, rows, m_mask, n_mask, stride_qm, stride_kn, DQK,
            q_rope, stride_qrs, stride_qrn, k_rope, stride_krs, stride_krn, ROT_DIM,
            BLOCK_M, BLOCK_N, BLOCK_DK, NUM_DK, ROTARY, INTERLEAVED, DOT_PRECISION, ACC_DTYPE,
        )  # fmt: skip
        s = s * qk_scale
        if MASKED:
            visible = _visible(offs_m[:, None], offs_n[None, :], key_end, causal_offset, CAUSAL)
            if HAS_PAD:
                visible = visible & _key_kept(pad_row, rows, n_mask, stride_pn)[None, :]
            s = tl.where(visible, s, float("-inf"))
        elif HAS_PAD:
            s = tl.where(_key_kept(pad_row, rows, n_mask, stride_pn)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # A row with nothing visible yet keeps m = -inf; subtracting 0 instead keeps exp2 finite.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_rows(v_base, rows, n_mask, stride_vn, offs_dv, DV)
        acc = acc * alpha[:, None]
        acc += tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _fwd_kernel(
    Q, K, V, Out, Lse, KeyPad, KvLen, KvIndex, QRope, KRope,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_os, stride_ob, stride_om, stride_oh,
    stride_ls, stride_lb, stride_lh,
    stride_pb, stride_pn,
    stride_ib,
    stride_qrs, stride_qrb, stride_qrn,
    stride_krs, stride_krb, stride_krn,
    H, Nq, Nk, Nk_rows, DQK, DV, ROT_DIM,
    qk_scale, keys_per_split, num_m_blocks, num_z,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_KV_INDEX: tl.constexpr,
    ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_M queries x one v-dim chunk x one key split of one (batch, head).
    # Query blocks of the same (batch, head, split) are adjacent in launch order so they share
    # K/V tiles in L2. Nk is the (gathered) key axis the program walks; Nk_rows the rows of k/v.
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
    causal_offset = kv_len - Nq
    lo, key_end, hi, full_end = _split_key_range(
        pid_m, split, keys_per_split, kv_len, causal_offset, CAUSAL, BLOCK_M, BLOCK_N
    )

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
        lo, full_end, key_end, causal_offset, qk_scale,
        stride_qm, stride_kn, stride_vn, stride_pn, stride_qrs, stride_qrn, stride_krs, stride_krn,
        Nk_rows, DQK, DV, ROT_DIM,
        False, CAUSAL, HAS_PAD, HAS_KV_INDEX, ROTARY, INTERLEAVED,
        BLOCK_M, BLOCK_N, BLOCK_DK, NUM_DK, DOT_PRECISION, ACC_DTYPE,
    )  # fmt: skip
    acc, l_i, m_i = _fwd_key_loop(
        acc, l_i, m_i, q, q_base, k_base, v_base, pad_row, kv_index_row, q_rope, k_rope, offs_m, m_mask, offs_dv,
        full_end, hi, key_end, causal_offset, qk_scale,
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
    tl.store(out_ptrs, out.to(Out.dtype.element_ty), mask=m_mask[:, None] & (offs_dv[None, :] < DV))
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


def attention_forward(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_padding_mask: torch.Tensor | None,
    kv_lengths: torch.Tensor | None,
    causal: bool,
    scale: float,
    num_splits: int = 0,
    config: configs.LaunchConfig | None = None,
    kv_index: torch.Tensor | None = None,
    rope: Rope | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward. Inputs are already validated (see ``perceiver_kernels.functional``).

    Args:
        q: ``(Bq, Nq, H, Dqk)``, ``Bq`` in ``{1, B}``; k: ``(B, Nk, H, Dqk)``; v: ``(B, Nk, H, Dv)``.
        key_padding_mask: bool ``(B, Nk)`` (True = padding) or None.
        kv_lengths: int ``(B,)`` or None (on the gathered axis when ``kv_index`` is given).
        num_splits: key-axis splits; 0 picks them from the SM count (see ``configs.plan_kv_splits``).
        config: tile shape override (benchmarks sweep it); default ``configs.forward_config``.
        kv_index: int64 ``(B, Nk')`` key rows to attend to, or None.
        rope: rotary tables and layout, or None.

    Returns:
        ``out (B, Nq, H, Dv)`` in q's dtype and ``lse (B, H, Nq)`` (float32; float64 for float64).
    """
    batch, num_rows, heads, _ = k.shape
    num_keys = num_rows if kv_index is None else kv_index.shape[1]
    num_queries, head_dim_v_out = q.shape[1], v.shape[3]
    head_dim_qk = configs.aligned_head_dim(k.shape[3], configs.QK_CHUNK)
    head_dim_v = configs.aligned_head_dim(head_dim_v_out, configs.V_CHUNK)
    q, k, v = with_head_dim(q, head_dim_qk), with_head_dim(k, head_dim_qk), with_head_dim(v, head_dim_v)
    is_cuda = q.device.type == "cuda"
    cfg = config or configs.forward_config(head_dim_qk, head_dim_v, causal, is_cuda, num_queries)
    qk_tiles = configs.head_dim_tiling(head_dim_qk, configs.QK_CHUNK)
    v_tiles = configs.head_dim_tiling(head_dim_v, configs.V_CHUNK)
    num_m_blocks = triton.cdiv(num_queries, cfg.block_m)
    num_splits, keys_per_split = configs.plan_kv_splits(
        num_splits,
        batch * heads * num_m_blocks * v_tiles.num_chunks,
        num_keys,
        cfg.block_n,
        q.device.index if is_cuda else None,
    )

    out = torch.empty((batch, num_queries, heads, head_dim_v), device=q.device, dtype=q.dtype)
    lse = torch.empty((batch, heads, num_queries), device=q.device, dtype=configs.stats_dtype(q.dtype))
    if num_splits == 1:
        out_part, lse_part = out.unsqueeze(0), lse.unsqueeze(0)
    else:
        out_part = torch.empty((num_splits, *out.shape), device=q.device, dtype=lse.dtype)
        lse_part = torch.empty((num_splits, *lse.shape), device=q.device, dtype=lse.dtype)

    pad, pad_stride_b, pad_stride_n, lengths = mask_args(q, key_padding_mask, kv_lengths)
    index = kv_index if kv_index is not None else lengths.new_empty(0)
    q_rope, k_rope = rope_args(rope, "q", q), rope_args(rope, "k", q)
    q_batch_stride = 0 if q.shape[0] == 1 else q.stride(0)
    num_z = num_splits * v_tiles.num_chunks
    grid = (num_m_blocks * num_z * batch * heads,)
    _fwd_kernel[grid](
        q, k, v, out_part, lse_part, pad, lengths, index, q_rope[0], k_rope[0],
        q_batch_stride, q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        out_part.stride(0), out_part.stride(1), out_part.stride(2), out_part.stride(3),
        lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
        pad_stride_b, pad_stride_n,
        index.stride(0) if kv_index is not None else 0,
        *q_rope[1:], *k_rope[1:],
        heads, num_queries, num_keys, num_rows, head_dim_qk, head_dim_v, rope.rotary_dim if rope else 0,
        scale * LOG2E, keys_per_split, num_m_blocks, num_z,
        CAUSAL=causal, HAS_PAD=key_padding_mask is not None, HAS_KVLEN=kv_lengths is not None,
        HAS_KV_INDEX=kv_index is not None, ROTARY=rope is not None, INTERLEAVED=rope is None or rope.interleaved,
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_DK=qk_tiles.block, NUM_DK=qk_tiles.num_chunks,
        BLOCK_DV=v_tiles.block, NUM_DV=v_tiles.num_chunks,
        DOT_PRECISION=dot_precision(q.dtype), ACC_DTYPE=acc_dtype(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if num_splits > 1:
        merge_block_m = 16
        merge_blocks = triton.cdiv(num_queries, merge_block_m)
        _merge_splits_kernel[(merge_blocks * batch * heads,)](
            out_part, lse_part, out, lse,
            out_part.stride(0), out_part.stride(1), out_part.stride(2), out_part.stride(3),
            lse_part.stride(0), lse_part.stride(1), lse_part.stride(2),
            out.stride(0), out.stride(1), out.stride(2),
            lse.stride(0), lse.stride(1),
            heads, num_queries, head_dim_v, num_splits, merge_blocks,
            BLOCK_M=merge_block_m, BLOCK_DV=v_tiles.block, NUM_DV=v_tiles.num_chunks,
            ACC_DTYPE=acc_dtype(q.dtype),
        )  # fmt: skip
    if head_dim_v != head_dim_v_out:
        out = out[..., :head_dim_v_out].contiguous()
    return out, lse
