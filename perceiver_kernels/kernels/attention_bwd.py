"""Triton backward kernels.

``delta = rowsum(dO * O) - dlse`` is computed first. Then one program per key block (and head-dim
chunk) walks over all query blocks that can see it, accumulating dK and dV in registers, and adds its
share of dQ into a float32 buffer with atomics. Perceiver problems have few queries and very many keys,
so parallelising over key blocks keeps the GPU full; see docs/DESIGN.md for why dQ uses atomics.

Head dims above ``configs.MAX_FAST_HEAD_DIM`` run as two launches of the same kernel: one over v-dim
chunks computing dV, one over qk-dim chunks computing dK and dQ, each recomputing the probabilities.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .attention_fwd import LOG2E, _visible, acc_dtype, dot_precision


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
        do = tl.load(DOut + b * stride_gb + h * stride_gh + rows * stride_gm + offs_d[None, :], mask=tile_mask, other=0.0)
        delta += tl.sum(o.to(ACC_DTYPE) * do.to(ACC_DTYPE), 1)
    if HAS_DLSE:
        dlse = tl.load(DLse + b * stride_lb + h * stride_lh + offs_m, mask=m_mask, other=0.0)
        delta -= dlse.to(ACC_DTYPE)
    tl.store(Delta + b * stride_db + h * stride_dh + offs_m, delta, mask=m_mask)


@triton.jit
def _scores_t_chunked(
    k_base, q_base, offs_n, offs_m, n_mask, m_mask, stride_kn, stride_qm, DQK,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    """Transposed scores ``K Q^T`` of shape ``(BLOCK_N, BLOCK_M)``, summed over qk-dim chunks."""
    s_t = tl.zeros([BLOCK_N, BLOCK_M], ACC_DTYPE)
    for c in range(NUM_DK):
        offs_d = c * BLOCK_DK + tl.arange(0, BLOCK_DK)
        k_c = tl.load(
            k_base + offs_n[:, None].to(tl.int64) * stride_kn + offs_d[None, :],
            mask=n_mask[:, None] & (offs_d[None, :] < DQK),
            other=0.0,
        )
        q_t = tl.load(
            q_base + offs_m[None, :].to(tl.int64) * stride_qm + offs_d[:, None],
            mask=m_mask[None, :] & (offs_d[:, None] < DQK),
            other=0.0,
        )
        s_t += tl.dot(k_c, q_t, input_precision=DOT_PRECISION)
    return s_t


@triton.jit
def _bwd_kernel(
    Q, K, V, DOut, Lse, Delta, DQacc, DK, DV_, KeyPad, KvLen,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_gb, stride_gm, stride_gh,
    stride_lb, stride_lh,
    stride_aqb, stride_aqm, stride_aqh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_pb, stride_pn,
    H, Nq, Nk, DQK, DV,
    qk_scale, sm_scale, num_n_blocks, num_z,
    CAUSAL: tl.constexpr, HAS_PAD: tl.constexpr, HAS_KVLEN: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_DK: tl.constexpr, NUM_DK: tl.constexpr,
    BLOCK_DV: tl.constexpr, NUM_DV: tl.constexpr,
    FUSED: tl.constexpr, COMPUTE_DV: tl.constexpr, COMPUTE_DKDQ: tl.constexpr,
    DOT_PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
):  # fmt: skip
    # One program: BLOCK_N keys of one (batch, head) and, on the chunked path, one head-dim chunk
    # (a v chunk when computing dV, a qk chunk when computing dK/dQ). Everything is computed
    # transposed (keys along rows) so dK/dV accumulate without transposing the big tiles.
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
    row_stats = b * stride_lb + h * stride_lh
    pad_row = KeyPad + b * stride_pb

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    # The head-dim chunk this program owns: a qk chunk when computing dK/dQ, a v chunk when
    # computing dV; chunk is 0 on the fused path, where each dim is one chunk.
    offs_dk = chunk * BLOCK_DK + tl.arange(0, BLOCK_DK)
    offs_dv = chunk * BLOCK_DV + tl.arange(0, BLOCK_DV)

    kv_len = Nk
    if HAS_KVLEN:
        kv_len = tl.minimum(tl.maximum(tl.load(KvLen + b).to(tl.int32), 0), Nk)
    causal_offset = kv_len - Nq
    n_mask = offs_n < kv_len
    key_rows = offs_n[:, None].to(tl.int64)
    k_tile_mask = n_mask[:, None] & (offs_dk[None, :] < DQK)
    v_tile_mask = n_mask[:, None] & (offs_dv[None, :] < DV)
    if COMPUTE_DKDQ:
        k = tl.load(k_base + key_rows * stride_kn + offs_dk[None, :], mask=k_tile_mask, other=0.0)
    if FUSED:
        v = tl.load(v_base + key_rows * stride_vn + offs_dv[None, :], mask=v_tile_mask, other=0.0)

    m_start = 0
    if CAUSAL:
        # Query i sees key j iff j <= i + causal_offset: rows below the first key minus the offset
        # see nothing of this block.
        m_start = tl.maximum(pid_n * BLOCK_N - causal_offset, 0)
        m_start = (m_start // BLOCK_M) * BLOCK_M
    # A key block wholly past kv_lengths[b] skips the loop and stores dK = dV = 0.
    m_end = tl.where(pid_n * BLOCK_N >= kv_len, 0, Nq)

    dk = tl.zeros([BLOCK_N, BLOCK_DK], ACC_DTYPE)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], ACC_DTYPE)
    for start_m in range(m_start, m_end, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        m_mask = offs_m < Nq
        query_rows = offs_m[None, :].to(tl.int64)
        if FUSED:
            q_t = tl.load(
                q_base + query_rows * stride_qm + offs_dk[:, None],
                mask=m_mask[None, :] & (offs_dk[:, None] < DQK),
                other=0.0,
            )
            s_t = tl.dot(k, q_t, input_precision=DOT_PRECISION)
        else:
            s_t = _scores_t_chunked(
                k_base, q_base, offs_n, offs_m, n_mask, m_mask, stride_kn, stride_qm, DQK,
                BLOCK_M, BLOCK_N, BLOCK_DK, NUM_DK, DOT_PRECISION, ACC_DTYPE,
            )  # fmt: skip
        # Rows with no visible key stored lse = -inf; +inf makes their probabilities exactly 0.
        lse = tl.load(Lse + row_stats + offs_m, mask=m_mask, other=float("inf"))
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        visible_t = _visible(
            query_rows, offs_n[:, None], kv_len, causal_offset, pad_row, stride_pn, CAUSAL, HAS_PAD
        )
        p_t = tl.math.exp2(s_t * qk_scale - (lse * 1.4426950408889634)[None, :])
        p_t = tl.where(visible_t & m_mask[None, :], p_t, 0.0)

        if COMPUTE_DV:
            do = tl.load(
                do_base + offs_m[:, None].to(tl.int64) * stride_gm + offs_dv[None, :],
                mask=m_mask[:, None] & (offs_dv[None, :] < DV),
                other=0.0,
            )
            dv += tl.dot(p_t.to(do.dtype), do, input_precision=DOT_PRECISION)
        if COMPUTE_DKDQ:
            # dP^T = V dO^T, summed over v-dim chunks on the chunked path.
            if FUSED:
                do_t = tl.load(
                    do_base + query_rows * stride_gm + offs_dv[:, None],
                    mask=m_mask[None, :] & (offs_dv[:, None] < DV),
                    other=0.0,
                )
                dp_t = tl.dot(v, do_t, input_precision=DOT_PRECISION)
            else:
                dp_t = tl.zeros([BLOCK_N, BLOCK_M], ACC_DTYPE)
                for c in range(NUM_DV):
                    offs_d = c * BLOCK_DV + tl.arange(0, BLOCK_DV)
                    v_c = tl.load(
                        v_base + key_rows * stride_vn + offs_d[None, :],
                        mask=n_mask[:, None] & (offs_d[None, :] < DV),
                        other=0.0,
                    )
                    do_t = tl.load(
                        do_base + query_rows * stride_gm + offs_d[:, None],
                        mask=m_mask[None, :] & (offs_d[:, None] < DV),
                        other=0.0,
                    )
                    dp_t += tl.dot(v_c, do_t, input_precision=DOT_PRECISION)
            delta = tl.load(Delta + row_stats + offs_m, mask=m_mask, other=0.0)
            ds_t = p_t * (dp_t - delta[None, :])  # (BLOCK_N, BLOCK_M)
            q = tl.load(
                q_base + offs_m[:, None].to(tl.int64) * stride_qm + offs_dk[None, :],
                mask=m_mask[:, None] & (offs_dk[None, :] < DQK),
                other=0.0,
            )
            ds_t_lp = ds_t.to(q.dtype)
            dk += tl.dot(ds_t_lp, q, input_precision=DOT_PRECISION)
            dq = tl.dot(tl.trans(ds_t_lp), k, input_precision=DOT_PRECISION) * sm_scale
            tl.atomic_add(
                dq_base + offs_m[:, None].to(tl.int64) * stride_aqm + offs_dk[None, :],
                dq,
                mask=m_mask[:, None] & (offs_dk[None, :] < DQK),
            )

    # Every key row is written, including padded ones and rows past kv_lengths (zeros there).
    if COMPUTE_DV:
        dv_ptrs = DV_ + b * stride_dvb + h * stride_dvh + key_rows * stride_dvn + offs_dv[None, :]
        tl.store(dv_ptrs, dv.to(DV_.dtype.element_ty), mask=(offs_n < Nk)[:, None] & (offs_dv[None, :] < DV))
    if COMPUTE_DKDQ:
        dk_ptrs = DK + b * stride_dkb + h * stride_dkh + key_rows * stride_dkn + offs_dk[None, :]
        dk = dk * sm_scale
        tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=(offs_n < Nk)[:, None] & (offs_dk[None, :] < DQK))


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
    config: configs.LaunchConfig | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients of :func:`attention_forward` with respect to q, k and v.

    Args:
        grad_out: ``(B, Nq, H, Dv)``, last dim contiguous; grad_lse: ``(B, H, Nq)`` or None.
        q, k, v, key_padding_mask, kv_lengths, causal, scale: as given to the forward.
        out, lse: the forward's outputs.
        config: tile shape override (benchmarks sweep it); default ``configs.backward_config``.

    Returns:
        ``dq (Bq, Nq, H, Dqk)`` (summed over the batch when ``Bq == 1``), ``dk``, ``dv`` shaped like
        k and v, in the inputs' dtype.
    """
    batch, num_keys, heads, head_dim_qk = k.shape
    num_queries, head_dim_v = q.shape[1], v.shape[3]
    is_cuda = q.device.type == "cuda"
    cfg = config or configs.backward_config(head_dim_qk, head_dim_v, is_cuda)
    qk_tiles = configs.head_dim_tiling(head_dim_qk, configs.QK_CHUNK)
    v_tiles = configs.head_dim_tiling(head_dim_v, configs.V_CHUNK)
    acc = acc_dtype(q.dtype)
    stats_dtype = lse.dtype

    delta = torch.empty((batch, heads, num_queries), device=q.device, dtype=stats_dtype)
    delta_block_m = 16 if not is_cuda else 64
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

    # dQ is accumulated by atomics in float32 (float64 for float64 inputs). A broadcast batch-1
    # query gets batch stride 0 so every sample adds into the same rows: the batch sum for free.
    dq_acc = torch.zeros(
        (q.shape[0], num_queries, heads, head_dim_qk), device=q.device, dtype=stats_dtype
    )
    dk = torch.empty_like(k, memory_format=torch.contiguous_format)
    dv = torch.empty_like(v, memory_format=torch.contiguous_format)
    broadcast_q = q.shape[0] == 1 and batch > 1
    pad = key_padding_mask.view(torch.uint8) if key_padding_mask is not None else q.new_empty(0)
    pad_strides = key_padding_mask.stride() if key_padding_mask is not None else (0, 0)
    lengths = kv_lengths if kv_lengths is not None else q.new_empty(0)
    num_n_blocks = triton.cdiv(num_keys, cfg.block_n)

    def launch(num_z: int, compute_dv: bool, compute_dkdq: bool) -> None:
        _bwd_kernel[(num_n_blocks * num_z * batch * heads,)](
            q, k, v, grad_out, lse, delta, dq_acc, dk, dv, pad, lengths,
            0 if broadcast_q else q.stride(0), q.stride(1), q.stride(2),
            k.stride(0), k.stride(1), k.stride(2),
            v.stride(0), v.stride(1), v.stride(2),
            grad_out.stride(0), grad_out.stride(1), grad_out.stride(2),
            lse.stride(0), lse.stride(1),
            0 if broadcast_q else dq_acc.stride(0), dq_acc.stride(1), dq_acc.stride(2),
            dk.stride(0), dk.stride(1), dk.stride(2),
            dv.stride(0), dv.stride(1), dv.stride(2),
            pad_strides[0], pad_strides[1],
            heads, num_queries, num_keys, head_dim_qk, head_dim_v,
            scale * LOG2E, scale, num_n_blocks, num_z,
            CAUSAL=causal, HAS_PAD=key_padding_mask is not None, HAS_KVLEN=kv_lengths is not None,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCK_DK=qk_tiles.block, NUM_DK=qk_tiles.num_chunks,
            BLOCK_DV=v_tiles.block, NUM_DV=v_tiles.num_chunks,
            FUSED=compute_dv and compute_dkdq, COMPUTE_DV=compute_dv, COMPUTE_DKDQ=compute_dkdq,
            DOT_PRECISION=dot_precision(q.dtype), ACC_DTYPE=acc,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip

    if qk_tiles.num_chunks == 1 and v_tiles.num_chunks == 1:
        launch(1, compute_dv=True, compute_dkdq=True)
    else:
        launch(v_tiles.num_chunks, compute_dv=True, compute_dkdq=False)
        launch(qk_tiles.num_chunks, compute_dv=False, compute_dkdq=True)
    return dq_acc.to(q.dtype), dk, dv
