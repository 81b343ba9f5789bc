"""Triton backward kernels.

``delta = rowsum(dO * O) - dlse`` is computed first. Then one program per key block (and head-dim
chunk) walks over all query blocks that can see it, accumulating dK and dV in registers. Perceiver
problems have few queries and very many keys, so parallelising over key blocks keeps the GPU full. dQ
comes from a second kernel over query blocks and key splits (``dq_mode="split"``, the default), or is
added by the dK/dV kernel into a float32 buffer with atomics (``"atomic"``, and head dims above the
fast path); docs/DESIGN.md has the measurements behind that choice.

Head dims above ``configs.MAX_FAST_HEAD_DIM`` run as two launches of the same kernel: one over v-dim
chunks computing dV, one over qk-dim chunks computing dK and dQ, each recomputing the probabilities.
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
    with_head_dim,
)
from .launch import alert_not_deterministic, launch
from .rotary import sum_and_rotate


@triton.jit
def _bwd_delta_kernel(
    Out, DOut, DLse, Delta,
    stride_ob, stride_om, stride_oh,
    stride_gb, stride_gm, stride_gh,
    stride_lb, stride_lh,
    stride_db, stride_dh,
    H, Nq, DV, num_m_blocks,
    HAS_DLSE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    # delta_i = sum_d dO_id * O_id - dlse_i: the row term of dS = P * (dP - delta).
    # A gradient flowing into lse adds P to dS, which is the same as lowering delta by dlse.
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    pid_bh = pid // num_m_blocks
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Nq
    delta = tl.zeros([BLOCK_M], ACC_DTYPE)
    for c in range(NUM_DV):
        offs_d = c * BLOCK_DV + tl.arange(0, BLOCK_DV)
        tile_mask = m_mask[:, None] & (offs_d[None, :] < DV)
        rows = offs_m[:, None].to(tl.int64)
        o = tl.load(Out + b * stride_ob + h * stride_oh + rows * stride_om + offs_d[None, :], mask=tile_mask, other=0.0)
        do_ptrs = DOut + b * stride_gb + h * stride_gh + rows * stride_gm + offs_d[None, :]
        do = tl.load(do_ptrs, mask=tile_mask, other=0.0)
        delta += tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1)
    if HAS_DLSE:
        dlse = tl.load(DLse + b * stride_lb + h * stride_lh + offs_m, mask=m_mask, other=0.0)
        delta -= dlse.to(ACC_DTYPE)
    tl.store(Delta + b * stride_db + h * stride_dh + offs_m, delta, mask=m_mask)


@triton.jit
def _dkdv_query_loop(
    dk, dv, k, v, keep, q_base, do_base, dq_base, k_base, v_base, lse_row, delta_row, q_rope, k_rope,
    offs_n, rows, n_mask, offs_dk, offs_dv, start, end, kv_len, offset, qk_scale, sm_scale,
    stride_qm, stride_kn, stride_vn, stride_gm, stride_aqm, stride_qrs, stride_qrn, stride_krs, stride_krn,
    Nq, DQK, DV, ROT_DIM, DQK_OUT,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr,
    COMPUTE_DV: tl.constexpr, COMPUTE_DKDQ: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr, BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """Accumulate dK/dV of one key block (gathered indices ``offs_n``, memory rows ``rows``) over
    query blocks ``[start, end)``. Everything is computed transposed (keys along rows) so dK and dV
    accumulate without transposing the big tiles. With rotary, q and k are rotated as they are
    loaded and dK/dQ come out in the rotated frame (the launcher turns them back)."""
    for start_m in range(start, end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < Nq
        # S^T = K Q^T: one q tile serves the scores and dK on the fast path.
        if NUM_DK == 1:
            q = _load_tile(
                q_base, offs_m, m_mask, stride_qm, offs_dk, DQK, q_rope, stride_qrs, stride_qrn, ROT_DIM,
                ROTARY, INTERLEAVED, ACC_DTYPE,
            )  # fmt: skip
            s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        else:
            s_t = _scores(
                k, k_base, q_base, rows, offs_m, keep, m_mask, stride_kn, stride_qm, DQK,
                k_rope, stride_krs, stride_krn, q_rope, stride_qrs, stride_qrn, ROT_DIM,
                BLOCK_N, BLOCK_M, BLOCK_DK, NUM_DK, ROTARY, INTERLEAVED, DOT_PRECISION, ACC_DTYPE,
            )  # fmt: skip
            if COMPUTE_DKDQ:
                q = _load_tile(
                    q_base, offs_m, m_mask, stride_qm, offs_dk, DQK, q_rope, stride_qrs, stride_qrn, ROT_DIM,
                    ROTARY, INTERLEAVED, ACC_DTYPE,
                )  # fmt: skip
        # Rows with no visible key stored lse = -inf, and rows past Nq load +inf: both give P = 0.
        lse = tl.load(lse_row + offs_m, mask=m_mask, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        p_t = tl.math.exp2(s_t * qk_scale - (lse * 1.4426950408889634)[None, :])
        if MASKED:
            visible_t = _visible(offs_m[None, :], offs_n[:, None], kv_len, offset, CAUSAL)
            p_t = tl.where(visible_t, p_t, 0.0)
        if HAS_PAD:
            p_t = tl.where(keep[:, None], p_t, 0.0)

        if NUM_DV == 1:
            do = _load_rows(do_base, offs_m, m_mask, stride_gm, offs_dv, DV)
            if COMPUTE_DKDQ:
                dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        else:
            if COMPUTE_DV:
                do = _load_rows(do_base, offs_m, m_mask, stride_gm, offs_dv, DV)
            if COMPUTE_DKDQ:
                dp_t = _scores(
                    v, v_base, do_base, rows, offs_m, keep, m_mask, stride_vn, stride_gm, DV,
                    v_base, 0, 0, v_base, 0, 0, 0,  # no rotary tables: v and dO are not rotated
                    BLOCK_N, BLOCK_M, BLOCK_DV, NUM_DV, False, INTERLEAVED, DOT_PRECISION, ACC_DTYPE,
                )  # fmt: skip
        if COMPUTE_DV:
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        if COMPUTE_DKDQ:
            delta = tl.load(delta_row + offs_m, mask=m_mask, other=0.0)
            # where, not a product: a masked pair (p = 0) must give 0 even if delta is not finite
            # (a non-finite gradient of the lse of a row with no visible key).
            ds_t = tl.where(p_t != 0.0, p_t * (dp_t - delta[None, :]), 0.0).to(q.dtype)  # (BLOCK_N, BLOCK_M)
            dk += tl.dot(ds_t, q, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
            if ATOMIC_DQ:
                dq = tl.dot(tl.trans(ds_t), k, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
                tl.atomic_add(
                    dq_base + offs_m[:, None].to(tl.int64) * stride_aqm + offs_dk[None, :],
                    dq * sm_scale,
                    mask=m_mask[:, None] & (offs_dk[None, :] < DQK_OUT),
                )
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DQacc, DK, DV_, KeyPad, KvLen, KvIndex, QRope, KRope, KeysAfter,
    stride_gb, stride_gm, stride_gh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_lb, stride_lh,
    stride_aqb, stride_aqm, stride_aqh,
    stride_pb, stride_pn,
    stride_ib,
    stride_qrs, stride_qrb, stride_qrn,
    stride_krs, stride_krb, stride_krn,
    H, Nq, Nk, Nk_rows, DQK, DV, ROT_DIM, DQK_OUT, DV_OUT,
    qk_scale, sm_scale, num_n_blocks, num_z,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_KV_INDEX: tl.constexpr,
    HAS_KEYS_AFTER: tl.constexpr,
    ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr,
    COMPUTE_DV: tl.constexpr, COMPUTE_DKDQ: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_N keys of one (batch, head) and, on the chunked path, one head-dim chunk
    # (a v chunk when computing dV, a qk chunk when computing dK/dQ). DQK/DV are the loaded (16-aligned)
    # head dims, DQK_OUT/DV_OUT the gradients'.
    pid = tl.program_id(0)
    pid_n = pid % num_n_blocks
    rest = pid // num_n_blocks
    chunk = rest % num_z
    pid_bh = rest // num_z
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    q_base = Q + b * stride_qb + h * stride_qh
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    do_base = DOut + b * stride_gb + h * stride_gh
    dq_base = DQacc + b * stride_aqb + h * stride_aqh
    lse_row = Lse + b * stride_lb + h * stride_lh
    delta_row = Delta + b * stride_lb + h * stride_lh
    q_rope = QRope + b * stride_qrb
    k_rope = KRope + b * stride_krb

    n_start = pid_n * BLOCK_N
    offs_n = n_start + tl.arange(0, BLOCK_N)
    # The head-dim chunk this program owns: a qk chunk when computing dK/dQ, a v chunk when
    # computing dV (the other dim starts at chunk 0). A fused launch has chunk == 0.
    dk_chunk = 0
    dv_chunk = 0
    if COMPUTE_DKDQ:
        dk_chunk = chunk
    if COMPUTE_DV:
        dv_chunk = chunk
    offs_dk = dk_chunk * BLOCK_DK + tl.arange(0, BLOCK_DK)
    offs_dv = dv_chunk * BLOCK_DV + tl.arange(0, BLOCK_DV)

    kv_len = _kv_length(KvLen, b, Nk, HAS_KVLEN)
    offset = causal_offset(kv_len, Nq) + _keys_after(KeysAfter, b, Nk, HAS_KEYS_AFTER)
    n_mask = offs_n < kv_len
    rows = _key_rows(KvIndex + b * stride_ib, offs_n, offs_n < Nk, Nk_rows, HAS_KV_INDEX)
    keep = n_mask
    if HAS_PAD:
        keep = _key_kept(KeyPad + b * stride_pb, rows, n_mask, stride_pn)
    # Padded keys are never loaded (zeros instead, here and in the query loop): whatever their memory holds
    # cannot reach dQ, or dS through dP, as a zero probability times a non-finite value.
    # K stays in registers (rotated, with rotary): for the scores on the fast path, and for dQ.
    if NUM_DK == 1 or COMPUTE_DKDQ:
        k = _load_tile(
            k_base, rows, keep, stride_kn, offs_dk, DQK, k_rope, stride_krs, stride_krn, ROT_DIM,
            ROTARY, INTERLEAVED, ACC_DTYPE,
        )  # fmt: skip
    else:
        k = k_base  # unused
    if NUM_DV == 1 and COMPUTE_DKDQ:
        v = _load_rows(v_base, rows, keep, stride_vn, offs_dv, DV)
    else:
        v = v_base  # unused

    # Query i sees key j iff j <= i + offset. Query blocks below m_start see nothing of this
    # key block; from m_full on every row sees all of it, so only [m_start, m_full) needs the index
    # mask. A key block reaching past kv_lengths[b] is masked throughout, and one wholly past it
    # skips the loops and stores dK = dV = 0.
    m_end = tl.where(n_start >= kv_len, 0, Nq)
    m_start = 0
    m_full = 0
    if CAUSAL:
        m_start = (tl.maximum(n_start - offset, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.cdiv(tl.maximum(n_start + BLOCK_N - 1 - offset, 0), BLOCK_M) * BLOCK_M
    m_full = tl.where(n_start + BLOCK_N > kv_len, m_end, m_full)
    m_full = tl.minimum(tl.maximum(m_full, m_start), m_end)

    dk = tl.zeros([BLOCK_N, BLOCK_DK], ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC_DTYPE)
    dk, dv = _dkdv_query_loop(
        dk, dv, k, v, keep, q_base, do_base, dq_base, k_base, v_base, lse_row, delta_row, q_rope, k_rope,
        offs_n, rows, n_mask, offs_dk, offs_dv, m_start, m_full, kv_len, offset, qk_scale, sm_scale,
        stride_qm, stride_kn, stride_vn, stride_gm, stride_aqm, stride_qrs, stride_qrn, stride_krs, stride_krn,
        Nq, DQK, DV, ROT_DIM, DQK_OUT,
        True, CAUSAL, HAS_PAD, COMPUTE_DV, COMPUTE_DKDQ, ATOMIC_DQ, ROTARY, INTERLEAVED,
        BLOCK_M, BLOCK_N, BLOCK_DK, NUM_DK, BLOCK_DV, NUM_DV, DOT_PRECISION, ACC_DTYPE,
    )  # fmt: skip
    dk, dv = _dkdv_query_loop(
        dk, dv, k, v, keep, q_base, do_base, dq_base, k_base, v_base, lse_row, delta_row, q_rope, k_rope,
        offs_n, rows, n_mask, offs_dk, offs_dv, m_full, m_end, kv_len, offset, qk_scale, sm_scale,
        stride_qm, stride_kn, stride_vn, stride_gm, stride_aqm, stride_qrs, stride_qrn, stride_krs, stride_krn,
        Nq, DQK, DV, ROT_DIM, DQK_OUT,
        False, CAUSAL, HAS_PAD, COMPUTE_DV, COMPUTE_DKDQ, ATOMIC_DQ, ROTARY, INTERLEAVED,
        BLOCK_M, BLOCK_N, BLOCK_DK, NUM_DK, BLOCK_DV, NUM_DV, DOT_PRECISION, ACC_DTYPE,
    )  # fmt: skip

    # Every key row is written, including padded ones and rows past kv_lengths (zeros there); with
    # kv_index the gathered rows are (unique, so no two programs collide), the rest stay zero.
    row_mask = (offs_n < Nk)[:, None]
    out_rows = rows[:, None].to(tl.int64)
    if COMPUTE_DV:
        dv_ptrs = DV_ + b * stride_dvb + h * stride_dvh + out_rows * stride_dvn + offs_dv[None, :]
        tl.store(dv_ptrs, dv.to(DV_.dtype.element_ty), mask=row_mask & (offs_dv[None, :] < DV_OUT))
    if COMPUTE_DKDQ:
        dk_ptrs = DK + b * stride_dkb + h * stride_dkh + out_rows * stride_dkn + offs_dk[None, :]
        dk = dk * sm_scale
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=row_mask & (offs_dk[None, :] < DQK_OUT))


@triton.jit
def _dq_key_loop(
    dq, q, do, lse, delta, k_base, v_base, pad_row, kv_index_row, k_rope, offs_m, start, end, key_end,
    offset, qk_scale, stride_kn, stride_vn, stride_pn, stride_krs, stride_krn, Nk_rows, DQK, DV, ROT_DIM,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_KV_INDEX: tl.constexpr,
    ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """dQ of one query block over key blocks ``[start, end)`` (fast path: one head-dim chunk)."""
    for start_n in range(start, end, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_mask = offs_n < key_end
        rows = _key_rows(kv_index_row, offs_n, n_mask, Nk_rows, HAS_KV_INDEX)
        kept = n_mask  # padded keys are never loaded (see the dK/dV kernel)
        if HAS_PAD:
            kept = _key_kept(pad_row, rows, n_mask, stride_pn)
        k = _load_tile(
            k_base, rows, kept, stride_kn, tl.arange(0, BLOCK_DK), DQK, k_rope, stride_krs, stride_krn, ROT_DIM,
            ROTARY, INTERLEAVED, ACC_DTYPE,
        )  # fmt: skip
        v = _load_rows(v_base, rows, kept, stride_vn, tl.arange(0, BLOCK_DV), DV)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m[:, None], offs_n[None, :], key_end, offset, CAUSAL), p, 0.0)
        if HAS_PAD:
            p = tl.where(kept[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        ds = tl.where(p != 0.0, p * (dp - delta[:, None]), 0.0).to(k.dtype)  # see ds_t above
        dq += tl.dot(ds, k, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOut, Out, DLse, Lse, Delta, DQ, KeyPad, KvLen, KvIndex, QRope, KRope, KeysAfter,
    stride_gb, stride_gm, stride_gh,
    stride_ob, stride_om, stride_oh,
    stride_glb, stride_glh,
    stride_ds, stride_db, stride_dm, stride_dh,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_lb, stride_lh,
    stride_pb, stride_pn,
    stride_ib,
    stride_qrs, stride_qrb, stride_qrn,
    stride_krs, stride_krb, stride_krn,
    H, Nq, Nk, Nk_rows, DQK, DV, ROT_DIM, DQK_OUT,
    qk_scale, sm_scale, keys_per_split, num_m_blocks, num_splits,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_KV_INDEX: tl.constexpr,
    HAS_KEYS_AFTER: tl.constexpr,
    ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr, HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_M queries x one key split of one (batch, head), like the forward. Each
    # split writes its own partial dQ (no atomics), or dQ itself when there is one split. The row
    # term delta = rowsum(dO * O) - dlse is computed here from the rows already at hand (no pass of
    # its own); split 0 stores it for the dK/dV kernel, which runs after this one.
    pid = tl.program_id(0)
    pid_m = pid % num_m_blocks
    rest = pid // num_m_blocks
    split = rest % num_splits
    pid_bh = rest // num_splits
    b = (pid_bh // H).to(tl.int64)
    h = (pid_bh % H).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = offs_m < Nq
    kv_len = _kv_length(KvLen, b, Nk, HAS_KVLEN)
    offset = causal_offset(kv_len, Nq) + _keys_after(KeysAfter, b, Nk, HAS_KEYS_AFTER)
    lo, key_end, hi, full_end = _split_key_range(pid_m, split, keys_per_split, kv_len, offset, CAUSAL, BLOCK_M, BLOCK_N)

    q = _load_tile(
        Q + b * stride_qb + h * stride_qh, offs_m, m_mask, stride_qm, tl.arange(0, BLOCK_DK), DQK,
        QRope + b * stride_qrb, stride_qrs, stride_qrn, ROT_DIM, ROTARY, INTERLEAVED, ACC_DTYPE,
    )  # fmt: skip
    offs_dv = tl.arange(0, BLOCK_DV)
    do = _load_rows(DOut + b * stride_gb + h * stride_gh, offs_m, m_mask, stride_gm, offs_dv, DV)
    o = _load_rows(Out + b * stride_ob + h * stride_oh, offs_m, m_mask, stride_om, offs_dv, DV)
    delta = tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1)
    if HAS_DLSE:
        # A gradient flowing into lse adds P to dS, which is the same as lowering delta by dlse.
        delta -= tl.load(DLse + b * stride_glb + h * stride_glh + offs_m, mask=m_mask, other=0.0).to(ACC_DTYPE)
    tl.store(Delta + b * stride_lb + h * stride_lh + offs_m, delta, mask=m_mask & (split == 0))
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + offs_m, mask=m_mask, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    pad_row = KeyPad + b * stride_pb
    kv_index_row = KvIndex + b * stride_ib
    k_rope = KRope + b * stride_krb

    dq = tl.zeros([BLOCK_M, BLOCK_DK], ACC_DTYPE)
    dq = _dq_key_loop(
        dq, q, do, lse, delta, k_base, v_base, pad_row, kv_index_row, k_rope, offs_m, lo, full_end, key_end,
        offset, qk_scale, stride_kn, stride_vn, stride_pn, stride_krs, stride_krn, Nk_rows, DQK, DV, ROT_DIM,
        False, CAUSAL, HAS_PAD, HAS_KV_INDEX, ROTARY, INTERLEAVED, BLOCK_N, BLOCK_DK, BLOCK_DV,
        DOT_PRECISION, ACC_DTYPE,
    )  # fmt: skip
    dq = _dq_key_loop(
        dq, q, do, lse, delta, k_base, v_base, pad_row, kv_index_row, k_rope, offs_m, full_end, hi, key_end,
        offset, qk_scale, stride_kn, stride_vn, stride_pn, stride_krs, stride_krn, Nk_rows, DQK, DV, ROT_DIM,
        True, CAUSAL, HAS_PAD, HAS_KV_INDEX, ROTARY, INTERLEAVED, BLOCK_N, BLOCK_DK, BLOCK_DV,
        DOT_PRECISION, ACC_DTYPE,
    )  # fmt: skip
    offs_d = tl.arange(0, BLOCK_DK)
    dq_ptrs = (
        DQ + split.to(tl.int64) * stride_ds + b * stride_db + h * stride_dh
        + offs_m[:, None].to(tl.int64) * stride_dm + offs_d[None, :]
    )  # fmt: skip
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_mask[:, None] & (offs_d[None, :] < DQK_OUT))


class BackwardPlan(NamedTuple):
    """A backward, planned once per signature: which kernels run, their grids and scalar arguments
    (all but the strides of what the caller hands in: dO, out, dlse, and the gradients' layouts).

    Launch order: the split dQ kernel (which also computes delta), then dK/dV, then what turns float32
    buffers into gradients (``kernels/rotary.py``'s sum-and-rotate: split partials, a broadcast
    query's batch, rotary's inverse rotation). The atomic dQ path (head dims above the fast path, or
    ``dq_mode="atomic"``) computes delta in a pass of its own first.
    """

    pro: Prologue
    dq_split: bool  # dQ by the split kernel (else atomics from the dK/dV kernel into a float32 buffer)
    num_splits: int
    dq_direct: bool  # the split kernel writes dq itself (one split, no broadcast, no rotary)
    dq_grid: tuple[int]
    dq_ints: tuple
    dq_constexprs: dict
    delta_grid: tuple[int]  # atomic path only
    delta_ints: tuple
    delta_constexprs: dict
    dkdv: tuple  # ((grid, ints, constexprs), ...): one launch, or two above the fast path


@functools.lru_cache(maxsize=1024)
def backward_plan(
    sig: tuple, scale: float, num_splits: int, has_dlse: bool, config: configs.BackwardConfig | None
) -> BackwardPlan:
    """The :class:`BackwardPlan` of a :func:`~.common.signature`; ``num_splits`` 0 asks the heuristic."""
    pro = prologue(sig)
    batch, heads, num_queries, num_keys = pro.batch, pro.heads, pro.num_queries, pro.num_keys
    qk_tiles, v_tiles = pro.qk_tiles, pro.v_tiles
    fast_path = qk_tiles.num_chunks == 1 and v_tiles.num_chunks == 1
    cfg = config or configs.backward_config(
        pro.kernel_head_dim_qk, pro.kernel_head_dim_v, pro.is_cuda, element_size=pro.element_size,
        rotary=pro.flags["ROTARY"],
    )  # fmt: skip
    # The split dQ kernel keeps whole q/dO rows in registers: fast path only.
    dq_split = cfg.dq_mode == "split" and fast_path
    flags = pro.flags
    lse_strides = configs.contiguous_strides((batch, heads, num_queries))[:2]  # lse and delta
    inputs = (*pro.input_strides, *lse_strides)
    dq_grid, dq_ints, dq_constexprs, dq_direct = (0,), (), {}, False
    delta_grid, delta_ints, delta_constexprs = (0,), (), {}
    if dq_split:
        num_m_blocks = configs.cdiv(num_queries, cfg.dq_block_m)
        num_splits, keys_per_split = configs.plan_kv_splits(
            num_splits, batch * heads * num_m_blocks, num_keys, cfg.dq_block_n, pro.sms
        )
        dq_direct = num_splits == 1 and not pro.broadcast_q and not flags["ROTARY"]
        dq_grid = (num_m_blocks * num_splits * batch * heads,)
        dq_ints = (
            *inputs, *pro.mask_strides, *pro.sizes, pro.head_dim_qk, scale * LOG2E, scale, keys_per_split,
            num_m_blocks, num_splits,
        )  # fmt: skip
        dq_constexprs = dict(
            **flags, HAS_DLSE=has_dlse, BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n, BLOCK_DK=qk_tiles.block,
            BLOCK_DV=v_tiles.block, num_warps=cfg.dq_num_warps, num_stages=cfg.dq_num_stages,
        )  # fmt: skip
        dq_acc_strides = (0, 0, 0)  # no atomic buffer
    else:
        num_splits = 1
        delta_block_m = 64 if pro.is_cuda else 16
        delta_blocks = configs.cdiv(num_queries, delta_block_m)
        delta_grid = (delta_blocks * batch * heads,)
        delta_ints = (*lse_strides, heads, num_queries, pro.kernel_head_dim_v, delta_blocks)
        delta_constexprs = dict(
            HAS_DLSE=has_dlse, BLOCK_M=delta_block_m, BLOCK_DV=v_tiles.block, NUM_DV=v_tiles.num_chunks,
            ACC_DTYPE=flags["ACC_DTYPE"],
        )  # fmt: skip
        # A broadcast batch-1 query's buffer gets batch stride 0: every sample adds into the same rows.
        dq_acc_strides = configs.contiguous_strides((1 if pro.broadcast_q else batch, num_queries, heads,
                                                     pro.head_dim_qk))[:3]  # fmt: skip
        if pro.broadcast_q:
            dq_acc_strides = (0, *dq_acc_strides[1:])
    num_n_blocks = configs.cdiv(num_keys, cfg.block_n)
    constexprs = dict(
        **flags, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_DK=qk_tiles.block, NUM_DK=qk_tiles.num_chunks,
        BLOCK_DV=v_tiles.block, NUM_DV=v_tiles.num_chunks, ATOMIC_DQ=not dq_split,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    ints = (*inputs, *dq_acc_strides, *pro.mask_strides, *pro.sizes, pro.head_dim_qk, pro.head_dim_v,
            scale * LOG2E, scale, num_n_blocks)  # fmt: skip
    if fast_path:
        chunks = ((1, True, True),)
    else:  # dV over v-dim chunks, then dK (and dQ's atomics) over qk-dim chunks
        chunks = ((v_tiles.num_chunks, True, False), (qk_tiles.num_chunks, False, True))
    dkdv = tuple(
        ((num_n_blocks * num_z * batch * heads,), (*ints, num_z), dict(constexprs, COMPUTE_DV=dv, COMPUTE_DKDQ=dkdq))
        for num_z, dv, dkdq in chunks
    )
    return BackwardPlan(
        pro, dq_split, num_splits, dq_direct, dq_grid, dq_ints, dq_constexprs, delta_grid, delta_ints,
        delta_constexprs, dkdv,
    )  # fmt: skip


def attention_backward(
    grad_out: torch.Tensor,
    grad_lse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
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
    config: configs.BackwardConfig | None = None,
    keys_after: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`attention_forward`; the arguments are the ``triton_attention_bwd`` op's.

    Args:
        grad_out: ``(B, Nq, H, Dv)``, last dim contiguous; grad_lse: ``(B, H, Nq)`` or None.
        q ... scale: as given to the forward; out, lse: its outputs.
        num_splits: key-axis splits of the dQ pass (split dQ mode); 0 chooses from the SM count.
        config: tiles and dQ strategy; default ``configs.backward_config`` (benchmarks sweep it).

    Returns:
        ``dq`` (summed over the batch when ``Bq == 1``), ``dk``, ``dv`` shaped like q, k and v and laid out
        as ``torch.empty_like`` lays them out (a permuted input gets a permuted gradient, so autograd adds
        no copy), in the inputs' dtype.
    """
    if kv_index is not None and k.shape[1] == 0:
        kv_index = kv_index[:, :0]  # nothing was gathered: every gradient is zero
    sig = signature(q, k, v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, rotary_dim, rotary_interleaved,
                    causal, keys_after)  # fmt: skip
    plan = backward_plan(sig, scale, num_splits, grad_lse is not None, config)
    pro = plan.pro
    if not plan.dq_split:  # dQ by float32 atomics: their order, and so dQ's rounding, varies between runs
        alert_not_deterministic(
            f"perceiver_kernels' Triton attention backward with head dims {pro.head_dim_qk}/{pro.head_dim_v} (dQ "
            "by atomics above the fast path's head dims)"
        )
    # Rows that are not gathered (kv_index) get no store: they start from zero.
    new_like = torch.empty_like if kv_index is None else torch.zeros_like
    dq, dv = torch.empty_like(q), new_like(v)
    if plan.dkdv[0][0][0] == 0 or pro.num_keys == 0:  # nothing to compute: zero gradients
        return dq.zero_(), new_like(k).zero_(), dv.zero_()
    stats = lse.dtype
    lse = lse.contiguous()
    q_in, k_in, v_in, *masks = kernel_inputs(
        pro, q, k, v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, keys_after
    )
    if pro.copy_v:  # out and dO are read with v's kernel head dim
        out, grad_out = with_head_dim(out, pro.kernel_head_dim_v), with_head_dim(grad_out, pro.kernel_head_dim_v)
    if q_rope is None:
        dk = new_like(k)
    else:  # float32 while it is in the rotated frame; turned back below
        dk = q.new_zeros if kv_index is not None else q.new_empty
        dk = dk((pro.batch, pro.num_rows, pro.heads, pro.head_dim_qk), dtype=stats)
    delta = torch.empty_like(lse)
    dlse = lse if grad_lse is None else grad_lse
    g_strides = grad_out.stride()[:3]
    dlse_strides = dlse.stride()[:2]
    if plan.dq_split:
        if plan.dq_direct:
            dq_buf, dq_strides = dq, (0, *dq.stride()[:3])
        else:
            dq_buf = q.new_empty((plan.num_splits, pro.batch, *dq.shape[1:]), dtype=stats)
            dq_strides = dq_buf.stride()[:4]
        launch(
            _bwd_dq_kernel, plan.dq_grid,
            (q_in, k_in, v_in, grad_out, out, dlse, lse, delta, dq_buf, *masks,
             *g_strides, *out.stride()[:3], *dlse_strides, *dq_strides, *plan.dq_ints),
            plan.dq_constexprs,
        )  # fmt: skip
        dq_acc = q  # unused by the dK/dV kernel
    else:
        launch(
            _bwd_delta_kernel, plan.delta_grid,
            (out, grad_out, dlse, delta, *out.stride()[:3], *g_strides, *dlse_strides, *plan.delta_ints),
            plan.delta_constexprs,
        )  # fmt: skip
        dq_buf = dq_acc = q.new_zeros((q.shape[0], *dq.shape[1:]), dtype=stats)
    for grid, ints, constexprs in plan.dkdv:
        launch(
            _bwd_dkdv_kernel, grid,
            (q_in, k_in, v_in, grad_out, lse, delta, dq_acc, dk, dv, *masks,
             *g_strides, *dk.stride()[:3], *dv.stride()[:3], *ints),
            constexprs,
        )  # fmt: skip
    if q_rope is not None:
        dk = sum_and_rotate(dk.unsqueeze(0), torch.empty_like(k), k_rope, rotary_dim, rotary_interleaved, inverse=True)
    if not plan.dq_direct:
        parts = dq_buf if plan.dq_split else dq_buf.unsqueeze(0)
        if pro.broadcast_q:  # the partials of every sample add into the one query
            parts = parts.flatten(0, 1).unsqueeze(1)
        dq = sum_and_rotate(parts, dq, q_rope, rotary_dim, rotary_interleaved, inverse=True)
    return dq, dk, dv
