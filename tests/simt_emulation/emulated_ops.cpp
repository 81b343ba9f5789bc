// The CUDA backend's host flow (csrc/host.h) bound to CPU emulations (emulator.h) of its kernels: the
// tensor-core ones (csrc/attention_fwd.cuh, attention_bwd.cuh), the SIMT ones (csrc/simt_kernels.cuh) and
// the combine / rotate-back kernels (csrc/finish_kernels.cuh), registered as CPU ops with the CUDA ops'
// schemas plus the kernel family and a scheduling seed:
//
//   perceiver_kernels_emulation::attention_fwd(..., int num_splits, bool tensor_cores, int seed) -> (out, lse)
//   perceiver_kernels_emulation::attention_bwd(..., int num_splits, bool tensor_cores, int seed) -> (dq, dk, dv)
//
// tests/test_simt_emulation.py runs the correctness matrix through them: the kernels' logic is tested
// on every CI run, without a GPU.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "host.h"
// After ATen: the emulator defines threadIdx & co. as macros.
#include "emulator.h"
// The kernels' headers, compiled for the emulator.
#include "attention_bwd.cuh"
#include "attention_fwd.cuh"
#include "dispatch.cuh"
#include "finish_kernels.cuh"
#include "simt_kernels.cuh"

namespace perceiver_kernels {
// Each kernel family's dynamic shared memory (`extern __shared__ ... smem[]` in the kernels), sized for its
// largest configuration: CTAs run one at a time.
namespace simt {
float smem[std::max(backward_shared_memory<128>(), backward_shared_memory<256>()) / sizeof(float)];
}  // namespace simt
namespace mma_forward {
alignas(16) unsigned char smem[shared_memory<__half, 256>()];
}  // namespace mma_forward
namespace mma_backward {
alignas(16) unsigned char smem[std::max(shared_memory<__half, 256>(), dq_shared_memory<__half, 256>())];
}  // namespace mma_backward

namespace {

using namespace host;

template <typename Array>
emulator::SharedMemory shared(Array& array, size_t bytes) {
  return {array, sizeof(array), bytes};
}

host::Kernels emulated_kernels(bool tensor_cores, uint64_t seed) {
  host::Kernels kernels;
  kernels.forward = [=](const AttentionParams& p, DType dtype, int head_dim) {
    const bool launched =
        tensor_cores
            ? with_tensor_core_config(dtype, head_dim,
                                      [&]<typename T, int D>() {
                                        emulator::launch(mma_forward::grid(p), dim3(mma_forward::kThreads),
                                                         [&] { mma_forward::attention_forward_kernel<T, D>(p); },
                                                         seed,
                                                         shared(mma_forward::smem, mma_forward::shared_memory<T, D>()));
                                      })
            : with_simt_config(dtype, head_dim, [&]<typename T, int D>() {
                const int tiles = simt::query_tiles<D>(p);
                const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(p.batch) * p.heads * tiles), p.num_splits);
                emulator::launch(grid, dim3(simt::kThreads), [&] { simt::simt_forward_kernel<T, D>(p, tiles); }, seed,
                                 shared(simt::smem, simt::forward_shared_memory<D>()));
              });
    if (launched && p.num_splits > 1) {
      with_dtype(dtype, [&]<typename T>() {
        const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(p.batch) * p.heads * p.num_queries));
        emulator::launch(grid, dim3(kCombineThreads), [&] { detail::combine_splits_kernel<T>(p); }, seed);
      });
    }
    return launched;
  };
  kernels.backward = [=](const BackwardParams& p, DType dtype, int head_dim) {
    if (tensor_cores) {
      return with_tensor_core_config(dtype, head_dim, [&]<typename T, int D>() {
        emulator::launch(mma_backward::grid<D>(p), dim3(mma_backward::kThreads),
                         [&] { mma_backward::attention_backward_kernel<T, D>(p); }, seed,
                         shared(mma_backward::smem, mma_backward::shared_memory<T, D>()));
        emulator::launch(mma_backward::dq_grid(p), dim3(mma_backward::kThreads),
                         [&] { mma_backward::dq_kernel<T, D>(p); }, seed,
                         shared(mma_backward::smem, mma_backward::dq_shared_memory<T, D>()));
      });
    }
    return with_simt_config(dtype, head_dim, [&]<typename T, int D>() {
      const int tiles = simt::key_tiles<D>(p);
      const dim3 grid(static_cast<unsigned>(static_cast<int64_t>(p.batch) * p.heads * tiles));
      emulator::launch(grid, dim3(simt::kThreads), [&] { simt::simt_backward_kernel<T, D>(p, tiles); }, seed,
                       shared(simt::smem, simt::backward_shared_memory<D>()));
    });
  };
  kernels.delta = [seed](const DeltaParams& p, DType dtype) {
    const int64_t rows = static_cast<int64_t>(p.batch) * p.num_queries * p.heads;
    const dim3 grid(static_cast<unsigned>((rows + detail::kDeltaRowsPerCta - 1) / detail::kDeltaRowsPerCta));
    with_dtype(dtype, [&]<typename T>() {
      emulator::launch(grid, dim3(32 * detail::kDeltaRowsPerCta), [&] { detail::delta_kernel<T>(p); }, seed);
    });
  };
  kernels.rotate_back = [seed](const float* grad, void* out, const float* rope, int rope_batch, int64_t batch, int n,
                               int heads, int head_dim, int rotary_dim, bool interleaved, DType dtype) {
    with_dtype(dtype, [&]<typename T>() {
      const dim3 grid(static_cast<unsigned>(batch * n * heads));
      emulator::launch(
          grid, dim3(rotate_back_threads(head_dim)),
          [&] {
            detail::rotate_back_kernel<T>(grad, static_cast<T*>(out), rope, rope_batch, n, heads, head_dim,
                                          rotary_dim, interleaved);
          },
          seed);
    });
  };
  kernels.aligned_rows = tensor_cores;
  kernels.split_dq = tensor_cores;
  return kernels;
}

