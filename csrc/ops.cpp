// Registration of the CUDA C++ backend: the schemas of perceiver_kernels::cuda_attention_fwd / _bwd (the
// same arguments as the Triton ops, so both backends share one contract) and their CUDA implementations. The
// CPU implementation (the reference), the fake implementation and autograd are registered in Python
// (perceiver_kernels/ops/cuda_attention.py).
//
// Host side: the checks and the flow are host.h's (shared with the CPU emulation of the SIMT kernels);
// here they are bound to the CUDA launches, on the current stream. Nothing synchronises with the device.

#ifdef PERCEIVER_KERNELS_PYTHON_MODULE
#include <Python.h>
#endif

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>

#include "attention.h"
#include "host.h"

namespace perceiver_kernels {
namespace {

using namespace host;

// Which kernel family runs these (checked) inputs on the current GPU; the forward and the backward both
// decide by this, on the same inputs.
bool use_tensor_cores(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t key_axis) {
  return tensor_core_eligible(q, k, v, key_axis, at::cuda::getCurrentDeviceProperties()->sharedMemPerBlockOptin);
}

// The CUDA launches on the current stream: the tensor-core kernels or the SIMT ones.
Kernels cuda_kernels(bool tensor_cores) {
  Kernels kernels;
  kernels.forward = [tensor_cores](const AttentionParams& p, DType dtype, int head_dim) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    return tensor_cores ? launch_attention_forward(p, dtype, head_dim, stream)
                        : launch_attention_forward_simt(p, dtype, head_dim, stream);
  };
  kernels.backward = [tensor_cores](const BackwardParams& p, DType dtype, int head_dim) {
    const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
    return tensor_cores ? launch_attention_backward(p, dtype, head_dim, stream)
                        : launch_attention_backward_simt(p, dtype, head_dim, stream);
  };
  kernels.delta = [](const DeltaParams& p, DType dtype) { launch_delta(p, dtype, at::cuda::getCurrentCUDAStream()); };
  kernels.rotate_back = [](const float* grad, void* out, const float* rope, int rope_batch, int64_t batch, int n,
                           int heads, int head_dim, int rotary_dim, bool interleaved, DType dtype) {
    launch_rotate_back(grad, out, rope, rope_batch, batch, n, heads, head_dim, rotary_dim, interleaved, dtype,
                       at::cuda::getCurrentCUDAStream());
  };
  kernels.aligned_rows = tensor_cores;
  kernels.split_dq = tensor_cores;
  return kernels;
}

void check_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v) {
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), kOp, "q, k and v must be CUDA tensors");
  const cudaDeviceProp* device = at::cuda::getDeviceProperties(q.device().index());
  TORCH_CHECK(device->major >= 8, kOp, "the CUDA kernels are built for compute capability 8.0 and newer, ",
              device->name, " has ", device->major, ".", device->minor);
}

std::tuple<at::Tensor, at::Tensor> cuda_attention_fwd(
    const at::Tensor& q_arg, const at::Tensor& k_arg, const at::Tensor& v_arg,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& kv_lengths,
    const std::optional<at::Tensor>& kv_index, const std::optional<at::Tensor>& q_rope,
    const std::optional<at::Tensor>& k_rope, int64_t rotary_dim, bool rotary_interleaved, bool causal, double scale,
    int64_t num_splits, const std::optional<at::Tensor>& keys_after) {
  check_cuda(q_arg, k_arg, v_arg);
  const Prepared in = prepare(q_arg, k_arg, v_arg, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope,
                              rotary_dim, scale, keys_after);
  const c10::cuda::CUDAGuard guard(in.q.device());
  return attention_forward(in.q, in.k, in.v, key_padding_mask, in.checked, rotary_dim, rotary_interleaved, causal,
                           scale, num_splits, cuda_kernels(use_tensor_cores(in.q, in.k, in.v, in.key_axis)));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cuda_attention_bwd(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q_arg,
    const at::Tensor& k_arg, const at::Tensor& v_arg, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& kv_lengths,
    const std::optional<at::Tensor>& kv_index, const std::optional<at::Tensor>& q_rope,
    const std::optional<at::Tensor>& k_rope, int64_t rotary_dim, bool rotary_interleaved, bool causal, double scale,
    int64_t num_splits, const std::optional<at::Tensor>& keys_after) {
  check_cuda(q_arg, k_arg, v_arg);
  const Prepared in = prepare(q_arg, k_arg, v_arg, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope,
                              rotary_dim, scale, keys_after);
  const c10::cuda::CUDAGuard guard(in.q.device());
  const bool tensor_cores = use_tensor_cores(in.q, in.k, in.v, in.key_axis);
  if (!tensor_cores) {  // the SIMT backward adds dQ with float32 atomics: their order varies between runs
    at::globalContext().alertNotDeterministic(
        "perceiver_kernels::cuda_attention_bwd on the SIMT kernels (float32, or head dims not multiples of 8)");
  }
  return attention_backward(grad_out, grad_lse, in.q, in.k, in.v, out, lse, key_padding_mask, in.checked, rotary_dim,
                            rotary_interleaved, causal, scale, num_splits, cuda_kernels(tensor_cores));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(perceiver_kernels, m) {
  m.def(
      "cuda_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? kv_lengths, "
      "Tensor? kv_index, Tensor? q_rope, Tensor? k_rope, int rotary_dim, bool rotary_interleaved, bool causal, "
      "float scale, int num_splits, Tensor? keys_after=None) -> (Tensor, Tensor)");
  m.def(
      "cuda_attention_bwd(Tensor grad_out, Tensor? grad_lse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
      "Tensor? key_padding_mask, Tensor? kv_lengths, Tensor? kv_index, Tensor? q_rope, Tensor? k_rope, "
      "int rotary_dim, bool rotary_interleaved, bool causal, float scale, int num_splits, Tensor? keys_after=None) "
      "-> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(perceiver_kernels, CUDA, m) {
  m.impl("cuda_attention_fwd", &cuda_attention_fwd);
  m.impl("cuda_attention_bwd", &cuda_attention_bwd);
}

}  // namespace perceiver_kernels

#ifdef PERCEIVER_KERNELS_PYTHON_MODULE
// `import perceiver_kernels._C` (the library built by setup.py) loads this file and so registers the ops;
// the module itself is empty. The JIT build and the CMake build are plain libraries (torch.ops.load_library).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "perceiver_kernels CUDA C++ ops", -1, nullptr};
  return PyModule_Create(&module);
}
#endif
