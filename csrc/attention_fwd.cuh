// Perceiver attention forward for sm_80 and newer: FlashAttention-2-style tiling on tensor cores.
//
// One CTA = 4 warps = 64 query rows of one (batch, head); each warp owns 16 rows and walks the key axis in
// tiles of 64 keys (32 at D = 256). Q is loaded once, as mma.sync A fragments held in registers (re-read
// from shared memory at D = 256); K and V tiles are copied into shared memory with cp.async,
// double-buffered (tile j+1 is in flight while tile j is computed).
// S = Q K^T and O += P V run on mma.sync.m16n8k16 (16-bit in, float32 accumulate). The online softmax
// stays in registers: the S accumulator fragment of two n8 tiles is exactly the A fragment of one k16
// step of P V, so P never touches shared memory. V fragments come from ldmatrix.trans.
//
// kv_index (prefix dropout) gathers on load: key j of the gathered axis is memory row kv_index[b][j], with
// that row's rotary position and padding flag; kv_lengths and the causal mask refer to the gathered axis.
//
// Rotary embeddings (Perceiver AR) are applied on load: the Q tile and each K tile are rotated in shared
// memory, in float32 from the cos/sin tables, and rounded back to 16 bits as a naive rotation would.
//
// Masks are computed in-kernel: keys at or beyond L_b (kv_lengths) and padded keys are -inf; causal is
// bottom-right aligned (query i sees key j iff j <= i + L_b - Nq). A row that sees no key gets zeros and
// lse = -inf. Tiles past the last visible key of the CTA are never loaded.
//
// Split-KV: with num_splits > 1, blockIdx.z takes a contiguous range of key tiles and writes a
// normalised float32 partial output and its lse; a combine kernel merges them by their lse weights.
//
// Head dims: q/k and v are zero-padded (by cp.async's zero fill) to one compile-time D in {32, 64, 128, 256};
// real dims must be multiples of 8 (16-byte rows). Zero-filled rows and columns make out-of-range
// reads harmless (0, never garbage that 0 * inf could turn into NaN).
//
// The kernel lives in this header (attention_fwd.cu launches it) so that tests/simt_emulation can run it
// on a CPU, with mma.sync, ldmatrix and cp.async emulated per their PTX definitions.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "attention.h"
#include "device_utils.cuh"