// The tests force a family; the tensor-core one only where ops.cpp would choose it (on an H100).
void check_family(const Prepared& in, bool tensor_cores) {
  TORCH_CHECK(!tensor_cores || tensor_core_eligible(in.q, in.k, in.v, in.key_axis, emulator::kMaxSharedMemoryPerBlock),
              "emulation: the tensor-core kernels were asked for inputs ops.cpp would give the SIMT ones");
}

std::tuple<at::Tensor, at::Tensor> emulated_fwd(const at::Tensor& q_arg, const at::Tensor& k_arg,
                                                const at::Tensor& v_arg,
                                                const std::optional<at::Tensor>& key_padding_mask,
                                                const std::optional<at::Tensor>& kv_lengths,
                                                const std::optional<at::Tensor>& kv_index,
                                                const std::optional<at::Tensor>& q_rope,
                                                const std::optional<at::Tensor>& k_rope, int64_t rotary_dim,
                                                bool rotary_interleaved, bool causal, double scale,
                                                int64_t num_splits, const std::optional<at::Tensor>& keys_after,
                                                bool tensor_cores, int64_t seed) {
  const Prepared in = prepare(q_arg, k_arg, v_arg, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope,
                              rotary_dim, scale, keys_after);
  check_family(in, tensor_cores);
  return attention_forward(in.q, in.k, in.v, key_padding_mask, in.checked, rotary_dim, rotary_interleaved, causal,
                           scale, num_splits, emulated_kernels(tensor_cores, static_cast<uint64_t>(seed)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> emulated_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q_arg,
    const at::Tensor& k_arg, const at::Tensor& v_arg, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& kv_lengths,
    const std::optional<at::Tensor>& kv_index, const std::optional<at::Tensor>& q_rope,
    const std::optional<at::Tensor>& k_rope, int64_t rotary_dim, bool rotary_interleaved, bool causal, double scale,
    int64_t num_splits, const std::optional<at::Tensor>& keys_after, bool tensor_cores, int64_t seed) {
  const Prepared in = prepare(q_arg, k_arg, v_arg, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope,
                              rotary_dim, scale, keys_after);
  check_family(in, tensor_cores);
  return attention_backward(grad_out, grad_lse, in.q, in.k, in.v, out, lse, key_padding_mask, in.checked, rotary_dim,
                            rotary_interleaved, causal, scale, num_splits,
                            emulated_kernels(tensor_cores, static_cast<uint64_t>(seed)));
}

}  // namespace

TORCH_LIBRARY(perceiver_kernels_emulation, m) {
  m.def(
      "attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? kv_lengths, "
      "Tensor? kv_index, Tensor? q_rope, Tensor? k_rope, int rotary_dim, bool rotary_interleaved, bool causal, "
      "float scale, int num_splits, Tensor? keys_after, bool tensor_cores, int seed) -> (Tensor, Tensor)");
  m.def(
      "attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, Tensor? kv_lengths, Tensor? kv_index, Tensor? q_rope, Tensor? k_rope, "
      "int rotary_dim, bool rotary_interleaved, bool causal, float scale, int num_splits, Tensor? keys_after, "
      "bool tensor_cores, int seed) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(perceiver_kernels_emulation, CPU, m) {
  m.impl("attention_fwd", &emulated_fwd);
  m.impl("attention_bwd", &emulated_bwd);
}

}  // namespace perceiver_kernels
