// Perceiver attention backward for sm_80 and newer, in two kernels that both run after delta:
//
// dK/dV (attention_backward_kernel, FlashAttention-2's key-parallel scheme). One CTA = 4 warps owns 64 keys
// of one (batch, head); each warp owns 16 of them. K and V stay in shared memory; the CTA walks the query
// axis in blocks of 32 (from the first query that can see its keys under the causal mask; the next block's
// Q and dO load with cp.async while one computes, up to D = 128) and, per block, recomputes with mma.sync
// m16n8k16:
//   S^T = K Q^T,  P^T = exp(scale S^T - lse)        (keys x queries, registers; lse from the forward)
//   dV += P^T dO                                     (P^T's accumulators are the A fragments)
//   dP^T = V dO^T,  dS^T = P^T (dP^T - delta)        (delta = rowsum(dO * O) - dlse, per query)
//   dK += dS^T Q
// dK and dV are written once at the end (the CTA owns its keys).
//
// dQ (dq_kernel, the forward's query-parallel grid with its split-KV ranges). One CTA = 4 warps owns 64
// queries; it walks its key tiles, recomputes S = Q K^T, P and dP = dO V^T, and accumulates dQ += dS K in
// registers, then writes one float32 partial per (split, sample) that the host sums. Two more matmuls
// than adding dS K from the dK/dV kernel with atomics, but no atomics: in Perceiver cross-attention
// thousands of key blocks would add into the same few hundred query rows (and, for a query broadcast
// over the batch, every sample into the same rows). The Triton backward measured that trade on an
// H200: split dQ 1.6x to 2x faster than atomics on Perceiver shapes (docs/DESIGN.md), and deterministic.
//
// kv_index: K/V rows are gathered on load as in the forward, and dK/dV are written back to the gathered
// memory rows (the host zeroes the others).
//
// Rotary: Q and K are rotated in shared memory as in the forward, so dQ and dK come out in the rotated
// frame; dQ (float32 partials) and dK (then written in float32) are turned back by rotate_back_kernel.
//
// Masks are the forward's: keys >= L_b, padded keys and (causal) keys after a query's diagonal get
// P = 0, hence zero gradients; rows whose lse is -inf (no visible key) contribute nothing.
//
// The kernels live in this header (attention_bwd.cu launches them) so that tests/simt_emulation can run
// them on a CPU, with mma.sync, ldmatrix and cp.async emulated per their PTX definitions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "attention.h"
#include "device_utils.cuh"

