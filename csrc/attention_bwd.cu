// Launches of the tensor-core backward (attention_bwd.cuh: the dK/dV kernel, then the dQ kernel) and of the
// kernels around it (finish_kernels.cuh): delta before, the rotary turn-back after.

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "attention.h"
#include "attention_bwd.cuh"
#include "device_utils.cuh"
#include "dispatch.cuh"
#include "finish_kernels.cuh"

namespace perceiver_kernels {
namespace {

template <typename T, int D>
void run_backward(const BackwardParams& p, cudaStream_t stream) {
  constexpr size_t limit = D > 128 ? kTensorCoreWideHeadSharedMemory : kTensorCoreSharedMemory;
  constexpr size_t smem_bytes = mma_backward::shared_memory<T, D>();
  static_assert(smem_bytes <= limit);
  detail::allow_dynamic_shared_memory<mma_backward::attention_backward_kernel<T, D>>(smem_bytes);
  mma_backward::attention_backward_kernel<T, D>
      <<<mma_backward::grid<D>(p), mma_backward::kThreads, smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  constexpr size_t dq_smem_bytes = mma_backward::dq_shared_memory<T, D>();
  static_assert(dq_smem_bytes <= limit);
  detail::allow_dynamic_shared_memory<mma_backward::dq_kernel<T, D>>(dq_smem_bytes);
  mma_backward::dq_kernel<T, D><<<mma_backward::dq_grid(p), mma_backward::kThreads, dq_smem_bytes, stream>>>(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

void launch_delta(const DeltaParams& p, DType dtype, cudaStream_t stream) {
  const int64_t rows = static_cast<int64_t>(p.batch) * p.num_queries * p.heads;
  if (rows == 0) return;
  const unsigned ctas = static_cast<unsigned>((rows + detail::kDeltaRowsPerCta - 1) / detail::kDeltaRowsPerCta);
  with_dtype(dtype, [&]<typename T>() {
    detail::delta_kernel<T><<<ctas, 32 * detail::kDeltaRowsPerCta, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

void launch_rotate_back(const float* grad, void* out, const float* rope, int rope_batch, int64_t batch, int n,
                        int heads, int head_dim, int rotary_dim, bool interleaved, DType dtype, cudaStream_t stream) {
  const int64_t rows = batch * n * heads;
  if (rows == 0) return;
  TORCH_CHECK(rows <= 0x7fffffff, "perceiver_kernels::cuda_attention: B * N * H = ", rows,
              " exceeds the rotate-back grid");
  with_dtype(dtype, [&]<typename T>() {
    detail::rotate_back_kernel<T><<<static_cast<unsigned>(rows), rotate_back_threads(head_dim), 0, stream>>>(
        grad, static_cast<T*>(out), rope, rope_batch, n, heads, head_dim, rotary_dim, interleaved);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

bool launch_attention_backward(const BackwardParams& params, DType dtype, int padded_head_dim, cudaStream_t stream) {
  return with_tensor_core_config(dtype, padded_head_dim,
                                 [&]<typename T, int D>() { run_backward<T, D>(params, stream); });
}

}  // namespace perceiver_kernels