namespace perceiver_kernels {
namespace mma_forward {

using namespace detail;

constexpr int kBlockM = 64;
// Keys per tile: 64, or 32 for D = 256 (shared memory: (64 + 4 * kBlockN) * (D + 8) * 2 bytes must fit).
template <int D>
__host__ __device__ constexpr int key_tile() {
  return D > 128 ? 32 : 64;
}
// Q as register fragments for the whole key loop up to D = 128; at D = 256 they would take 64 registers
// next to the 128 of the accumulator, so they are re-read from shared memory (where Q stays) instead.
template <int D>
__host__ __device__ constexpr bool q_in_registers() {
  return D <= 128;
}
constexpr int kThreads = 128;
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) attention_forward_kernel(const AttentionParams p) {
  using Ops = Types<T>;
  constexpr int kBlockN = key_tile<D>();
  constexpr bool kQInRegisters = q_in_registers<D>();
  constexpr int kQFragments = kQInRegisters ? D / 16 : 1;
  constexpr int kStride = D + 8;  // +16 bytes per row: rows stay 16-byte aligned, banks are staggered
  extern __shared__ __align__(16) unsigned char smem[];
  T* q_smem = reinterpret_cast<T*>(smem);
  T* k_smem = q_smem + kBlockM * kStride;  // two buffers
  T* v_smem = k_smem + 2 * kBlockN * kStride;  // two buffers

  const int bh = blockIdx.x;
  const int b = bh / p.heads;
  const int h = bh % p.heads;
  const int m0 = blockIdx.y * kBlockM;
  const int split = blockIdx.z;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;  // the fragment row this thread holds (and +8)
  const int quad = lane % 4;   // which column pair

  const KeyAxis axis = key_axis(p, b);
  const int64_t* index = axis.index;
  const bool* pad = padding_row(p, b);  // padded keys are never loaded
  const int length = axis.length;
  const int offset = diagonal_offset(p, axis, b);  // causal: key <= row + offset
  int tile_begin, tile_end;
  forward_key_tiles(p, axis, b, m0, kBlockM, kBlockN, split, p.num_splits, tile_begin, tile_end);

  const auto [q_base, k_base, v_base] = head_inputs<T>(p, b, h);
  const float scale_log2 = p.scale * kLog2e;

  load_tile<T, D, kBlockM, kThreads>(q_smem, q_base, p.q_row_stride, m0, p.num_queries, p.head_dim_qk);
  if (tile_begin < tile_end) {
    load_tile<T, D, kBlockN, kThreads>(k_smem, k_base, p.k_row_stride, tile_begin * kBlockN, length, p.head_dim_qk,
                                       index, p.num_keys, pad, p.mask_row_stride);
    load_tile<T, D, kBlockN, kThreads>(v_smem, v_base, p.v_row_stride, tile_begin * kBlockN, length, p.head_dim_v,
                                       index, p.num_keys, pad, p.mask_row_stride);
  }
  cp_async_commit();

  float row_max[2] = {-INFINITY, -INFINITY};  // raw (unscaled) score maxima of rows group, group + 8
  float row_sum[2] = {0.f, 0.f};              // this thread's share of the softmax denominators
  float acc[D / 8][4];
#pragma unroll
  for (int jd = 0; jd < D / 8; ++jd) {
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[jd][e] = 0.f;
  }
  uint32_t q_frag[kQFragments][4];
  const int row0 = m0 + warp * 16 + group;
  const int row1 = row0 + 8;

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
    cp_async_wait<1>();  // everything but the prefetch has landed (Q came with the first group)
    __syncthreads();

    if (tile == tile_begin) {
      if (p.rotary_dim > 0) {  // rotate Q once, in shared memory, before it becomes fragments
        rotate_queries<T, D, kBlockM, kThreads>(q_smem, p, b, m0);
        __syncthreads();
      }
      if constexpr (kQInRegisters) {
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) load_a_fragment(q_frag[kk], q_smem, warp * 16, kk * 16, kStride);
      }
    }

    if (p.rotary_dim > 0) {  // rotate this K tile in place (its keys keep their own positions)
      rotate_keys<T, D, kBlockN, kThreads>(k_smem + buffer * kBlockN * kStride, p, b, axis, tile * kBlockN);
      __syncthreads();
    }

    // S = Q K^T for this warp's 16 rows x kBlockN keys: s[j] is the n8 tile of keys j*8..j*8+7.
    const T* k_tile = k_smem + buffer * kBlockN * kStride;
    float s[kBlockN / 8][4];
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) s[j][e] = 0.f;
    }
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      if constexpr (!kQInRegisters) load_a_fragment(q_frag[0], q_smem, warp * 16, kk * 16, kStride);
      const uint32_t(&a_frag)[4] = q_frag[kQInRegisters ? kk : 0];
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
        const T* k_row = k_tile + (j * 8 + group) * kStride + kk * 16 + 2 * quad;
        const uint32_t k_frag[2] = {*reinterpret_cast<const uint32_t*>(k_row),
                                    *reinterpret_cast<const uint32_t*>(k_row + 8)};
        Ops::mma(s[j], a_frag, k_frag);
      }
    }

    // Masks. Element e of s[j] is (row group + 8 * (e / 2), key j * 8 + 2 * quad + e % 2).
    const int n0 = tile * kBlockN;
#pragma unroll
    for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const int key = n0 + j * 8 + 2 * quad + c;
        const bool visible = key_visible(p, axis, b, key);
        if (!visible || (p.causal && key > row0 + offset)) s[j][c] = -INFINITY;
        if (!visible || (p.causal && key > row1 + offset)) s[j][2 + c] = -INFINITY;
      }
    }

    // Online softmax, per row; the 4 threads of a quad share a row.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float tile_max = row_max[r];
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) tile_max = fmaxf(tile_max, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 1));
      tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffff, tile_max, 2));
      // A row with nothing visible yet keeps max -inf; exponentiate against 0 so that exp2(-inf) = 0.
      const float base = tile_max == -INFINITY ? 0.f : tile_max * scale_log2;
      // The rescale from the difference of the maxima (FlashAttention-2's form): exactly 1 when the max does not
      // move. exp2f(row_max * scale_log2 - base), which nvcc contracts into an FMA against the rounded base,
      // leaves a residue there that compounds over the key tiles (lse drifts ~1e-3 at 180k keys).
      const float rescale = tile_max == -INFINITY ? 1.f : exp2f((row_max[r] - tile_max) * scale_log2);
      row_max[r] = tile_max;
      row_sum[r] *= rescale;