namespace perceiver_kernels {
namespace mma_backward {

using namespace detail;

constexpr int kKeysPerCta = 64;
constexpr int kQueriesPerStep = 32;
constexpr int kThreads = 128;

// Query-step buffers: two (Q, dO, lse and delta of step i + 1 load while step i computes), or one at
// D = 256, where a second would raise shared memory from 99 KB to 132 KB and halve the CTAs per SM of an
// H100 (2 to 1).
template <int D>
__host__ __device__ constexpr int step_buffers() {
  return D > 128 ? 1 : 2;
}

// Head dims per CTA for the dK/dV accumulators: all of D up to 128, else slices of 128 (grid z).
template <int D>
__host__ __device__ constexpr int dim_slice() {
  return D > 128 ? 128 : D;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_backward_kernel(const BackwardParams p) {
  using Ops = Types<T>;
  constexpr int kStride = D + 8;
  constexpr int kM = kQueriesPerStep;
  extern __shared__ __align__(16) unsigned char smem[];
  T* k_smem = reinterpret_cast<T*>(smem);
  T* v_smem = k_smem + kKeysPerCta * kStride;
  constexpr int kStepBuffers = step_buffers<D>();
  T* q_buffers = v_smem + kKeysPerCta * kStride;             // kStepBuffers (kM, kStride) tiles
  T* do_buffers = q_buffers + kStepBuffers * kM * kStride;  // as many
  float* lse_buffers = reinterpret_cast<float*>(do_buffers + kStepBuffers * kM * kStride);  // of kM each
  float* delta_buffers = lse_buffers + kStepBuffers * kM;

  const int bh = blockIdx.x;
  const int b = bh / p.heads;
  const int h = bh % p.heads;
  const int n0 = blockIdx.y * kKeysPerCta;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;
  const int quad = lane % 4;
  const KeyAxis axis = key_axis(p, b);  // the (gathered) key axis
  const int64_t* index = axis.index;
  const bool* pad = padding_row(p, b);  // padded keys are never loaded
  const int num_keys = axis.size;
  const int length = axis.length;
  const float scale_log2 = p.scale * kLog2e;

  const auto [q_base, k_base, v_base] = head_inputs<T>(p, b, h);
  const auto [do_base, lse_base, delta_base] = head_gradients<T>(p, b, h);

  // This CTA's slice of the head dims for dK and dV (S and dP always use all of them): D = 256 is
  // split into two CTAs (blockIdx.z) of 128, so the accumulators stay at 128 dims per thread.
  constexpr int kSlice = dim_slice<D>();
  const int slice_base = blockIdx.z * kSlice;
  if (slice_base >= p.head_dim_qk && slice_base >= p.head_dim_v) return;  // padding dims only
  float dk[kSlice / 8][4];
  float dv[kSlice / 8][4];
#pragma unroll
  for (int jd = 0; jd < kSlice / 8; ++jd) {
#pragma unroll
    for (int e = 0; e < 4; ++e) dk[jd][e] = dv[jd][e] = 0.f;
  }

  // Queries that can see any of these keys: all, or (causal) those at or after key n0's diagonal.
  const int offset = diagonal_offset(p, axis, b);  // causal: query i sees key j iff j <= i + offset
  const int first_query = p.causal ? max(0, n0 - offset) : 0;
  const bool any_work = n0 < length && first_query < p.num_queries;

  if (any_work) {
    load_tile<T, D, kKeysPerCta, kThreads>(k_smem, k_base, p.k_row_stride, n0, length, p.head_dim_qk, index,
                                           p.num_keys, pad, p.mask_row_stride);
    load_tile<T, D, kKeysPerCta, kThreads>(v_smem, v_base, p.v_row_stride, n0, length, p.head_dim_v, index,
                                           p.num_keys, pad, p.mask_row_stride);
    cp_async_commit();
  }
  // The key (row of S^T) of each accumulator element: warp * 16 + group (+8), and its visibility
  // apart from the causal mask.
  const int key0 = n0 + warp * 16 + group;
  const int key1 = key0 + 8;
  const bool key_ok[2] = {key_visible(p, axis, b, key0), key_visible(p, axis, b, key1)};

  // Step m0's Q and dO tiles into buffer `buffer` (cp.async, committed by the caller).
  const auto load_tiles = [&](int buffer, int m0) {
    load_tile<T, D, kM, kThreads>(q_buffers + buffer * kM * kStride, q_base, p.q_row_stride, m0, p.num_queries,
                                  p.head_dim_qk);
    load_tile<T, D, kM, kThreads>(do_buffers + buffer * kM * kStride, do_base, p.do_row_stride, m0, p.num_queries,
                                  p.head_dim_v);
  };
  // lse and delta of query m0 + threadIdx.x (threads below kM), as the step reads them: -inf and 0 past Nq.
  const auto row_lse = [&](int m0) {
    const int row = m0 + static_cast<int>(threadIdx.x);
    return row < p.num_queries ? lse_base[row] : -INFINITY;
  };
  const auto row_delta = [&](int m0) {
    const int row = m0 + static_cast<int>(threadIdx.x);
    return row < p.num_queries ? delta_base[row] : 0.f;
  };
  const auto store_rows = [&](int buffer, float lse, float delta) {
    lse_buffers[buffer * kM + threadIdx.x] = lse;
    delta_buffers[buffer * kM + threadIdx.x] = delta;
  };
  float next_lse = -INFINITY, next_delta = 0.f;  // the next step's row terms, from their load to their store
  const int first_step = (first_query / kM) * kM;
  if (any_work) {
    load_tiles(0, first_step);
    cp_async_commit();
    if (threadIdx.x < kM) store_rows(0, row_lse(first_step), row_delta(first_step));
  }

  for (int m0 = first_step; any_work && m0 < p.num_queries; m0 += kM) {
    const int buffer = ((m0 - first_step) / kM) % kStepBuffers;
    // The buffer loaded here was last read by the previous step, which ended with a barrier. With two
    // buffers, the next step's lse and delta wait in registers through this step's first matmuls (their
    // global loads overlap them), then go to shared memory; the step's closing barrier publishes them.
    const bool prefetch = kStepBuffers == 2 && m0 + kM < p.num_queries;
    if (prefetch) {
      load_tiles(buffer ^ 1, m0 + kM);
      if (threadIdx.x < kM) {
        next_lse = row_lse(m0 + kM);
        next_delta = row_delta(m0 + kM);
      }
    } else if (kStepBuffers == 1 && m0 != first_step) {  // one buffer: this step's rows, now
      load_tiles(0, m0);
      if (threadIdx.x < kM) store_rows(0, row_lse(m0), row_delta(m0));
    }
    cp_async_commit();
    cp_async_wait<kStepBuffers - 1>();  // all but a prefetch has landed (K and V with the first step)
    __syncthreads();
    T* q_smem = q_buffers + buffer * kM * kStride;
    T* do_smem = do_buffers + buffer * kM * kStride;
    const float* lse_smem = lse_buffers + buffer * kM;
    const float* delta_smem = delta_buffers + buffer * kM;
    if (p.rotary_dim > 0) {  // Q of this step, and (first step) K, rotated in place as in the forward
      rotate_queries<T, D, kM, kThreads>(q_smem, p, b, m0);
      if (m0 == first_step) rotate_keys<T, D, kKeysPerCta, kThreads>(k_smem, p, b, axis, n0);
      __syncthreads();
    }

    // S^T for this warp's 16 keys x kM queries; then P^T in place. s[jq]: queries jq*8 .. jq*8+7.
    float s[kM / 8][4];
    float dp[kM / 8][4];
#pragma unroll
    for (int jq = 0; jq < kM / 8; ++jq) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[jq][e] = dp[jq][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t k_frag[4], v_frag[4];
      const T* k_row = k_smem + (warp * 16 + group) * kStride + kk * 16 + 2 * quad;
      const T* v_row = v_smem + (warp * 16 + group) * kStride + kk * 16 + 2 * quad;
      k_frag[0] = *reinterpret_cast<const uint32_t*>(k_row);
      k_frag[1] = *reinterpret_cast<const uint32_t*>(k_row + 8 * kStride);
      k_frag[2] = *reinterpret_cast<const uint32_t*>(k_row + 8);
      k_frag[3] = *reinterpret_cast<const uint32_t*>(k_row + 8 * kStride + 8);
      v_frag[0] = *reinterpret_cast<const uint32_t*>(v_row);
      v_frag[1] = *reinterpret_cast<const uint32_t*>(v_row + 8 * kStride);
      v_frag[2] = *reinterpret_cast<const uint32_t*>(v_row + 8);
      v_frag[3] = *reinterpret_cast<const uint32_t*>(v_row + 8 * kStride + 8);
#pragma unroll
      for (int jq = 0; jq < kM / 8; ++jq) {
        // B operands: Q^T and dO^T, i.e. rows of Q / dO read as pairs of consecutive dims.
        const T* q_row = q_smem + (jq * 8 + group) * kStride + kk * 16 + 2 * quad;
        const T* do_row = do_smem + (jq * 8 + group) * kStride + kk * 16 + 2 * quad;
        const uint32_t q_frag[2] = {*reinterpret_cast<const uint32_t*>(q_row),
                                    *reinterpret_cast<const uint32_t*>(q_row + 8)};
        const uint32_t do_frag[2] = {*reinterpret_cast<const uint32_t*>(do_row),
                                     *reinterpret_cast<const uint32_t*>(do_row + 8)};
        Ops::mma(s[jq], k_frag, q_frag);
        Ops::mma(dp[jq], v_frag, do_frag);  // zero-padded dims of V/dO beyond Dv add nothing
      }
    }

    // The next step's row terms have had the matmuls above to arrive; the other buffer is free.
    if (prefetch && threadIdx.x < kM) store_rows(buffer ^ 1, next_lse, next_delta);

    // P^T and dS^T. Element e of s[jq]: key key0 (e < 2) or key1, query m0 + jq*8 + 2*quad + e % 2.
#pragma unroll
    for (int jq = 0; jq < kM / 8; ++jq) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int local_query = jq * 8 + 2 * quad + (e & 1);
        const int query = m0 + local_query;
        const int key = e < 2 ? key0 : key1;
        const float lse = lse_smem[local_query];
        const bool visible = key_ok[e >> 1] && query < p.num_queries && lse != -INFINITY &&
                             (!p.causal || key <= query + offset);
        const float prob = visible ? exp2f(s[jq][e] * scale_log2 - lse * kLog2e) : 0.f;
        s[jq][e] = prob;
        // A select, not a product: masked pairs must give 0 even where delta is not finite (a NaN/inf
        // gradient of the lse of a row with no visible key, or non-finite values in padded V rows).
        dp[jq][e] = visible ? prob * (dp[jq][e] - delta_smem[local_query]) : 0.f;
      }
    }

    // dV += P^T dO and dK += dS^T Q: accumulators of query tiles 2kk, 2kk+1 are the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < kM / 16; ++kk) {
      const uint32_t p_frag[4] = {Ops::pack(s[2 * kk][0], s[2 * kk][1]), Ops::pack(s[2 * kk][2], s[2 * kk][3]),
                                  Ops::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  Ops::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
      const uint32_t ds_frag[4] = {Ops::pack(dp[2 * kk][0], dp[2 * kk][1]), Ops::pack(dp[2 * kk][2], dp[2 * kk][3]),
                                   Ops::pack(dp[2 * kk + 1][0], dp[2 * kk + 1][1]),
                                   Ops::pack(dp[2 * kk + 1][2], dp[2 * kk + 1][3])};
#pragma unroll
      for (int jd = 0; jd < kSlice / 8; ++jd) {
        uint32_t do_frag[2], q_frag[2];
        ldmatrix_x2_trans(do_frag, do_smem + (kk * 16 + (lane & 15)) * kStride + slice_base + jd * 8);
        ldmatrix_x2_trans(q_frag, q_smem + (kk * 16 + (lane & 15)) * kStride + slice_base + jd * 8);
        Ops::mma(dv[jd], p_frag, do_frag);
        Ops::mma(dk[jd], ds_frag, q_frag);
      }
    }

    __syncthreads();  // this step's buffers are refilled by the next step's prefetch
  }
  cp_async_wait<0>();  // nothing may be in flight into shared memory when the CTA exits

