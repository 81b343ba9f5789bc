// Perceiver attention on CUDA cores (SIMT), forward and backward kernels: float32, and the 16-bit inputs the
// tensor-core kernels do not take (head dims that are not multiples of 8, rows that are not 16-byte
// aligned, query or key axes beyond their grid, GPUs with too little shared memory for their wide tiles).
//
// Same contract and the same schedule as the tensor-core kernels (attention_fwd.cu, attention_bwd.cu), in
// plain float32 arithmetic: every tile is converted to float32 in shared memory as it is loaded (rotary
// applied there, rounded to the input dtype as a naive rotation would), and every product is a float32
// FMA. Nothing goes through TF32 (whose 10-bit mantissa could not meet the float32 tolerance).
//
// Thread layout: 128 threads; one tile row (a query in the forward, a key in the backward's dK/dV, a query
// in its dQ) belongs to kLanes = 128 / kTile consecutive threads of one warp, which split that row's
// scores and head dims as lane, lane + kLanes, lane + 2 kLanes, ...; row reductions are shuffles among
// them. Shared-memory rows hold D + 1 floats: an odd stride puts the rows a warp reads in distinct banks.
//
// Tiles: kTile = 32 rows up to D = 128 and 16 at D = 256, so shared memory stays under 75 KB (any sm_80+
// GPU). Loops over head dims stop at the real dims; only the accumulators are sized by the padded D.
// Masks, split-KV (with the same combine kernel), rotary positions, kv_index gathers and scatters and the
// broadcast query follow the tensor-core kernels; see their comments. dQ differs: the dK/dV kernel adds it
// with float32 atomics instead of a second, query-parallel pass. The tensor-core backward dropped those
// atomics because its matmuls are fast enough for contention to dominate; here every product is a
// float32 FMA, and a second pass would redo two of the five matmuls (not measured on a GPU yet).
//
// The kernels live in this header (attention_simt.cu launches them) so that tests/simt_emulation can run
// them on a CPU, thread by thread, against the reference.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>

#include "attention.h"
#include "device_utils.cuh"