#pragma unroll
      for (int j = 0; j < kBlockN / 8; ++j) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          const float prob = exp2f(s[j][2 * r + c] * scale_log2 - base);
          s[j][2 * r + c] = prob;
          row_sum[r] += prob;
        }
      }
#pragma unroll
      for (int jd = 0; jd < D / 8; ++jd) {
        acc[jd][2 * r] *= rescale;
        acc[jd][2 * r + 1] *= rescale;
      }
    }

    // O += P V. The accumulators of key tiles 2kk and 2kk+1 form the A fragment of k-step kk.
    const T* v_tile = v_smem + buffer * kBlockN * kStride;
#pragma unroll
    for (int kk = 0; kk < kBlockN / 16; ++kk) {
      const uint32_t p_frag[4] = {Ops::pack(s[2 * kk][0], s[2 * kk][1]), Ops::pack(s[2 * kk][2], s[2 * kk][3]),
                                  Ops::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                                  Ops::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int jd = 0; jd < D / 8; ++jd) {
        // Lanes 0-7 address keys kk*16 + 0..7 (matrix 0), lanes 8-15 keys kk*16 + 8..15 (matrix 1).
        uint32_t v_frag[2];
        ldmatrix_x2_trans(v_frag, v_tile + (kk * 16 + (lane & 15)) * kStride + jd * 8);
        Ops::mma(acc[jd], p_frag, v_frag);
      }
    }
    __syncthreads();  // this buffer is refilled by the next iteration's prefetch
  }
  cp_async_wait<0>();

  // Epilogue: full denominators, normalise, write out and lse (natural log of the scaled scores).
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    float total = row_sum[r];
    total += __shfl_xor_sync(0xffffffff, total, 1);
    total += __shfl_xor_sync(0xffffffff, total, 2);
    const int row = r == 0 ? row0 : row1;
    if (row >= p.num_queries) continue;
    const float inv = total > 0.f ? 1.f / total : 0.f;
    const float lse = total > 0.f ? row_max[r] * p.scale + logf(total) : -INFINITY;
    if (p.num_splits == 1) {
      T* out_row = static_cast<T*>(p.out) + b * p.out_batch_stride + row * p.out_row_stride + h * p.out_head_stride;
#pragma unroll
      for (int jd = 0; jd < D / 8; ++jd) {
        const int d = jd * 8 + 2 * quad;
        if (d < p.head_dim_v) {
          *reinterpret_cast<uint32_t*>(out_row + d) = Ops::pack(acc[jd][2 * r] * inv, acc[jd][2 * r + 1] * inv);
        }
      }
      if (quad == 0) p.lse[(static_cast<int64_t>(b) * p.heads + h) * p.num_queries + row] = lse;
    } else {
      const int64_t slot = ((static_cast<int64_t>(split) * p.batch + b) * p.heads + h) * p.num_queries + row;
      float* out_row = p.out_partial + slot * p.head_dim_v;
#pragma unroll
      for (int jd = 0; jd < D / 8; ++jd) {
        const int d = jd * 8 + 2 * quad;
        if (d < p.head_dim_v) {
          out_row[d] = acc[jd][2 * r] * inv;
          out_row[d + 1] = acc[jd][2 * r + 1] * inv;
        }
      }
      if (quad == 0) p.lse_partial[slot] = lse;
    }
  }
}

// Dynamic shared memory: the Q tile and two K and two V buffers, rows of D + 8 elements.
template <typename T, int D>
__host__ __device__ constexpr size_t shared_memory() {
  return static_cast<size_t>(kBlockM + 4 * key_tile<D>()) * (D + 8) * sizeof(T);
}

// The grid: (B * H, query blocks of 64, splits).
inline dim3 grid(const AttentionParams& p) {
  return dim3(p.batch * p.heads, (p.num_queries + kBlockM - 1) / kBlockM, p.num_splits);
}

}  // namespace mma_forward
}  // namespace perceiver_kernels