  // dK (scaled) and dV of the keys this CTA owns, at their memory rows (scattered back with kv_index; rows
  // nothing gathered keep the zeros the host wrote); keys nothing could see get zeros.
  T* dv_base = static_cast<T*>(p.dv) + ((static_cast<int64_t>(b) * p.num_keys) * p.heads + h) * p.head_dim_v;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int gathered_key = r == 0 ? key0 : key1;
    if (gathered_key >= num_keys) continue;
    // Gathered keys past L_b have zero gradients, which the host's zeroed outputs already hold; writing
    // them could overwrite a real row if the index repeats one (uniqueness is checked only in eager mode).
    if (index != nullptr && gathered_key >= length) continue;
    const int64_t key = key_row(index, gathered_key, p.num_keys);
#pragma unroll
    for (int jd = 0; jd < kSlice / 8; ++jd) {
      const int d = slice_base + jd * 8 + 2 * quad;
      if (d < p.head_dim_qk) {
        const int64_t offset = ((static_cast<int64_t>(b) * p.num_keys + key) * p.heads + h) * p.head_dim_qk + d;
        if (p.dk_float != nullptr) {  // rotated frame, float32: turned back by launch_rotate_back
          p.dk_float[offset] = dk[jd][2 * r] * p.scale;
          p.dk_float[offset + 1] = dk[jd][2 * r + 1] * p.scale;
        } else {
          *reinterpret_cast<uint32_t*>(static_cast<T*>(p.dk) + offset) =
              Ops::pack(dk[jd][2 * r] * p.scale, dk[jd][2 * r + 1] * p.scale);
        }
      }
      if (d < p.head_dim_v) {
        T* out = dv_base + key * p.heads * p.head_dim_v + d;
        *reinterpret_cast<uint32_t*>(out) = Ops::pack(dv[jd][2 * r], dv[jd][2 * r + 1]);
      }
    }
  }
}

