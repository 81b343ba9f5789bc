// Perceiver attention backward for sm_80 and newer (FlashAttention-2's dK/dV-parallel scheme).
//
// One CTA = 4 warps owns 64 keys of one (batch, head); each warp owns 16 of them. K and V stay in
// shared memory; the CTA walks the query axis in blocks of 32 (from the first query that can see its
// keys under the causal mask) and, per block, recomputes with mma.sync m16n8k16:
//   S^T = K Q^T,  P^T = exp(scale S^T - lse)        (keys x queries, registers; lse from the forward)
//   dV += P^T dO                                     (P^T's accumulators are the A fragments)
//   dP^T = V dO^T,  dS^T = P^T (dP^T - delta)        (delta = rowsum(dO * O) - dlse, per query)
//   dK += dS^T Q
//   dQ += dS K                                       (dS through shared memory; float32 atomics)
// dK and dV are written once at the end (the CTA owns its keys); dQ is accumulated in a float32 buffer
// by every key block (and, for a query broadcast over the batch, by every sample), so atomics are the
// simple correct choice; the host casts it to q's dtype.
//
// kv_index: K/V rows are gathered on load as in the forward, and dK/dV are written back to the gathered
// memory rows (the host zeroes the others).
//
// Rotary: Q and K are rotated in shared memory as in the forward, so dQ and dK come out in the rotated
// frame; dQ (float32 buffer) and dK (then written in float32) are turned back by rotate_back_kernel.
//
// Masks are the forward's: keys >= L_b, padded keys and (causal) keys after a query's diagonal get
// P = 0, hence zero gradients; rows whose lse is -inf (no visible key) contribute nothing.
//
// The kernel lives in this header (attention_bwd.cu launches it) so that tests/simt_emulation can run it
// on a CPU, with mma.sync, ldmatrix and cp.async emulated per their PTX definitions.
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
constexpr int kScoreStride = kKeysPerCta + 8;  // dS in shared memory: [query][key]