namespace perceiver_kernels {
namespace simt {

using namespace detail;

constexpr int kThreads = 128;

// Rows per tile: queries per CTA and keys per step in the forward, keys per CTA and queries per step in
// the backward.
template <int D>
__host__ __device__ constexpr int tile_rows() {
  return D > 128 ? 16 : 32;
}

// Copies rows [first_row, first_row + ROWS) x columns [0, D) of a row-major tile of T (unit column
// stride) into float32 shared memory with row stride D + 1; rows >= rows_valid and columns >= cols_valid
// become 0. With `index`, row j is read from memory row key_row(index, j, num_rows); with `padded`, a padded
// key's row becomes 0 too (never loaded: see load_tile).
template <typename T, int D, int ROWS>
__device__ __forceinline__ void load_rows(float* dst, const T* src, int64_t row_stride, int first_row, int rows_valid,
                                          int cols_valid, const int64_t* index = nullptr, int num_rows = 0,
                                          const bool* padded = nullptr, int64_t padded_stride = 0) {
  for (int c = threadIdx.x; c < ROWS * D; c += kThreads) {
    const int r = c / D;
    const int col = c % D;
    float value = 0.f;
    if (first_row + r < rows_valid && col < cols_valid) {
      const int64_t row = key_row(index, first_row + r, num_rows);
      if (padded == nullptr || !padded[row * padded_stride]) value = Types<T>::to_float(src[row * row_stride + col]);
    }
    dst[r * (D + 1) + col] = value;
  }
}

// Reductions over the LANES consecutive threads that share a row (LANES a power of two dividing 32).
template <int LANES>
__device__ __forceinline__ float lanes_max(float x) {
#pragma unroll
  for (int offset = LANES / 2; offset > 0; offset /= 2) x = fmaxf(x, __shfl_xor_sync(0xffffffff, x, offset));
  return x;
}

template <int LANES>
__device__ __forceinline__ float lanes_sum(float x) {
#pragma unroll
  for (int offset = LANES / 2; offset > 0; offset /= 2) x += __shfl_xor_sync(0xffffffff, x, offset);
  return x;
}

// One CTA = kTile queries of one (batch, head) (blockIdx.x = bh * num_query_tiles + query tile; split
// blockIdx.y); the key axis is walked in tiles of kTile keys.
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) simt_forward_kernel(const AttentionParams p, int num_query_tiles) {
  constexpr int kTile = tile_rows<D>();
  constexpr int kLanes = kThreads / kTile;  // threads per query row
  constexpr int kKeys = kTile / kLanes;     // scores per thread: keys lane + j * kLanes
  constexpr int kDims = D / kLanes;         // output dims per thread: lane + i * kLanes
  constexpr int kStride = D + 1;
  constexpr int kScoreStride = kTile + 1;
  extern __shared__ float smem[];
  float* q_smem = smem;
  float* k_smem = q_smem + kTile * kStride;
  float* v_smem = k_smem + kTile * kStride;
  float* p_smem = v_smem + kTile * kStride;  // (kTile, kScoreStride): this tile's probabilities, [query][key]

  const int bh = blockIdx.x / num_query_tiles;
  const int b = bh / p.heads;
  const int h = bh % p.heads;
  const int m0 = (blockIdx.x % num_query_tiles) * kTile;
  const int local_row = threadIdx.x / kLanes;
  const int lane = threadIdx.x % kLanes;
  const int row = m0 + local_row;

  const KeyAxis axis = key_axis(p, b);
  const bool* pad = padding_row(p, b);  // padded keys are never loaded
  int tile_begin, tile_end;
  forward_key_tiles(p, axis, b, m0, kTile, kTile, blockIdx.y, p.num_splits, tile_begin, tile_end);
  const int offset = diagonal_offset(p, axis, b);  // causal: key <= row + offset
  const float scale_log2 = p.scale * kLog2e;

  const auto [q_base, k_base, v_base] = head_inputs<T>(p, b, h);

  load_rows<T, D, kTile>(q_smem, q_base, p.q_row_stride, m0, p.num_queries, p.head_dim_qk);
  if (p.rotary_dim > 0) {
    __syncthreads();
    rotate_queries<T, D, kTile, kThreads, float, kStride>(q_smem, p, b, m0);
  }

  float row_max = -INFINITY;  // raw (unscaled) score maximum of this row
  float row_sum = 0.f;        // this thread's share of the softmax denominator
  float acc[kDims];
#pragma unroll
  for (int i = 0; i < kDims; ++i) acc[i] = 0.f;

  for (int tile = tile_begin; tile < tile_end; ++tile) {
    const int n0 = tile * kTile;
    __syncthreads();  // the previous tile's K, V and P are read (and Q is loaded and rotated)
    load_rows<T, D, kTile>(k_smem, k_base, p.k_row_stride, n0, axis.length, p.head_dim_qk, axis.index, p.num_keys,
                           pad, p.mask_row_stride);
    load_rows<T, D, kTile>(v_smem, v_base, p.v_row_stride, n0, axis.length, p.head_dim_v, axis.index, p.num_keys,
                           pad, p.mask_row_stride);
    if (p.rotary_dim > 0) {  // each key keeps its own position (its memory row's, with kv_index)
      __syncthreads();
      rotate_keys<T, D, kTile, kThreads, float, kStride>(k_smem, p, b, axis, n0);
    }
    __syncthreads();

    float s[kKeys];
#pragma unroll
    for (int j = 0; j < kKeys; ++j) s[j] = 0.f;
    for (int d = 0; d < p.head_dim_qk; ++d) {
      const float q = q_smem[local_row * kStride + d];
#pragma unroll
      for (int j = 0; j < kKeys; ++j) s[j] = fmaf(q, k_smem[(lane + j * kLanes) * kStride + d], s[j]);
    }
    float tile_max = row_max;
#pragma unroll
    for (int j = 0; j < kKeys; ++j) {
      const int key = n0 + lane + j * kLanes;
      const bool visible = key_visible(p, axis, b, key) && (!p.causal || key <= row + offset);
      s[j] = visible ? s[j] : -INFINITY;
      tile_max = fmaxf(tile_max, s[j]);
    }
    // Online softmax (as in attention_fwd.cu): a row with nothing visible yet exponentiates against 0.
    tile_max = lanes_max<kLanes>(tile_max);
    const float base = tile_max == -INFINITY ? 0.f : tile_max * scale_log2;
    // From the difference of the maxima: exactly 1 when the max does not move (see attention_fwd.cuh).
    const float rescale = tile_max == -INFINITY ? 1.f : exp2f((row_max - tile_max) * scale_log2);
    row_max = tile_max;
    row_sum *= rescale;
#pragma unroll
    for (int j = 0; j < kKeys; ++j) {
      const float prob = exp2f(s[j] * scale_log2 - base);
      row_sum += prob;
      p_smem[local_row * kScoreStride + lane + j * kLanes] = prob;
    }
    __syncwarp();  // the row's probabilities come from the kLanes threads of this warp that share it

    // O += P V for this row's dims.
#pragma unroll
    for (int i = 0; i < kDims; ++i) acc[i] *= rescale;
    for (int c = 0; c < kTile; ++c) {
      const float prob = p_smem[local_row * kScoreStride + c];
#pragma unroll
      for (int i = 0; i < kDims; ++i) acc[i] = fmaf(prob, v_smem[c * kStride + lane + i * kLanes], acc[i]);
    }
  }

  // Epilogue: the full denominator, then out and lse (natural log of the scaled scores), or the partials.
  const float total = lanes_sum<kLanes>(row_sum);
  if (row >= p.num_queries) return;
  const float inv = total > 0.f ? 1.f / total : 0.f;
  const float lse = total > 0.f ? row_max * p.scale + logf(total) : -INFINITY;
  if (p.num_splits == 1) {
    T* out_row = static_cast<T*>(p.out) + b * p.out_batch_stride + row * p.out_row_stride + h * p.out_head_stride;
#pragma unroll
    for (int i = 0; i < kDims; ++i) {
      const int d = lane + i * kLanes;
      if (d < p.head_dim_v) out_row[d] = Types<T>::from_float(acc[i] * inv);
    }
    if (lane == 0) p.lse[(static_cast<int64_t>(b) * p.heads + h) * p.num_queries + row] = lse;
  } else {
    const int64_t slot = ((static_cast<int64_t>(blockIdx.y) * p.batch + b) * p.heads + h) * p.num_queries + row;
    float* out_row = p.out_partial + slot * p.head_dim_v;
#pragma unroll
    for (int i = 0; i < kDims; ++i) {
      const int d = lane + i * kLanes;
      if (d < p.head_dim_v) out_row[d] = acc[i] * inv;
    }
    if (lane == 0) p.lse_partial[slot] = lse;
  }
}

// One CTA = kTile keys of one (batch, head) (blockIdx.x = bh * num_key_tiles + key tile), walking the
// queries that can see them in steps of kTile:
//   P^T, dS^T (keys x queries): each thread's key against queries lane + j * kLanes
//   dV += P^T dO, dK += dS^T Q:  each thread's key, dims lane + i * kLanes (registers until the end)
//   dQ += dS K:                  each thread's query (the same thread rows, now read as queries), float32
//                                atomics, because every key block (and every sample of a broadcast query)
//                                adds to the same rows
template <typename T, int D>
__global__ void __launch_bounds__(kThreads) simt_backward_kernel(const BackwardParams p, int num_key_tiles) {
  constexpr int kTile = tile_rows<D>();
  constexpr int kLanes = kThreads / kTile;
  constexpr int kQueries = kTile / kLanes;  // scores per thread: queries lane + j * kLanes
  constexpr int kDims = D / kLanes;         // gradient dims per thread: lane + i * kLanes
  constexpr int kStride = D + 1;
  constexpr int kScoreStride = kTile + 1;
  extern __shared__ float smem[];
  float* k_smem = smem;
  float* v_smem = k_smem + kTile * kStride;
  float* q_smem = v_smem + kTile * kStride;
  float* do_smem = q_smem + kTile * kStride;
  float* p_smem = do_smem + kTile * kStride;      // (kTile keys, kScoreStride): P^T
  float* ds_smem = p_smem + kTile * kScoreStride;  // (kTile keys, kScoreStride): dS^T
  float* lse_smem = ds_smem + kTile * kScoreStride;
  float* delta_smem = lse_smem + kTile;

  const int bh = blockIdx.x / num_key_tiles;
  const int b = bh / p.heads;
  const int h = bh % p.heads;
  const int n0 = (blockIdx.x % num_key_tiles) * kTile;
  const int local_row = threadIdx.x / kLanes;
  const int lane = threadIdx.x % kLanes;
  const KeyAxis axis = key_axis(p, b);
  const bool* pad = padding_row(p, b);  // padded keys are never loaded
  const int key = n0 + local_row;  // this thread's key (of the gathered axis)
  const bool key_ok = key_visible(p, axis, b, key);
  const float scale_log2 = p.scale * kLog2e;

  const auto [q_base, k_base, v_base] = head_inputs<T>(p, b, h);
  const auto [do_base, lse_base, delta_base] = head_gradients<T>(p, b, h);
  float* dq_base = p.dq_accum + b * p.dq_batch_stride + h * p.dq_head_stride;

  // Queries that can see any of these keys: all, or (causal) those at or after key n0's diagonal.
  const int offset = diagonal_offset(p, axis, b);  // causal: query i sees key j iff j <= i + offset
  const int first_query = p.causal ? max(0, n0 - offset) : 0;
  const bool any_work = n0 < axis.length && first_query < p.num_queries;

  float dk[kDims], dv[kDims];
#pragma unroll
  for (int i = 0; i < kDims; ++i) dk[i] = dv[i] = 0.f;

  if (any_work) {
    load_rows<T, D, kTile>(k_smem, k_base, p.k_row_stride, n0, axis.length, p.head_dim_qk, axis.index, p.num_keys,
                           pad, p.mask_row_stride);
    load_rows<T, D, kTile>(v_smem, v_base, p.v_row_stride, n0, axis.length, p.head_dim_v, axis.index, p.num_keys,
                           pad, p.mask_row_stride);
    if (p.rotary_dim > 0) {
      __syncthreads();
      rotate_keys<T, D, kTile, kThreads, float, kStride>(k_smem, p, b, axis, n0);
    }
  }

  for (int m0 = (first_query / kTile) * kTile; any_work && m0 < p.num_queries; m0 += kTile) {
    __syncthreads();  // the previous step's Q, dO and dS are read (and K, V are loaded and rotated)
    load_rows<T, D, kTile>(q_smem, q_base, p.q_row_stride, m0, p.num_queries, p.head_dim_qk);
    load_rows<T, D, kTile>(do_smem, do_base, p.do_row_stride, m0, p.num_queries, p.head_dim_v);
    if (threadIdx.x < kTile) {
      const int query = m0 + threadIdx.x;
      lse_smem[threadIdx.x] = query < p.num_queries ? lse_base[query] : -INFINITY;
      delta_smem[threadIdx.x] = query < p.num_queries ? delta_base[query] : 0.f;
    }
    if (p.rotary_dim > 0) {
      __syncthreads();
      rotate_queries<T, D, kTile, kThreads, float, kStride>(q_smem, p, b, m0);
    }
    __syncthreads();

    // S^T and dP^T for this thread's key, then P^T and dS^T to shared memory.
    float s[kQueries], dp[kQueries];
#pragma unroll
    for (int j = 0; j < kQueries; ++j) s[j] = dp[j] = 0.f;
    for (int d = 0; d < p.head_dim_qk; ++d) {
      const float k = k_smem[local_row * kStride + d];
#pragma unroll
      for (int j = 0; j < kQueries; ++j) s[j] = fmaf(k, q_smem[(lane + j * kLanes) * kStride + d], s[j]);
    }
    for (int d = 0; d < p.head_dim_v; ++d) {
      const float v = v_smem[local_row * kStride + d];
#pragma unroll
      for (int j = 0; j < kQueries; ++j) dp[j] = fmaf(v, do_smem[(lane + j * kLanes) * kStride + d], dp[j]);
    }
#pragma unroll
    for (int j = 0; j < kQueries; ++j) {
      const int local_query = lane + j * kLanes;
      const int query = m0 + local_query;
      const float lse = lse_smem[local_query];
      const bool visible =
          key_ok && query < p.num_queries && lse != -INFINITY && (!p.causal || key <= query + offset);
      const float prob = visible ? exp2f(s[j] * scale_log2 - lse * kLog2e) : 0.f;
      p_smem[local_row * kScoreStride + local_query] = prob;
      // A select, not a product: masked pairs give 0 even where delta or padded values are not finite.
      ds_smem[local_row * kScoreStride + local_query] = visible ? prob * (dp[j] - delta_smem[local_query]) : 0.f;
    }
    __syncthreads();

    // dV += P^T dO and dK += dS^T Q for this thread's key.
    for (int c = 0; c < kTile; ++c) {
      const float prob = p_smem[local_row * kScoreStride + c];
      const float ds = ds_smem[local_row * kScoreStride + c];
#pragma unroll
      for (int i = 0; i < kDims; ++i) {
        dv[i] = fmaf(prob, do_smem[c * kStride + lane + i * kLanes], dv[i]);
        dk[i] = fmaf(ds, q_smem[c * kStride + lane + i * kLanes], dk[i]);
      }
    }

    // dQ (scaled) for this thread's query: the dS^T column in registers, one atomic per dim.
    const int query = m0 + local_row;
    if (query < p.num_queries) {
      float ds_column[kTile];
#pragma unroll
      for (int c = 0; c < kTile; ++c) ds_column[c] = ds_smem[c * kScoreStride + local_row];
      float* dq_row = dq_base + query * p.dq_row_stride;
#pragma unroll
      for (int i = 0; i < kDims; ++i) {
        const int d = lane + i * kLanes;
        if (d >= p.head_dim_qk) break;  // d grows with i
        float sum = 0.f;
#pragma unroll
        for (int c = 0; c < kTile; ++c) sum = fmaf(ds_column[c], k_smem[c * kStride + d], sum);
        atomicAdd(dq_row + d, sum * p.scale);
      }
    }
  }

  // dK (scaled) and dV of this thread's key at its memory row, as in attention_bwd.cu: gathered keys past
  // L_b keep the host's zeros (a repeated index must not overwrite a real row); keys nothing could see get
  // zeros.
  if (key >= axis.size || (axis.index != nullptr && key >= axis.length)) return;
  const int64_t memory_row = key_row(axis.index, key, p.num_keys);
  const int64_t dk_offset = ((static_cast<int64_t>(b) * p.num_keys + memory_row) * p.heads + h) * p.head_dim_qk;
  const int64_t dv_offset = ((static_cast<int64_t>(b) * p.num_keys + memory_row) * p.heads + h) * p.head_dim_v;
#pragma unroll
  for (int i = 0; i < kDims; ++i) {
    const int d = lane + i * kLanes;
    if (d < p.head_dim_qk) {
      if (p.dk_float != nullptr) {  // rotated frame, float32: turned back by launch_rotate_back
        p.dk_float[dk_offset + d] = dk[i] * p.scale;
      } else {
        static_cast<T*>(p.dk)[dk_offset + d] = Types<T>::from_float(dk[i] * p.scale);
      }
    }
    if (d < p.head_dim_v) static_cast<T*>(p.dv)[dv_offset + d] = Types<T>::from_float(dv[i]);
  }
}

template <int D>
__host__ __device__ constexpr size_t forward_shared_memory() {
  constexpr int tile = tile_rows<D>();
  return (3 * tile * (D + 1) + tile * (tile + 1)) * sizeof(float);
}

template <int D>
__host__ __device__ constexpr size_t backward_shared_memory() {
  constexpr int tile = tile_rows<D>();
  return (4 * tile * (D + 1) + 2 * tile * (tile + 1) + 2 * tile) * sizeof(float);
}

// Launch shapes, shared by attention_simt.cu and the CPU emulation: the forward's grid is (B * H * query
// tiles, splits) and the backward's B * H * key tiles, with the tile count as the kernels' argument.
template <int D>
inline int query_tiles(const AttentionParams& p) {
  return (p.num_queries + tile_rows<D>() - 1) / tile_rows<D>();
}

template <int D>
inline int key_tiles(const BackwardParams& p) {
  const int key_axis = p.kv_index == nullptr ? p.num_keys : p.num_gathered;
  return (key_axis + tile_rows<D>() - 1) / tile_rows<D>();
}

}  // namespace simt
}  // namespace perceiver_kernels