// dQ: one CTA = 4 warps = 64 queries of one (batch, head) and split blockIdx.z of their key tiles (the
// forward's ranges, forward_key_tiles). Q and dO stay in shared memory; K and V tiles are double-buffered
// with cp.async as in the forward. Per tile, each warp (16 queries):
//   S = Q K^T, dP = dO V^T                      (16 x dq_key_tile<D>(), registers)
//   P = exp(scale S - lse), dS = P (dP - delta)  (masked pairs 0)
//   dQ += dS K                                   (dS accumulators are the A fragments; K via ldmatrix.trans)
// and at the end writes scale * dQ, float32, to dq_partial[split][b] (the host sums splits and, for a
// broadcast query, samples). A split with no key tile writes zeros.
constexpr int kDqQueries = 64;
// Keys per tile, so that Q, dO and the K/V double buffers fit in 99 KB (the opt-in maximum of sm_86/sm_89)
// up to D = 128: (2 * 64 + 4 * keys) * (D + 8) * 2 bytes.
template <int D>
__host__ __device__ constexpr int dq_key_tile() {
  return D <= 64 ? 64 : (D == 128 ? 32 : 16);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) dq_kernel(const BackwardParams p) {
  using Ops = Types<T>;
  constexpr int kBlockN = dq_key_tile<D>();
  constexpr int kStride = D + 8;
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_smem = reinterpret_cast<T*>(smem);
  T* do_smem = q_smem + kDqQueries * kStride;
  T* k_smem = do_smem + kDqQueries * kStride;  // two buffers
  T* v_smem = k_smem + 2 * kBlockN * kStride;  // two buffers

  const int bh = blockIdx.x;
  const int b = bh / p.heads;
  const int h = bh % p.heads;
  const int m0 = blockIdx.y * kDqQueries;
  const int split = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;
  const int quad = lane % 4;

  const KeyAxis axis = key_axis(p, b);
  const int64_t* index = axis.index;
  const bool* pad = padding_row(p, b);  // padded keys are never loaded
  const int length = axis.length;
  int tile_begin, tile_end;
  forward_key_tiles(p, axis, b, m0, kDqQueries, kBlockN, split, p.num_splits, tile_begin, tile_end);

  const auto [q_base, k_base, v_base] = head_inputs<T>(p, b, h);
  const auto [do_base, lse_base, delta_base] = head_gradients<T>(p, b, h);
  const float scale_log2 = p.scale * kLog2e;

  load_tile<T, D, kDqQueries, kThreads>(q_smem, q_base, p.q_row_stride, m0, p.num_queries, p.head_dim_qk);
  load_tile<T, D, kDqQueries, kThreads>(do_smem, do_base, p.do_row_stride, m0, p.num_queries, p.head_dim_v);
  if (tile_begin < tile_end) {
    load_tile<T, D, kBlockN, kThreads>(k_smem, k_base, p.k_row_stride, tile_begin * kBlockN, length, p.head_dim_qk,
                                       index, p.num_keys, pad, p.mask_row_stride);
    load_tile<T, D, kBlockN, kThreads>(v_smem, v_base, p.v_row_stride, tile_begin * kBlockN, length, p.head_dim_v,
                                       index, p.num_keys, pad, p.mask_row_stride);
  }
  cp_async_commit();

  // This thread's rows (group, group + 8 of its warp's 16): log2-scaled lse (-inf: the row sees no key, or
  // is past Nq) and delta.
  const int rows[2] = {m0 + warp * 16 + group, m0 + warp * 16 + group + 8};
  float lse_log2[2], delta[2];
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    lse_log2[r] = rows[r] < p.num_queries ? lse_base[rows[r]] * kLog2e : -INFINITY;
    delta[r] = rows[r] < p.num_queries ? delta_base[rows[r]] : 0.f;
  }
  const int offset = diagonal_offset(p, axis, b);  // causal: query i sees key j iff j <= i + offset
  float acc[D / 8][4];
