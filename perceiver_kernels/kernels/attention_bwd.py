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
    offs_n, rows, n_mask, offs_dk, offs_dv, start, end, kv_len, causal_offset, qk_scale, sm_scale,
    stride_qm, stride_kn, stride_vn, stride_gm, stride_aqm, stride_qrs, stride_qrn, stride_krs, stride_krn,
    Nq, DQK, DV, ROT_DIM,
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
                k, k_base, q_base, rows, offs_m, n_mask, m_mask, stride_kn, stride_qm, DQK,
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
            visible_t = _visible(offs_m[None, :], offs_n[:, None], kv_len, causal_offset, CAUSAL)
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
                    v, v_base, do_base, rows, offs_m, n_mask, m_mask, stride_vn, stride_gm, DV,
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
                    mask=m_mask[:, None] & (offs_dk[None, :] < DQK),
                )
    return dk, dv


@triton.jit
def _bwd_dkdv_kernel(
    Q, K, V, DOut, Lse, Delta, DQacc, DK, DV_, KeyPad, KvLen, KvIndex, QRope, KRope,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_gb, stride_gm, stride_gh,
    stride_lb, stride_lh,
    stride_aqb, stride_aqm, stride_aqh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_pb, stride_pn,
    stride_ib,
    stride_qrs, stride_qrb, stride_qrn,
    stride_krs, stride_krb, stride_krn,
    H, Nq, Nk, Nk_rows, DQK, DV, ROT_DIM,
    qk_scale, sm_scale, num_n_blocks, num_z,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_KV_INDEX: tl.constexpr,
    ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr,
    COMPUTE_DV: tl.constexpr, COMPUTE_DKDQ: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_N keys of one (batch, head) and, on the chunked path, one head-dim chunk
    # (a v chunk when computing dV, a qk chunk when computing dK/dQ).
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
    causal_offset = kv_len - Nq
    n_mask = offs_n < kv_len
    rows = _key_rows(KvIndex + b * stride_ib, offs_n, offs_n < Nk, Nk_rows, HAS_KV_INDEX)
    keep = n_mask
    if HAS_PAD:
        keep = _key_kept(KeyPad + b * stride_pb, rows, n_mask, stride_pn)
    # K stays in registers (rotated, with rotary): for the scores on the fast path, and for dQ.
    if NUM_DK == 1 or COMPUTE_DKDQ:
        k = _load_tile(
            k_base, rows, n_mask, stride_kn, offs_dk, DQK, k_rope, stride_krs, stride_krn, ROT_DIM,
            ROTARY, INTERLEAVED, ACC_DTYPE,
        )  # fmt: skip
    else:
        k = k_base  # unused
    if NUM_DV == 1 and COMPUTE_DKDQ:
        v = _load_rows(v_base, rows, n_mask, stride_vn, offs_dv, DV)
    else:
        v = v_base  # unused

    # Query i sees key j iff j <= i + causal_offset. Query blocks below m_start see nothing of this
    # key block; from m_full on every row sees all of it, so only [m_start, m_full) needs the index
    # mask. A key block reaching past kv_lengths[b] is masked throughout, and one wholly past it
    # skips the loops and stores dK = dV = 0.
    m_end = tl.where(n_start >= kv_len, 0, Nq)
    m_start = 0
    m_full = 0
    if CAUSAL:
        m_start = (tl.maximum(n_start - causal_offset, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.cdiv(tl.maximum(n_start + BLOCK_N - 1 - causal_offset, 0), BLOCK_M) * BLOCK_M
    m_full = tl.where(n_start + BLOCK_N > kv_len, m_end, m_full)
    m_full = tl.minimum(tl.maximum(m_full, m_start), m_end)

    dk = tl.zeros([BLOCK_N, BLOCK_DK], ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC_DTYPE)
    dk, dv = _dkdv_query_loop(
        dk, dv, k, v, keep, q_base, do_base, dq_base, k_base, v_base, lse_row, delta_row, q_rope, k_rope,
        offs_n, rows, n_mask, offs_dk, offs_dv, m_start, m_full, kv_len, causal_offset, qk_scale, sm_scale,
        stride_qm, stride_kn, stride_vn, stride_gm, stride_aqm, stride_qrs, stride_qrn, stride_krs, stride_krn,
        Nq, DQK, DV, ROT_DIM,
        True, CAUSAL, HAS_PAD, COMPUTE_DV, COMPUTE_DKDQ, ATOMIC_DQ, ROTARY, INTERLEAVED,
        BLOCK_M, BLOCK_N, BLOCK_DK, NUM_DK, BLOCK_DV, NUM_DV, DOT_PRECISION, ACC_DTYPE,
    )  # fmt: skip
    dk, dv = _dkdv_query_loop(
        dk, dv, k, v, keep, q_base, do_base, dq_base, k_base, v_base, lse_row, delta_row, q_rope, k_rope,
        offs_n, rows, n_mask, offs_dk, offs_dv, m_full, m_end, kv_len, causal_offset, qk_scale, sm_scale,
        stride_qm, stride_kn, stride_vn, stride_gm, stride_aqm, stride_qrs, stride_qrn, stride_krs, stride_krn,
        Nq, DQK, DV, ROT_DIM,
        False, CAUSAL, HAS_PAD, COMPUTE_DV, COMPUTE_DKDQ, ATOMIC_DQ, ROTARY, INTERLEAVED,
        BLOCK_M, BLOCK_N, BLOCK_DK, NUM_DK, BLOCK_DV, NUM_DV, DOT_PRECISION, ACC_DTYPE,
    )  # fmt: skip

    # Every key row is written, including padded ones and rows past kv_lengths (zeros there); with
    # kv_index the gathered rows are (unique, so no two programs collide), the rest stay zero.
    row_mask = (offs_n < Nk)[:, None]
    out_rows = rows[:, None].to(tl.int64)
    if COMPUTE_DV:
        dv_ptrs = DV_ + b * stride_dvb + h * stride_dvh + out_rows * stride_dvn + offs_dv[None, :]
        tl.store(dv_ptrs, dv.to(DV_.dtype.element_ty), mask=row_mask & (offs_dv[None, :] < DV))
    if COMPUTE_DKDQ:
        dk_ptrs = DK + b * stride_dkb + h * stride_dkh + out_rows * stride_dkn + offs_dk[None, :]
        dk = dk * sm_scale
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=row_mask & (offs_dk[None, :] < DQK))


@triton.jit
def _dq_key_loop(
    dq, q, do, lse, delta, k_base, v_base, pad_row, kv_index_row, k_rope, offs_m, start, end, key_end,
    causal_offset, qk_scale, stride_kn, stride_vn, stride_pn, stride_krs, stride_krn, Nk_rows, DQK, DV, ROT_DIM,
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
        k = _load_tile(
            k_base, rows, n_mask, stride_kn, tl.arange(0, BLOCK_DK), DQK, k_rope, stride_krs, stride_krn, ROT_DIM,
            ROTARY, INTERLEAVED, ACC_DTYPE,
        )  # fmt: skip
        v = _load_rows(v_base, rows, n_mask, stride_vn, tl.arange(0, BLOCK_DV), DV)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        p = tl.math.exp2(s * qk_scale - lse[:, None])
        if MASKED:
            p = tl.where(_visible(offs_m[:, None], offs_n[None, :], key_end, causal_offset, CAUSAL), p, 0.0)
        if HAS_PAD:
            p = tl.where(_key_kept(pad_row, rows, n_mask, stride_pn)[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
        ds = tl.where(p != 0.0, p * (dp - delta[:, None]), 0.0).to(k.dtype)  # see ds_t above
        dq += tl.dot(ds, k, input_precision=DOT_PRECISION, out_dtype=ACC_DTYPE)
    return dq


@triton.jit
def _bwd_dq_kernel(
    Q, K, V, DOut, Lse, Delta, DQ, KeyPad, KvLen, KvIndex, QRope, KRope,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_gb, stride_gm, stride_gh,
    stride_lb, stride_lh,
    stride_ds, stride_db, stride_dm, stride_dh,
    stride_pb, stride_pn,
    stride_ib,
    stride_qrs, stride_qrb, stride_qrn,
    stride_krs, stride_krb, stride_krn,
    H, Nq, Nk, Nk_rows, DQK, DV, ROT_DIM,
    qk_scale, sm_scale, keys_per_split, num_m_blocks, num_splits,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_KVLEN: tl.constexpr, HAS_KV_INDEX: tl.constexpr,
    ROTARY: tl.constexpr, INTERLEAVED: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, BLOCK_DV: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_M queries x one key split of one (batch, head), like the forward. Each
    # split writes its own partial dQ (no atomics); the launcher sums the splits.
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
    causal_offset = kv_len - Nq
    lo, key_end, hi, full_end = _split_key_range(
        pid_m, split, keys_per_split, kv_len, causal_offset, CAUSAL, BLOCK_M, BLOCK_N
    )

    q = _load_tile(
        Q + b * stride_qb + h * stride_qh, offs_m, m_mask, stride_qm, tl.arange(0, BLOCK_DK), DQK,
        QRope + b * stride_qrb, stride_qrs, stride_qrn, ROT_DIM, ROTARY, INTERLEAVED, ACC_DTYPE,
    )  # fmt: skip
    do = _load_rows(DOut + b * stride_gb + h * stride_gh, offs_m, m_mask, stride_gm, tl.arange(0, BLOCK_DV), DV)
    lse = tl.load(Lse + b * stride_lb + h * stride_lh + offs_m, mask=m_mask, other=float("inf"))
    lse = tl.where(lse == float("-inf"), float("inf"), lse) * 1.4426950408889634
    delta = tl.load(Delta + b * stride_lb + h * stride_lh + offs_m, mask=m_mask, other=0.0)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    pad_row = KeyPad + b * stride_pb
    kv_index_row = KvIndex + b * stride_ib
    k_rope = KRope + b * stride_krb

    dq = tl.zeros([BLOCK_M, BLOCK_DK], ACC_DTYPE)
    dq = _dq_key_loop(
        dq, q, do, lse, delta, k_base, v_base, pad_row, kv_index_row, k_rope, offs_m, lo, full_end, key_end,
        causal_offset, qk_scale, stride_kn, stride_vn, stride_pn, stride_krs, stride_krn, Nk_rows, DQK, DV, ROT_DIM,
        False, CAUSAL, HAS_PAD, HAS_KV_INDEX, ROTARY, INTERLEAVED, BLOCK_N, BLOCK_DK, BLOCK_DV,
        DOT_PRECISION, ACC_DTYPE,
    )  # fmt: skip
    dq = _dq_key_loop(
        dq, q, do, lse, delta, k_base, v_base, pad_row, kv_index_row, k_rope, offs_m, full_end, hi, key_end,
        causal_offset, qk_scale, stride_kn, stride_vn, stride_pn, stride_krs, stride_krn, Nk_rows, DQK, DV, ROT_DIM,
        True, CAUSAL, HAS_PAD, HAS_KV_INDEX, ROTARY, INTERLEAVED, BLOCK_N, BLOCK_DK, BLOCK_DV,
        DOT_PRECISION, ACC_DTYPE,
    )  # fmt: skip
    offs_d = tl.arange(0, BLOCK_DK)
    dq_ptrs = (
        DQ + split.to(tl.int64) * stride_ds + b * stride_db + h * stride_dh
        + offs_m[:, None].to(tl.int64) * stride_dm + offs_d[None, :]
    )  # fmt: skip
    tl.store(dq_ptrs, (dq * sm_scale).to(DQ.dtype.element_ty), mask=m_mask[:, None] & (offs_d[None, :] < DQK))


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
    causal: bool,
    scale: float,
    num_splits: int = 0,
    config: configs.BackwardConfig | None = None,
    kv_index: torch.Tensor | None = None,
    rope: Rope | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`attention_forward` with respect to q, k and v.

    Args:
        grad_out: ``(B, Nq, H, Dv)``, last dim contiguous; grad_lse: ``(B, H, Nq)`` or None.
        q, k, v, key_padding_mask, kv_lengths, causal, scale, kv_index, rope: as given to the forward.
        out, lse: the forward's outputs.
        num_splits: key-axis splits of the dQ pass (split dQ mode); 0 chooses from the SM count.
        config: tiles and dQ strategy; default ``configs.backward_config`` (benchmarks sweep it).

    Returns:
        ``dq (Bq, Nq, H, Dqk)`` (summed over the batch when ``Bq == 1``), ``dk``, ``dv`` shaped like
        q, k and v, in the inputs' dtype.
    """
    batch, num_rows, heads, head_dim_qk_in = k.shape
    num_keys = num_rows if kv_index is None else kv_index.shape[1]
    num_queries, head_dim_v_in = q.shape[1], v.shape[3]
    head_dim_qk = configs.aligned_head_dim(head_dim_qk_in, configs.QK_CHUNK)
    head_dim_v = configs.aligned_head_dim(head_dim_v_in, configs.V_CHUNK)
    q, k = with_head_dim(q, head_dim_qk), with_head_dim(k, head_dim_qk)
    v, out, grad_out = (with_head_dim(t, head_dim_v) for t in (v, out, grad_out))
    is_cuda = q.device.type == "cuda"
    qk_tiles = configs.head_dim_tiling(head_dim_qk, configs.QK_CHUNK)
    v_tiles = configs.head_dim_tiling(head_dim_v, configs.V_CHUNK)
    fast_path = qk_tiles.num_chunks == 1 and v_tiles.num_chunks == 1
    cfg = config or configs.backward_config(head_dim_qk, head_dim_v, is_cuda)
    # The split dQ kernel keeps whole q/dO rows in registers: fast path only.
    atomic_dq = cfg.dq_mode == "atomic" or not fast_path
    acc = acc_dtype(q.dtype)
    stats_dtype = lse.dtype
    broadcast_q = q.shape[0] == 1 and batch > 1
    q_batch_stride = 0 if broadcast_q else q.stride(0)
    pad, pad_stride_b, pad_stride_n, lengths = mask_args(q, key_padding_mask, kv_lengths)
    index = kv_index if kv_index is not None else lengths.new_empty(0)
    q_rope, k_rope = rope_args(rope, "q", q), rope_args(rope, "k", q)
    rotary_dim = rope.rotary_dim if rope else 0
    flags = dict(
        CAUSAL=causal, HAS_PAD=key_padding_mask is not None, HAS_KVLEN=kv_lengths is not None,
        HAS_KV_INDEX=kv_index is not None, ROTARY=rope is not None, INTERLEAVED=rope is None or rope.interleaved,
    )  # fmt: skip
    gather_args = (index.stride(0) if kv_index is not None else 0, *q_rope[1:], *k_rope[1:])

    delta = torch.empty((batch, heads, num_queries), device=q.device, dtype=stats_dtype)
    delta_block_m = 64 if is_cuda else 16
    delta_blocks = triton.cdiv(num_queries, delta_block_m)
    _bwd_delta_kernel[(delta_blocks * batch * heads,)](
        out, grad_out, grad_lse if grad_lse is not None else lse, delta,
        out.stride(0), out.stride(1), out.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        *(grad_lse.stride()[:2] if grad_lse is not None else (0, 0)),
        delta.stride(0), delta.stride(1),
        heads, num_queries, head_dim_v, delta_blocks,
        HAS_DLSE=grad_lse is not None, BLOCK_M=delta_block_m,
        BLOCK_DV=v_tiles.block, NUM_DV=v_tiles.num_chunks, ACC_DTYPE=acc,
    )  # fmt: skip

    if atomic_dq:
        # float32 accumulator (float64 for float64 inputs). A broadcast batch-1 query gets batch
        # stride 0, so every sample adds into the same rows: the batch sum for free.
        dq_buf = torch.zeros((q.shape[0], num_queries, heads, head_dim_qk), device=q.device, dtype=stats_dtype)
    else:
        dq_buf = q.new_empty(0)
    # With rotary, dK comes out in the rotated frame and is turned back afterwards: keep it in
    # float32 until then. With kv_index, rows that are not gathered get no store: start from zeros.
    new = torch.zeros if kv_index is not None else torch.empty
    dk = new(k.shape, device=k.device, dtype=stats_dtype if rope is not None else k.dtype)
    dv = new(v.shape, device=v.device, dtype=v.dtype)
    num_n_blocks = triton.cdiv(num_keys, cfg.block_n)

    def launch_dkdv(num_z: int, compute_dv: bool, compute_dkdq: bool) -> None:
        _bwd_dkdv_kernel[(num_n_blocks * num_z * batch * heads,)](
            q, k, v, grad_out, lse, delta, dq_buf, dk, dv, pad, lengths, index, q_rope[0], k_rope[0],
            q_batch_stride, q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            lse.stride(0), lse.stride(1),
            *((0 if broadcast_q else dq_buf.stride(0), dq_buf.stride(1), dq_buf.stride(2)) if atomic_dq else (0, 0, 0)),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            pad_stride_b, pad_stride_n, *gather_args,
            heads, num_queries, num_keys, num_rows, head_dim_qk, head_dim_v, rotary_dim,
            scale * LOG2E, scale, num_n_blocks, num_z, **flags,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_DK=qk_tiles.block, NUM_DK=qk_tiles.num_chunks,
            BLOCK_DV=v_tiles.block, NUM_DV=v_tiles.num_chunks,
            COMPUTE_DV=compute_dv, COMPUTE_DKDQ=compute_dkdq, ATOMIC_DQ=atomic_dq and compute_dkdq,
            DOT_PRECISION=dot_precision(q.dtype), ACC_DTYPE=acc,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    if fast_path:
        launch_dkdv(1, compute_dv=True, compute_dkdq=True)
    else:
        launch_dkdv(v_tiles.num_chunks, compute_dv=True, compute_dkdq=False)
        launch_dkdv(qk_tiles.num_chunks, compute_dv=False, compute_dkdq=True)
    dk = _turn_back(dk, rope, "k", k.dtype)
    if atomic_dq:
        return _unpad(_turn_back(dq_buf, rope, "q", q.dtype), dk, dv, head_dim_qk_in, head_dim_v_in)

    # Split dQ: parallel over query blocks and key splits, like the forward.
    num_m_blocks = triton.cdiv(num_queries, cfg.dq_block_m)
    num_splits, keys_per_split = configs.plan_kv_splits(
        num_splits, batch * heads * num_m_blocks, num_keys, cfg.dq_block_n, q.device.index if is_cuda else None
    )
    # Write dq itself when there are no partial sums to reduce and nothing to rotate back.
    direct = num_splits == 1 and not broadcast_q and rope is None
    if direct:
        dq_part = torch.empty_like(q, memory_format=torch.contiguous_format).unsqueeze(0)
    else:
        dq_part = torch.empty((num_splits, batch, num_queries, heads, head_dim_qk), device=q.device, dtype=stats_dtype)
    _bwd_dq_kernel[(num_m_blocks * num_splits * batch * heads,)](
        q, k, v, grad_out, lse, delta, dq_part, pad, lengths, index, q_rope[0], k_rope[0],
        q_batch_stride, q.stride(1), q.stride(2),
        k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2),
        grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
        lse.stride(0), lse.stride(1),
        dq_part.stride(0), dq_part.stride(1), dq_part.stride(2), dq_part.stride(3),
        pad_stride_b, pad_stride_n, *gather_args,
        heads, num_queries, num_keys, num_rows, head_dim_qk, head_dim_v, rotary_dim,
        scale * LOG2E, scale, keys_per_split, num_m_blocks, num_splits, **flags,
        BLOCK_M=cfg.dq_block_m, BLOCK_N=cfg.dq_block_n, BLOCK_DK=qk_tiles.block, BLOCK_DV=v_tiles.block,
        DOT_PRECISION=dot_precision(q.dtype), ACC_DTYPE=acc,
        num_warps=cfg.dq_num_warps, num_stages=cfg.dq_num_stages,
    )  # fmt: skip
    if direct:
        dq = dq_part.squeeze(0)
    else:
        dq = dq_part.sum(dim=(0, 1) if broadcast_q else 0, keepdim=False)
        dq = _turn_back(dq.unsqueeze(0) if broadcast_q else dq, rope, "q", q.dtype)
    return _unpad(dq, dk, dv, head_dim_qk_in, head_dim_v_in)


def _turn_back(grad: torch.Tensor, rope: Rope | None, which: str, dtype: torch.dtype) -> torch.Tensor:
    """A gradient computed against rotated q or k, rotated back (the inverse rotation is the
    transpose) and cast to the input dtype; only cast without rotary."""
    if rope is None:
        return grad.to(dtype)
    from .rotary import rotate

    return rotate(grad, getattr(rope, which), rope.rotary_dim, rope.interleaved, inverse=True, out_dtype=dtype)


def _unpad(dq, dk, dv, head_dim_qk: int, head_dim_v: int):
    """Drop the zero-padded head-dim columns added by ``with_head_dim``."""
    if dq.shape[-1] != head_dim_qk:
        dq, dk = dq[..., :head_dim_qk].contiguous(), dk[..., :head_dim_qk].contiguous()
    if dv.shape[-1] != head_dim_v:
        dv = dv[..., :head_dim_v].contiguous()
    return dq, dk, dv
