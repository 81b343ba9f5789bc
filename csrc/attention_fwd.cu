// Launches of the tensor-core forward (attention_fwd.cuh) and of the split-KV combine (finish_kernels.cuh).

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "attention.h"
#include "attention_fwd.cuh"
#include "device_utils.cuh"
#include "dispatch.cuh"
#include "finish_kernels.cuh"

namespace perceiver_kernels {
namespace {

template <typename T, int D>
void run_forward(const AttentionParams& p, cudaStream_t stream) {
  constexpr size_t smem_bytes = mma_forward::shared_memory<T, D>();
  static_assert(smem_bytes <= (D > 128 ? kTensorCoreWideHeadSharedMemory : kTensorCoreSharedMemory));
  detail::allow_dynamic_shared_memory<mma_forward::attention_forward_kernel<T, D>>(smem_bytes);
  mma_forward::attention_forward_kernel<T, D>
      <<<mma_forward::grid(p), mma_forward::kThreads, smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_combine_splits(const AttentionParams& p, DType dtype, cudaStream_t stream) {
  const unsigned rows = static_cast<unsigned>(static_cast<int64_t>(p.batch) * p.heads * p.num_queries);
  with_dtype(dtype, [&]<typename T>() { detail::combine_splits_kernel<T><<<rows, kCombineThreads, 0, stream>>>(p); });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool launch_attention_forward(const AttentionParams& params, DType dtype, int padded_head_dim, cudaStream_t stream) {
  const bool launched = with_tensor_core_config(
      dtype, padded_head_dim, [&]<typename T, int D>() { run_forward<T, D>(params, stream); });
  if (launched && params.num_splits > 1) launch_combine_splits(params, dtype, stream);
  return launched;
}

}  // namespace perceiver_kernels
