// Registration of the CUDA C++ backend: the schema of perceiver_kernels::cuda_attention_fwd (the same
// arguments as the Triton op, so both backends share one contract) and its CUDA implementation. The
// CPU implementation (the reference), the fake implementation and autograd are registered in Python
// (perceiver_kernels/ops/cuda_attention.py).
//
// Host side: every check names the tensor and what was expected; the kernels run on the current CUDA
// stream; nothing here synchronises with the device.

#ifdef PERCEIVER_KERNELS_PYTHON_MODULE
#include <Python.h>
#endif

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <optional>
#include <string>
#include <tuple>

#include "attention.h"

namespace perceiver_kernels {
namespace {

constexpr const char* kOp = "perceiver_kernels::cuda_attention_fwd: ";

std::string shape_of(const at::Tensor& t) { return c10::str(t.sizes()); }

// cp.async copies 16-byte rows: the head dim, every stride but the last and the base address must allow it.
void check_layout(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.stride(3) == 1 || t.size(3) <= 1, kOp, name, " must have a contiguous last dim, got strides ",
              t.strides());
  if (t.numel() == 0) return;
  for (int d = 0; d < 3; ++d) {
    TORCH_CHECK(t.size(d) == 1 || t.stride(d) % 8 == 0, kOp, name, " stride ", d, " (", t.stride(d),
                ") must be a multiple of 8 elements (16-byte rows for cp.async)");
  }
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0, kOp, name, " must be 16-byte aligned");
}

int padded_head_dim(int64_t head_dim_qk, int64_t head_dim_v) {
  const int64_t widest = std::max(head_dim_qk, head_dim_v);
  return widest <= 32 ? 32 : (widest <= 64 ? 64 : 128);
}

