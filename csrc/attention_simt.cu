// Launches of the SIMT kernels (simt_kernels.cuh): float32, and the 16-bit inputs the tensor-core kernels
// do not take. See simt_kernels.cuh for the kernels and docs/DESIGN.md for why they exist.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "attention.h"
#include "device_utils.cuh"
#include "dispatch.cuh"
#include "simt_kernels.cuh"

namespace perceiver_kernels {
namespace {

using namespace simt;

// Grid x counts B * H * tiles CTAs, which ops.cpp checks against int32.
template <typename T, int D>
void run_forward(const AttentionParams& p, cudaStream_t stream) {
  constexpr size_t smem_bytes = forward_shared_memory<D>();
  allow_dynamic_shared_memory<simt_forward_kernel<T, D>>(smem_bytes);
  const int tiles = query_tiles<D>(p);
  const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(p.batch) * p.heads * tiles), p.num_splits);
  simt_forward_kernel<T, D><<<grid, kThreads, smem_bytes, stream>>>(p, tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename T, int D>
void run_backward(const BackwardParams& p, cudaStream_t stream) {
  constexpr size_t smem_bytes = backward_shared_memory<D>();
  allow_dynamic_shared_memory<simt_backward_kernel<T, D>>(smem_bytes);
  const int tiles = key_tiles<D>(p);
  const unsigned grid = static_cast<unsigned>(static_cast<int64_t>(p.batch) * p.heads * tiles);
  simt_backward_kernel<T, D><<<grid, kThreads, smem_bytes, stream>>>(p, tiles);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

bool launch_attention_forward_simt(const AttentionParams& params, DType dtype, int max_head_dim, cudaStream_t stream) {
  const bool launched =
      with_simt_config(dtype, max_head_dim, [&]<typename T, int D>() { run_forward<T, D>(params, stream); });
  if (launched && params.num_splits > 1) launch_combine_splits(params, dtype, stream);
  return launched;
}

bool launch_attention_backward_simt(const BackwardParams& params, DType dtype, int max_head_dim,
                                    cudaStream_t stream) {
  return with_simt_config(dtype, max_head_dim, [&]<typename T, int D>() { run_backward<T, D>(params, stream); });
}

}  // namespace perceiver_kernels
