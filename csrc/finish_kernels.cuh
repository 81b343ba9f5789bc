// Small kernels around the attention kernels of both families (tensor-core and SIMT): the backward's row
// term delta before them, and after them the split-KV combine and the inverse rotation of gradients
// computed in the rotated frame. A header, so that the CPU emulation (tests/simt_emulation) runs these
// very kernels too.
#pragma once

#include <cmath>
#include <cstdint>

#include "attention.h"
#include "device_utils.cuh"

namespace perceiver_kernels {
namespace detail {

constexpr int kDeltaRowsPerCta = 4;  // one warp per row

// delta[(b * H + h) * Nq + i] = sum_d dO[b, i, h, d] O[b, i, h, d] - dlse[(b * H + h) * Nq + i], in float32,
// reading dO and O once in their dtype (instead of materialising float32 copies of both). Rows are taken
// in memory order ((b * Nq + i) * H + h), so a CTA reads contiguous rows.
template <typename T>
__global__ void delta_kernel(const DeltaParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kDeltaRowsPerCta + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= static_cast<int64_t>(p.batch) * p.num_queries * p.heads) return;  // a whole warp
  const int h = static_cast<int>(row % p.heads);
  const int64_t sample_row = row / p.heads;
  const int i = static_cast<int>(sample_row % p.num_queries);
  const int64_t b = sample_row / p.num_queries;
  const T* dout =
      static_cast<const T*>(p.grad_out) + b * p.do_batch_stride + i * p.do_row_stride + h * p.do_head_stride;
  const T* out =
      static_cast<const T*>(p.out) + b * p.out_batch_stride + i * p.out_row_stride + h * p.out_head_stride;
  float sum = 0.f;
  for (int d = lane; d < p.head_dim_v; d += 32) sum += Types<T>::to_float(dout[d]) * Types<T>::to_float(out[d]);
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffff, sum, offset);
  if (lane != 0) return;
  const int64_t index = (b * p.heads + h) * p.num_queries + i;
  p.delta[index] = p.grad_lse == nullptr ? sum : sum - p.grad_lse[index];
}

// Merges the splits of one (batch, head, row): weights exp(lse_s - max lse), normalised.
template <typename T>
__global__ void combine_splits_kernel(const AttentionParams p) {
  const int64_t index = blockIdx.x;  // (b * H + h) * Nq + row
  const int row = static_cast<int>(index % p.num_queries);
  const int64_t bh = index / p.num_queries;
  const int b = static_cast<int>(bh / p.heads);
  const int h = static_cast<int>(bh % p.heads);
  const int64_t split_stride = static_cast<int64_t>(p.batch) * p.heads * p.num_queries;
  float max_lse = -INFINITY;
  for (int s = 0; s < p.num_splits; ++s) max_lse = fmaxf(max_lse, p.lse_partial[s * split_stride + index]);
  float total = 0.f;
  for (int s = 0; s < p.num_splits; ++s) {
    const float lse = p.lse_partial[s * split_stride + index];
    total += lse == -INFINITY ? 0.f : expf(lse - max_lse);
  }
  T* out_row = static_cast<T*>(p.out) + b * p.out_batch_stride + row * p.out_row_stride + h * p.out_head_stride;
  for (int d = threadIdx.x; d < p.head_dim_v; d += blockDim.x) {
    float value = 0.f;
    for (int s = 0; s < p.num_splits; ++s) {
      const float lse = p.lse_partial[s * split_stride + index];
      if (lse != -INFINITY) value += expf(lse - max_lse) * p.out_partial[(s * split_stride + index) * p.head_dim_v + d];
    }
    out_row[d] = Types<T>::from_float(total > 0.f ? value / total : 0.f);
  }
  if (threadIdx.x == 0) p.lse[index] = total > 0.f ? max_lse + logf(total) : -INFINITY;
}

// One CTA per (sample, row, head) of a contiguous (Bg, N, H, D) gradient; inverse rotation: a pair (a, b)
// turned by angle t becomes (a cos t + b sin t, b cos t - a sin t).
template <typename T>
__global__ void rotate_back_kernel(const float* grad, T* out, const float* rope, int rope_batch, int n, int heads,
                                   int head_dim, int rotary_dim, bool interleaved) {
  const int64_t row = blockIdx.x;  // ((b * N) + i) * H + h
  const int64_t sample_row = row / heads;
  const int i = static_cast<int>(sample_row % n);
  const int64_t b = sample_row / n;
  const int half = rotary_dim / 2;
  const float* cos = rope + ((rope_batch > 1 ? b : 0) * n + i) * half;
  const float* sin = cos + static_cast<int64_t>(rope_batch) * n * half;
  const float* g = grad + row * head_dim;
  T* o = out + row * head_dim;
  for (int c = threadIdx.x; c < head_dim; c += blockDim.x) {
    float value = g[c];
    if (c < rotary_dim) {
      const int pair = interleaved ? c / 2 : c % half;
      const bool second = interleaved ? (c % 2 == 1) : (c >= half);
      const float a = g[interleaved ? 2 * pair : pair];
      const float b_value = g[interleaved ? 2 * pair + 1 : pair + half];
      value = second ? b_value * cos[pair] - a * sin[pair] : a * cos[pair] + b_value * sin[pair];
    }
    o[c] = Types<T>::from_float(value);
  }
}

}  // namespace detail
}  // namespace perceiver_kernels