std::tuple<at::Tensor, at::Tensor> cuda_attention_fwd(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask,
    const std::optional<at::Tensor>& kv_lengths, const std::optional<at::Tensor>& kv_index,
    const std::optional<at::Tensor>& q_rope, const std::optional<at::Tensor>& k_rope, int64_t rotary_dim,
    bool rotary_interleaved, bool causal, double scale, int64_t num_splits) {
  (void)q_rope;
  (void)k_rope;
  (void)rotary_interleaved;
  TORCH_CHECK(!kv_index.has_value(), kOp, "kv_index (prefix dropout) is not supported by the CUDA backend yet");
  TORCH_CHECK(rotary_dim == 0, kOp, "rotary embeddings (rotary_dim=", rotary_dim,
              ") are not supported by the CUDA backend yet");
  TORCH_CHECK(q.dim() == 4, kOp, "q must be (Bq, Nq, H, Dqk), got ", shape_of(q));
  TORCH_CHECK(k.dim() == 4, kOp, "k must be (B, Nk, H, Dqk), got ", shape_of(k));
  TORCH_CHECK(v.dim() == 4, kOp, "v must be (B, Nk, H, Dv), got ", shape_of(v));
  TORCH_CHECK(q.is_cuda() && k.is_cuda() && v.is_cuda(), kOp, "q, k and v must be CUDA tensors");
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), kOp, "q, k and v must be on one device");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), kOp,
              "q, k and v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, kOp,
              "the CUDA backend computes float16 and bfloat16, got ", q.scalar_type());
  const int64_t batch = k.size(0), num_keys = k.size(1), heads = k.size(2), head_dim_qk = k.size(3);
  const int64_t num_queries = q.size(1), head_dim_v = v.size(3);
  TORCH_CHECK(q.size(0) == batch || q.size(0) == 1, kOp, "q must have batch ", batch, " or 1, got ", shape_of(q));
  TORCH_CHECK(q.size(2) == heads && q.size(3) == head_dim_qk, kOp, "q must be (Bq, Nq, ", heads, ", ", head_dim_qk,
              ") to match k ", shape_of(k), ", got ", shape_of(q));
  TORCH_CHECK(v.size(0) == batch && v.size(1) == num_keys && v.size(2) == heads, kOp, "v must be (", batch, ", ",
              num_keys, ", ", heads, ", Dv) to match k, got ", shape_of(v));
  TORCH_CHECK(head_dim_qk % 8 == 0 && head_dim_v % 8 == 0 && head_dim_qk <= 128 && head_dim_v <= 128, kOp,
              "head dims must be multiples of 8 up to 128 on the CUDA backend, got Dqk=", head_dim_qk,
              ", Dv=", head_dim_v);
  TORCH_CHECK(scale > 0, kOp, "scale must be positive, got ", scale);
  check_layout(q, "q");
  check_layout(k, "k");
  check_layout(v, "v");
  TORCH_CHECK(batch * heads <= INT32_MAX && num_queries <= INT32_MAX && num_keys <= INT32_MAX, kOp,
              "sizes beyond int32 are not supported");

  const c10::cuda::CUDAGuard guard(q.device());
  auto out = at::empty({batch, num_queries, heads, head_dim_v}, q.options());
  auto lse = at::empty({batch, heads, num_queries}, q.options().dtype(at::kFloat));
  if (batch == 0 || heads == 0 || num_queries == 0) return {out, lse};

  AttentionParams p{};
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.q_batch_stride = q.size(0) == 1 ? 0 : q.stride(0);
  p.q_row_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0);
  p.k_row_stride = k.stride(1);
  p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0);
  p.v_row_stride = v.stride(1);
  p.v_head_stride = v.stride(2);
  p.out_batch_stride = out.stride(0);
  p.out_row_stride = out.stride(1);
  p.out_head_stride = out.stride(2);

  at::Tensor mask;
  if (key_padding_mask.has_value()) {
    mask = *key_padding_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == batch &&
                    mask.size(1) == num_keys,
                kOp, "key_padding_mask must be bool (", batch, ", ", num_keys, "), got ", mask.scalar_type(), " ",
                shape_of(mask));
    TORCH_CHECK(mask.device() == q.device(), kOp, "key_padding_mask must be on ", q.device());
    p.key_padding_mask = mask.data_ptr<bool>();
    p.mask_batch_stride = mask.stride(0);
    p.mask_row_stride = mask.stride(1);
  }
  at::Tensor lengths;
  if (kv_lengths.has_value()) {
    TORCH_CHECK(kv_lengths->dim() == 1 && kv_lengths->size(0) == batch &&
                    (kv_lengths->scalar_type() == at::kInt || kv_lengths->scalar_type() == at::kLong),
                kOp, "kv_lengths must be int32/int64 (", batch, "), got ", kv_lengths->scalar_type(), " ",
                shape_of(*kv_lengths));
    TORCH_CHECK(kv_lengths->device() == q.device(), kOp, "kv_lengths must be on ", q.device());
    lengths = kv_lengths->to(at::kLong).contiguous();  // a device-side cast: no synchronisation
    p.kv_lengths = lengths.data_ptr<int64_t>();
  }

  p.batch = static_cast<int>(batch);
  p.heads = static_cast<int>(heads);
  p.num_queries = static_cast<int>(num_queries);
  p.num_keys = static_cast<int>(num_keys);
  p.head_dim_qk = static_cast<int>(head_dim_qk);
  p.head_dim_v = static_cast<int>(head_dim_v);
  p.scale = static_cast<float>(scale);
  p.causal = causal;
  p.num_splits = static_cast<int>(std::max<int64_t>(1, num_splits));

  at::Tensor out_partial, lse_partial;
  if (p.num_splits > 1) {
    out_partial = at::empty({p.num_splits, batch, heads, num_queries, head_dim_v}, q.options().dtype(at::kFloat));
    lse_partial = at::empty({p.num_splits, batch, heads, num_queries}, q.options().dtype(at::kFloat));
    p.out_partial = out_partial.data_ptr<float>();
    p.lse_partial = lse_partial.data_ptr<float>();
  }
  const DType dtype = q.scalar_type() == at::kHalf ? DType::kFloat16 : DType::kBFloat16;
  const bool launched =
      launch_attention_forward(p, dtype, padded_head_dim(head_dim_qk, head_dim_v), at::cuda::getCurrentCUDAStream());
  TORCH_CHECK(launched, kOp, "no kernel compiled for head dims ", head_dim_qk, "/", head_dim_v);
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(perceiver_kernels, m) {
  m.def(
      "cuda_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor? key_padding_mask, Tensor? kv_lengths, "
      "Tensor? kv_index, Tensor? q_rope, Tensor? k_rope, int rotary_dim, bool rotary_interleaved, bool causal, "
      "float scale, int num_splits) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(perceiver_kernels, CUDA, m) { m.impl("cuda_attention_fwd", &cuda_attention_fwd); }

}  // namespace perceiver_kernels

#ifdef PERCEIVER_KERNELS_PYTHON_MODULE
// `import perceiver_kernels._C` (the library built by setup.py) loads this file and so registers the ops;
// the module itself is empty. The JIT build and the CMake build are plain libraries (torch.ops.load_library).
extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", "perceiver_kernels CUDA C++ ops", -1, nullptr};
  return PyModule_Create(&module);
}
#endif