#pragma unroll
  for (int jd = 0; jd < D / 8; ++jd) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[jd][e] = 0.f;
  }

  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int buffer = (tile - tile_begin) & 1;
    if (tile + 1 < tile_end) {  // prefetch the next tile into the other buffer
      load_tile<T, D, kBlockN, kThreads>(k_smem + (buffer ^ 1) * kBlockN * kStride, k_base, p.k_row_stride,
                                         (tile + 1) * kBlockN, length, p.head_dim_qk, index, p.num_keys, pad,
                                         p.mask_row_stride);
      load_tile<T, D, kBlockN, kThreads>(v_smem + (buffer ^ 1) * kBlockN * kStride, v_base, p.v_row_stride,
                                         (tile + 1) * kBlockN, length, p.head_dim_v, index, p.num_keys, pad,
                                         p.mask_row_stride);
    }
    cp_async_commit();
    cp_async_wait<1>();  // everything but the prefetch has landed (Q and dO came with the first group)
    __syncthreads();

    if (p.rotary_dim > 0) {
      if (tile == tile_begin) {  // rotate Q once, as the forward does
        rotate_queries<T, D, kDqQueries, kThreads>(q_smem, p, b, m0);
      }
      // ... and this K tile (its keys keep their own positions); Q and K rotations touch disjoint buffers.
      rotate_keys<T, D, kBlockN, kThreads>(k_smem + buffer * kBlockN * kStride, p, b, axis, tile * kBlockN);
      __syncthreads();
    }

    // S = Q K^T and dP = dO V^T for this warp's 16 rows: s[j], dp[j] are the n8 tiles of keys j*8..j*8+7.
    const T* k_tile = k_smem + buffer * kBlockN * kStride;
    const T* v_tile = v_smem + buffer * kBlockN * kStride;
    float s[kBlockN / 8][4];
    float dp[kBlockN / 8][4];
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = dp[j][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t q_frag[4], do_frag[4];
      load_a_fragment(q_frag, q_smem, warp * 16, kk * 16, kStride);
      load_a_fragment(do_frag, do_smem, warp * 16, kk * 16, kStride);
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
        // B operands: K^T and V^T, i.e. rows of K / V read as pairs of consecutive dims.
        const T* k_row = k_tile + (j * 8 + group) * kStride + kk * 16 + 2 * quad;
        const T* v_row = v_tile + (j * 8 + group) * kStride + kk * 16 + 2 * quad;
        const uint32_t k_frag[2] = {*reinterpret_cast<const uint32_t*>(k_row),
                                    *reinterpret_cast<const uint32_t*>(k_row + 8)};
        const uint32_t v_frag[2] = {*reinterpret_cast<const uint32_t*>(v_row),
                                    *reinterpret_cast<const uint32_t*>(v_row + 8)};
        Ops::mma(s[j], q_frag, k_frag);
        Ops::mma(dp[j], do_frag, v_frag);  // zero-padded dims of dO/V beyond Dv add nothing
      }
    }

    // dS in place of S. Element e of s[j]: row rows[e / 2], key n0 + j*8 + 2*quad + e % 2.
    const int n0 = tile * kBlockN;
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int key = n0 + j * 8 + 2 * quad + c;
        const bool key_ok = key_visible(p, axis, b, key);  // once per key: a mask (and index) read
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int e = 2 * r + c;
          const bool visible =
              key_ok && lse_log2[r] != -INFINITY && (!p.causal || key <= rows[r] + offset);
          const float prob = visible ? exp2f(s[j][e] * scale_log2 - lse_log2[r]) : 0.f;
          // A select, not a product, as in the dK/dV kernel: masked pairs give 0 whatever delta or dP hold.
          s[j][e] = visible ? prob * (dp[j][e] - delta[r]) : 0.f;
        }
      }
    }

    // dQ += dS K. The accumulators of key tiles 2kk and 2kk+1 form the A fragment of k-step kk.
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t ds_frag[4] = {Ops::pack(s[2 * kk][0], s[2 * kk][1]), Ops::pack(s[2 * kk][2], s[2 * kk][3]),
                                   Ops::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                   Ops::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int jd = 0; jd < D / 8; ++jd) {
        uint32_t k_frag[2];
        ldmatrix_x2_trans(k_frag, k_tile + (kk * 16 + (lane & 15)) * kStride + jd * 8);
        Ops::mma(acc[jd], ds_frag, k_frag);
      }
    }
    __syncthreads();  // this K/V buffer is refilled by the next iteration's prefetch
  }
  cp_async_wait<0>();

  // scale * dQ, in float32, into this split's and sample's partial (B rows even for a broadcast query).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    if (rows[r] >= p.num_queries) continue;
    const int64_t row = (static_cast<int64_t>(split) * p.batch + b) * p.num_queries + rows[r];
    float* out = p.dq_partial + (row * p.heads + h) * p.head_dim_qk;
