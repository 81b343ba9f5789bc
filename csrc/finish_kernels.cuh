// Small kernels that finish what the attention kernels of both families (tensor-core and SIMT) leave:
// the split-KV combine and the inverse rotation of gradients computed in the rotated frame. Headers, so
// that the CPU emulation of the SIMT path (tests/simt_emulation) runs these very kernels too.
#pragma once

#include <cmath>
#include <cstdint>

#include "attention.h"
#include "device_utils.cuh"

namespace perceiver_kernels {
namespace detail {

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