// Head dims per CTA for the dK/dV/dQ accumulators: all of D up to 128, else slices of 128 (grid z).
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
  T* q_smem = v_smem + kKeysPerCta * kStride;
  T* do_smem = q_smem + kM * kStride;
  T* ds_smem = do_smem + kM * kStride;  // (kM, kScoreStride)
  float* lse_smem = reinterpret_cast<float*>(ds_smem + kM * kScoreStride);
  float* delta_smem = lse_smem + kM;

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
  const int num_keys = axis.size;
  const int length = axis.length;
  const float scale_log2 = p.scale * kLog2e;

  const auto [q_base, k_base, v_base] = head_inputs<T>(p, b, h);
  const auto [do_base, dq_base, lse_base, delta_base] = head_gradients<T>(p, b, h);

  // This CTA's slice of the head dims for dK, dV and dQ (S and dP always use all of them): D = 256 is
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
  const int diagonal = length - p.num_queries;  // causal: query i sees key j iff j <= i + diagonal
  const int first_query = p.causal ? max(0, n0 - diagonal) : 0;
  const bool any_work = n0 < length && first_query < p.num_queries;

  if (any_work) {
    load_tile<T, D, kKeysPerCta, kThreads>(k_smem, k_base, p.k_row_stride, n0, length, p.head_dim_qk, index,
                                           p.num_keys);
    load_tile<T, D, kKeysPerCta, kThreads>(v_smem, v_base, p.v_row_stride, n0, length, p.head_dim_v, index,
                                           p.num_keys);
    cp_async_commit();
  }
  // The key (row of S^T) of each accumulator element: warp * 16 + group (+8), and its visibility
  // apart from the causal mask.
  const int key0 = n0 + warp * 16 + group;
  const int key1 = key0 + 8;
  const bool key_ok[2] = {key_visible(p, axis, b, key0), key_visible(p, axis, b, key1)};

  bool k_rotated = false;
  for (int m0 = (first_query / kM) * kM; any_work && m0 < p.num_queries; m0 += kM) {
    load_tile<T, D, kM, kThreads>(q_smem, q_base, p.q_row_stride, m0, p.num_queries, p.head_dim_qk);
    load_tile<T, D, kM, kThreads>(do_smem, do_base, p.do_row_stride, m0, p.num_queries, p.head_dim_v);
    cp_async_commit();
    if (threadIdx.x < kM) {
      const int row = m0 + threadIdx.x;
      lse_smem[threadIdx.x] = row < p.num_queries ? lse_base[row] : -INFINITY;
      delta_smem[threadIdx.x] = row < p.num_queries ? delta_base[row] : 0.f;
    }
    cp_async_wait<0>();
    __syncthreads();
    if (p.rotary_dim > 0) {  // Q of this step, and (first step) K, rotated in place as in the forward
      const int half = p.rotary_dim / 2;
      const int q_rope_b = p.q_rope_batch > 1 ? b : 0;
      rotate_tile<T, D, kM, kThreads>(q_smem, p.q_rope + static_cast<int64_t>(q_rope_b) * p.num_queries * half,
                                      static_cast<int64_t>(p.q_rope_batch) * p.num_queries * half, m0,
                                      p.num_queries - m0, p.rotary_dim, p.rotary_interleaved);
      if (!k_rotated) {
        const int k_rope_b = p.k_rope_batch > 1 ? b : 0;
        rotate_tile<T, D, kKeysPerCta, kThreads>(
            k_smem, p.k_rope + static_cast<int64_t>(k_rope_b) * p.num_keys * half,
            static_cast<int64_t>(p.k_rope_batch) * p.num_keys * half, n0, length - n0, p.rotary_dim,
            p.rotary_interleaved, index, p.num_keys);
        k_rotated = true;
      }
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
                             (!p.causal || key <= query + diagonal);
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

    // dS to shared memory as [query][key], so that dQ = dS K reads A fragments as pairs of keys.
#pragma unroll
    for (int jq = 0; jq < kM / 8; ++jq) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int local_query = jq * 8 + 2 * quad + (e & 1);
        const int local_key = warp * 16 + group + 8 * (e >> 1);
        ds_smem[local_query * kScoreStride + local_key] = Ops::from_float(dp[jq][e]);
      }
    }
    __syncthreads();

    // dQ (kM queries x D) += dS (kM x 64 keys) K: warp w takes query rows (w % 2) * 16 and half of this
    // CTA's slice of the dims.
    // The dS fragments (16 registers) are loaded once; each n8 tile of dims then needs only 4 accumulators,
    // issued as atomics right away (keeping all tiles live would cost D/4 registers on top of dK and dV).
    {
      constexpr int kTiles = kSlice / 8 / 2;  // n8 tiles of dims per warp
      const int query_tile = warp % 2;
      const int first_tile = slice_base / 8 + (warp / 2) * kTiles;
      uint32_t a_frag[kKeysPerCta / 16][4];
#pragma unroll
      for (int kk = 0; kk < kKeysPerCta / 16; ++kk) {
        const T* ds_row = ds_smem + (query_tile * 16 + group) * kScoreStride + kk * 16 + 2 * quad;
        a_frag[kk][0] = *reinterpret_cast<const uint32_t*>(ds_row);
        a_frag[kk][1] = *reinterpret_cast<const uint32_t*>(ds_row + 8 * kScoreStride);
        a_frag[kk][2] = *reinterpret_cast<const uint32_t*>(ds_row + 8);
        a_frag[kk][3] = *reinterpret_cast<const uint32_t*>(ds_row + 8 * kScoreStride + 8);
      }
#pragma unroll
      for (int j = 0; j < kTiles; ++j) {
        const int d = (first_tile + j) * 8 + 2 * quad;
        if ((first_tile + j) * 8 >= p.head_dim_qk) break;  // warp-uniform: the rest are padding dims
        float dq[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll
        for (int kk = 0; kk < kKeysPerCta / 16; ++kk) {
          uint32_t k_frag[2];
          ldmatrix_x2_trans(k_frag, k_smem + (kk * 16 + (lane & 15)) * kStride + (first_tile + j) * 8);
          Ops::mma(dq, a_frag[kk], k_frag);
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
          const int query = m0 + query_tile * 16 + group + 8 * r;
          if (query >= p.num_queries || d >= p.head_dim_qk) continue;
          float* out = dq_base + query * p.dq_row_stride + d;
          atomicAdd(out, dq[2 * r] * p.scale);
          atomicAdd(out + 1, dq[2 * r + 1] * p.scale);
        }
      }
    }
    __syncthreads();  // q/dO/dS buffers are refilled by the next step
  }

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

// Dynamic shared memory: K, V (64 rows), Q, dO (32 rows) of D + 8 elements, dS, and lse / delta.
template <typename T, int D>
__host__ __device__ constexpr size_t shared_memory() {
  return static_cast<size_t>(2 * kKeysPerCta + 2 * kQueriesPerStep) * (D + 8) * sizeof(T) +
         static_cast<size_t>(kQueriesPerStep) * kScoreStride * sizeof(T) + 2 * kQueriesPerStep * sizeof(float);
}

// The grid: (B * H, key blocks of 64, head-dim slices).
template <int D>
inline dim3 grid(const BackwardParams& p) {
  const int key_axis = p.kv_index == nullptr ? p.num_keys : p.num_gathered;
  return dim3(p.batch * p.heads, (key_axis + kKeysPerCta - 1) / kKeysPerCta, D / dim_slice<D>());
}

}  // namespace mma_backward
}  // namespace perceiver_kernels