#pragma unroll
    for (int jd = 0; jd < D / 8; ++jd) {
      const int d = jd * 8 + 2 * quad;
      if (d < p.head_dim_qk) {  // a multiple of 8: d + 1 is a real dim too
        out[d] = acc[jd][2 * r] * p.scale;
        out[d + 1] = acc[jd][2 * r + 1] * p.scale;
      }
    }
  }
}

// Dynamic shared memory: K, V (64 rows) and the Q and dO buffers (32 rows) of D + 8 elements, and the lse /
// delta buffers.
template <typename T, int D>
__host__ __device__ constexpr size_t shared_memory() {
  return static_cast<size_t>(2 * kKeysPerCta + 2 * step_buffers<D>() * kQueriesPerStep) * (D + 8) * sizeof(T) +
         2 * step_buffers<D>() * kQueriesPerStep * sizeof(float);
}

// The grid: (B * H, key blocks of 64, head-dim slices).
template <int D>
inline dim3 grid(const BackwardParams& p) {
  const int key_axis = p.kv_index == nullptr ? p.num_keys : p.num_gathered;
  return dim3(p.batch * p.heads, (key_axis + kKeysPerCta - 1) / kKeysPerCta, D / dim_slice<D>());
}

// dq_kernel's dynamic shared memory: Q and dO (64 rows), two K and two V buffers, rows of D + 8 elements.
template <typename T, int D>
__host__ __device__ constexpr size_t dq_shared_memory() {
  return static_cast<size_t>(2 * kDqQueries + 4 * dq_key_tile<D>()) * (D + 8) * sizeof(T);
}

// dq_kernel's grid: (B * H, query blocks of 64, splits).
inline dim3 dq_grid(const BackwardParams& p) {
  return dim3(p.batch * p.heads, (p.num_queries + kDqQueries - 1) / kDqQueries, p.num_splits);
}

}  // namespace mma_backward
}  // namespace perceiver_kernels
