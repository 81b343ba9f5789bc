// The host side of perceiver_kernels::cuda_attention_fwd / _bwd without the device: input checks (every
// message names the tensor and what was expected), the launch parameters, allocation of outputs and
// scratch, and the order of the kernels. ops.cpp binds it to the CUDA launches; the CPU emulation of the
// SIMT kernels (tests/simt_emulation) binds it to emulated launches, so the very same flow is tested there.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <tuple>

#include "attention.h"

namespace perceiver_kernels {
namespace host {

constexpr const char* kOp = "perceiver_kernels::cuda_attention: ";
constexpr int64_t kMaxRows = INT32_MAX - 256;  // rows of an axis, so that row + tile stays an int32

inline std::string shape_of(const at::Tensor& t) { return c10::str(t.sizes()); }

// The kernels read rows with a unit last-dim stride; anything else (a rare layout) is copied first.
inline at::Tensor with_unit_last_dim(const at::Tensor& t) {
  return t.dim() == 4 && t.size(3) > 1 && t.stride(3) != 1 ? t.contiguous() : t;
}

// cp.async copies 16-byte rows: every stride but the last and the base address must allow it.
inline bool rows_16_byte_aligned(const at::Tensor& t) {
  if (t.numel() == 0) return true;
  for (int d = 0; d < 3; ++d) {
    if (t.size(d) > 1 && t.stride(d) % 8 != 0) return false;
  }
  return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
}

// Whether the tensor-core kernels take these inputs: 16-bit, head dims that are multiples of 8 in 16-byte
// rows, query and key blocks of 64 within the grid's y axis, and a GPU that lets a CTA opt into the shared
// memory of their head-dim group (shared_memory_optin). Everything else runs on the SIMT kernels.
inline bool tensor_core_eligible(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t key_axis,
                                 size_t shared_memory_optin) {
  if (q.scalar_type() == at::kFloat) return false;
  const int64_t head_dim_qk = k.size(3), head_dim_v = v.size(3);
  if (head_dim_qk % 8 != 0 || head_dim_v % 8 != 0) return false;
  if (!rows_16_byte_aligned(q) || !rows_16_byte_aligned(k) || !rows_16_byte_aligned(v)) return false;
  if ((q.size(1) + 63) / 64 > 65535 || (key_axis + 63) / 64 > 65535) return false;
  const bool wide = std::max(head_dim_qk, head_dim_v) > 128;
  return shared_memory_optin >= (wide ? kTensorCoreWideHeadSharedMemory : kTensorCoreSharedMemory);
}

inline int padded_head_dim(int64_t head_dim_qk, int64_t head_dim_v) {
  const int64_t widest = std::max(head_dim_qk, head_dim_v);
  return widest <= 32 ? 32 : (widest <= 64 ? 64 : (widest <= 128 ? 128 : 256));
}

inline DType dtype_of(const at::Tensor& t) {
  return t.scalar_type() == at::kHalf ? DType::kFloat16
                                      : (t.scalar_type() == at::kBFloat16 ? DType::kBFloat16 : DType::kFloat32);
}

// A per-sample count (kv_lengths, keys_after): int32/int64 (B,) on q's device, returned as int64 (a device-side
// cast: no synchronisation); an undefined tensor when absent.
inline at::Tensor check_per_sample(const std::optional<at::Tensor>& t, const char* name, int64_t batch,
                                   const at::Tensor& q) {
  if (!t.has_value()) return {};
  TORCH_CHECK(t->dim() == 1 && t->size(0) == batch && (t->scalar_type() == at::kInt || t->scalar_type() == at::kLong),
              kOp, name, " must be int32/int64 (", batch, "), got ", t->scalar_type(), " ", shape_of(*t));
  TORCH_CHECK(t->device() == q.device(), kOp, name, " must be on ", q.device());
  return t->to(at::kLong).contiguous();
}

// The checks both ops share: shapes, devices, dtypes, head dims, grid limits, masks. Returns kv_lengths as an
// int64 tensor (a device-side cast: no synchronisation) or an undefined tensor.
inline at::Tensor check_inputs(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& kv_lengths,
                        double scale) {
  TORCH_CHECK(q.dim() == 4, kOp, "q must be (Bq, Nq, H, Dqk), got ", shape_of(q));
  TORCH_CHECK(k.dim() == 4, kOp, "k must be (B, Nk, H, Dqk), got ", shape_of(k));
  TORCH_CHECK(v.dim() == 4, kOp, "v must be (B, Nk, H, Dv), got ", shape_of(v));
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), kOp, "q, k and v must be on one device");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), kOp,
              "q, k and v must share a dtype");
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kFloat,
              kOp, "the CUDA backend computes float32, float16 and bfloat16, got ", q.scalar_type());
  const int64_t batch = k.size(0), num_keys = k.size(1), heads = k.size(2), head_dim_qk = k.size(3);
  const int64_t num_queries = q.size(1), head_dim_v = v.size(3);
  TORCH_CHECK(q.size(0) == batch || q.size(0) == 1, kOp, "q must have batch ", batch, " or 1, got ", shape_of(q));
  TORCH_CHECK(q.size(2) == heads && q.size(3) == head_dim_qk, kOp, "q must be (Bq, Nq, ", heads, ", ", head_dim_qk,
              ") to match k ", shape_of(k), ", got ", shape_of(q));
  TORCH_CHECK(v.size(0) == batch && v.size(1) == num_keys && v.size(2) == heads, kOp, "v must be (", batch, ", ",
              num_keys, ", ", heads, ", Dv) to match k, got ", shape_of(v));
  TORCH_CHECK(head_dim_qk >= 1 && head_dim_v >= 1 && head_dim_qk <= 256 && head_dim_v <= 256, kOp,
              "head dims must be between 1 and 256 on the CUDA backend, got Dqk=", head_dim_qk, ", Dv=", head_dim_v);
  // The kernels keep the running max of unscaled scores: a non-positive (or float-underflowing) scale
  // would turn -inf masks into NaN. (Python refuses such calls first: cuda_attention.unsupported_reason.)
  TORCH_CHECK(static_cast<float>(scale) > 0 && std::isfinite(static_cast<float>(scale)), kOp,
              "the CUDA kernels need a positive float32 scale, got ", scale);
  // Index limits: the kernels count rows in int32 (with a tile of slack), and launch int32 CTA counts along
  // x: B*H*Nq for the split-KV combine, B*H times the query or key tiles of 16 for the SIMT kernels. Blocks
  // of 64 along y (<= 65535) are the tensor-core kernels', which tensor_core_eligible() checks.
  TORCH_CHECK(num_queries <= kMaxRows && num_keys <= kMaxRows, kOp, "Nq and Nk must be at most ", kMaxRows,
              ", got ", num_queries, " and ", num_keys);
  TORCH_CHECK(batch * heads * std::max<int64_t>(num_queries, 1) <= INT32_MAX &&
                  batch * heads * ((std::max(num_queries, num_keys) + 15) / 16) <= INT32_MAX,
              kOp, "B * H * max(Nq, Nk) = ", batch * heads * std::max(num_queries, num_keys),
              " exceeds the CUDA kernels' int32 grid");
  if (key_padding_mask.has_value()) {
    const at::Tensor& mask = *key_padding_mask;
    TORCH_CHECK(mask.scalar_type() == at::kBool && mask.dim() == 2 && mask.size(0) == batch &&
                    mask.size(1) == num_keys,
                kOp, "key_padding_mask must be bool (", batch, ", ", num_keys, "), got ", mask.scalar_type(), " ",
                shape_of(mask));
    TORCH_CHECK(mask.device() == q.device(), kOp, "key_padding_mask must be on ", q.device());
  }
  return check_per_sample(kv_lengths, "kv_lengths", batch, q);
}

// kv_index (B, Nk') int64 on q's device, with unit stride along the gathered axis; undefined without it.
// (Range, order and uniqueness are the Python side's checks, in eager mode: the kernels clamp, so a bad index
// cannot read out of bounds, but duplicate rows would race in the backward's dK/dV scatter.)
inline at::Tensor check_kv_index(const std::optional<at::Tensor>& kv_index, const at::Tensor& k) {
  if (!kv_index.has_value()) return {};
  const at::Tensor& t = *kv_index;
  TORCH_CHECK(t.scalar_type() == at::kLong && t.dim() == 2 && t.size(0) == k.size(0), kOp,
              "kv_index must be int64 (", k.size(0), ", Nk'), got ", t.scalar_type(), " ", shape_of(t));
  TORCH_CHECK(t.device() == k.device(), kOp, "kv_index must be on ", k.device());
  TORCH_CHECK(t.size(1) <= kMaxRows && k.size(0) * k.size(2) * ((t.size(1) + 15) / 16) <= INT32_MAX, kOp,
              "kv_index gathers ", t.size(1), " keys per sample: beyond the CUDA kernels' int32 rows and grid");
  TORCH_CHECK(k.size(1) > 0 || t.size(1) == 0, kOp, "kv_index gathers ", t.size(1), " rows from an empty k");
  return t.stride(1) == 1 ? t : t.contiguous();
}

// The rotary tables (2, Bt, N, rotary_dim / 2) float32 of the queries or keys, made contiguous; an undefined
// tensor without rotary.
inline at::Tensor check_rope(const std::optional<at::Tensor>& rope, const char* name, int64_t rotary_dim, int64_t batch,
                      int64_t rows, int64_t head_dim_qk, const at::Tensor& q) {
  if (rotary_dim == 0) return {};
  TORCH_CHECK(rotary_dim > 0 && rotary_dim % 2 == 0 && rotary_dim <= head_dim_qk, kOp,
              "rotary_dim must be even and <= Dqk = ", head_dim_qk, ", got ", rotary_dim);
  TORCH_CHECK(rope.has_value(), kOp, name, " (the rotary cos/sin table) is required with rotary_dim > 0");
  const at::Tensor& t = *rope;
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.dim() == 4 && t.size(0) == 2 &&
                  (t.size(1) == 1 || t.size(1) == batch) && t.size(2) == rows && t.size(3) == rotary_dim / 2,
              kOp, name, " must be float32 (2, 1 or ", batch, ", ", rows, ", ", rotary_dim / 2, "), got ",
              t.scalar_type(), " ", shape_of(t));
  TORCH_CHECK(t.device() == q.device(), kOp, name, " must be on ", q.device());
  return t.contiguous();
}

// The inputs both ops share, checked: kv_lengths and keys_after as int64, kv_index and the rotary tables
// (undefined where absent).
struct Checked {
  at::Tensor lengths, index, q_table, k_table, after;
};

inline Checked check_all(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& kv_lengths,
                  const std::optional<at::Tensor>& kv_index, const std::optional<at::Tensor>& q_rope,
                  const std::optional<at::Tensor>& k_rope, int64_t rotary_dim, double scale,
                  const std::optional<at::Tensor>& keys_after) {
  Checked c;
  c.lengths = check_inputs(q, k, v, key_padding_mask, kv_lengths, scale);
  c.after = check_per_sample(keys_after, "keys_after", k.size(0), q);
  c.index = check_kv_index(kv_index, k);
  c.q_table = check_rope(q_rope, "q_rope", rotary_dim, k.size(0), q.size(1), k.size(3), q);
  c.k_table = check_rope(k_rope, "k_rope", rotary_dim, k.size(0), k.size(1), k.size(3), q);
  TORCH_CHECK(rotary_dim == 0 || q.size(0) == k.size(0) || c.q_table.size(1) == 1, kOp,
              "a broadcast (batch-1) q with per-sample q_rope must be expanded to the batch first");
  // The rotary turn-back of dQ and dK launches one CTA per (sample, row, head): checked here, before any
  // kernel of the backward is queued.
  TORCH_CHECK(rotary_dim == 0 || k.size(0) * k.size(2) * std::max(q.size(1), k.size(1)) <= INT32_MAX, kOp,
              "with rotary, B * H * max(Nq, Nk) = ", k.size(0) * k.size(2) * std::max(q.size(1), k.size(1)),
              " exceeds the CUDA kernels' int32 grid");
  return c;
}

// The op's inputs as the flows below take them: q, k, v with unit last-dim strides (copied where needed),
// checked, and the length of the (gathered) key axis.
struct Prepared {
  at::Tensor q, k, v;
  Checked checked;
  int64_t key_axis;
};

inline Prepared prepare(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                        const std::optional<at::Tensor>& key_padding_mask, const std::optional<at::Tensor>& kv_lengths,
                        const std::optional<at::Tensor>& kv_index, const std::optional<at::Tensor>& q_rope,
                        const std::optional<at::Tensor>& k_rope, int64_t rotary_dim, double scale,
                        const std::optional<at::Tensor>& keys_after) {
  Prepared in{with_unit_last_dim(q), with_unit_last_dim(k), with_unit_last_dim(v), {}, 0};
  in.checked = check_all(in.q, in.k, in.v, key_padding_mask, kv_lengths, kv_index, q_rope, k_rope, rotary_dim, scale,
                         keys_after);
  in.key_axis = in.checked.index.defined() ? in.checked.index.size(1) : in.k.size(1);
  return in;
}

// The fields both ops set the same way.
inline void fill_common(CommonParams& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                 const std::optional<at::Tensor>& key_padding_mask, const Checked& c, int64_t rotary_dim,
                 bool rotary_interleaved, bool causal, double scale) {
  const at::Tensor& lengths = c.lengths;
  const at::Tensor& index = c.index;
  const at::Tensor& q_table = c.q_table;
  const at::Tensor& k_table = c.k_table;
  p.q = q.data_ptr();
  p.k = k.data_ptr();
  p.v = v.data_ptr();
  p.q_batch_stride = q.size(0) == 1 ? 0 : q.stride(0);
  p.q_row_stride = q.stride(1);
  p.q_head_stride = q.stride(2);
  p.k_batch_stride = k.stride(0);
  p.k_row_stride = k.stride(1);
  p.k_head_stride = k.stride(2);
  p.v_batch_stride = v.stride(0);
  p.v_row_stride = v.stride(1);
  p.v_head_stride = v.stride(2);
  if (key_padding_mask.has_value()) {
    p.key_padding_mask = key_padding_mask->data_ptr<bool>();
    p.mask_batch_stride = key_padding_mask->stride(0);
    p.mask_row_stride = key_padding_mask->stride(1);
  }
  if (lengths.defined()) p.kv_lengths = lengths.data_ptr<int64_t>();
  if (c.after.defined()) p.keys_after = c.after.data_ptr<int64_t>();
  if (index.defined()) {
    p.kv_index = index.data_ptr<int64_t>();
    p.kv_index_batch_stride = index.stride(0);
    p.num_gathered = static_cast<int>(index.size(1));
  }
  if (rotary_dim > 0) {
    p.q_rope = q_table.data_ptr<float>();
    p.k_rope = k_table.data_ptr<float>();
    p.q_rope_batch = static_cast<int>(q_table.size(1));
    p.k_rope_batch = static_cast<int>(k_table.size(1));
    p.rotary_dim = static_cast<int>(rotary_dim);
    p.rotary_interleaved = rotary_interleaved;
  }
  p.batch = static_cast<int>(k.size(0));
  p.heads = static_cast<int>(k.size(2));
  p.num_queries = static_cast<int>(q.size(1));
  p.num_keys = static_cast<int>(k.size(1));
  p.head_dim_qk = static_cast<int>(k.size(3));
  p.head_dim_v = static_cast<int>(v.size(3));
  p.scale = static_cast<float>(scale);
  p.causal = causal;
}

// How the flows below run kernels (on the device's current stream, or emulated).
struct Kernels {
  // The forward (and the split-KV combine when num_splits > 1); false if none is compiled for this dtype
  // and padded head dim.
  std::function<bool(const AttentionParams&, DType, int padded_head_dim)> forward;
  std::function<bool(const BackwardParams&, DType, int padded_head_dim)> backward;
  std::function<void(const DeltaParams&, DType)> delta;
  // launch_rotate_back's arguments, without the stream.
  std::function<void(const float* grad, void* out, const float* rope, int rope_batch, int64_t batch, int n, int heads,
                     int head_dim, int rotary_dim, bool interleaved, DType dtype)>
      rotate_back;
  bool aligned_rows = false;  // the backward's kernels need dO in 16-byte rows (the tensor-core ones)
  // The backward writes dQ as float32 partials per (split, sample) (BackwardParams::dq_partial, the
  // tensor-core family) instead of adding it into dq_accum with atomics (the SIMT family).
  bool split_dq = false;
};

// Split counts past the key blocks of 64 would only add empty work (and the grid's z axis takes 65535).
inline int clamp_splits(int64_t num_splits, int64_t key_axis) {
  return static_cast<int>(std::clamp<int64_t>(num_splits, 1, std::clamp<int64_t>((key_axis + 63) / 64, 1, 65535)));
}

// The forward op on checked inputs (q, k, v with unit last-dim strides): allocates out, lse and the
// split-KV partials, fills the parameters and runs kernels.forward.
inline std::tuple<at::Tensor, at::Tensor> attention_forward(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& key_padding_mask,
    const Checked& checked, int64_t rotary_dim, bool rotary_interleaved, bool causal, double scale,
    int64_t num_splits, const Kernels& kernels) {
  const at::Tensor& index = checked.index;
  const int64_t batch = k.size(0), num_keys = k.size(1), heads = k.size(2), head_dim_qk = k.size(3);
  const int64_t num_queries = q.size(1), head_dim_v = v.size(3);
  auto out = at::empty({batch, num_queries, heads, head_dim_v}, q.options());
  auto lse = at::empty({batch, heads, num_queries}, q.options().dtype(at::kFloat));
  if (batch == 0 || heads == 0 || num_queries == 0) return {out, lse};

  AttentionParams p{};
  fill_common(p, q, k, v, key_padding_mask, checked, rotary_dim, rotary_interleaved, causal, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();
  p.out_batch_stride = out.stride(0);
  p.out_row_stride = out.stride(1);
  p.out_head_stride = out.stride(2);
  p.num_splits = clamp_splits(num_splits, index.defined() ? index.size(1) : num_keys);

  at::Tensor out_partial, lse_partial;
  if (p.num_splits > 1) {
    out_partial = at::empty({p.num_splits, batch, heads, num_queries, head_dim_v}, q.options().dtype(at::kFloat));
    lse_partial = at::empty({p.num_splits, batch, heads, num_queries}, q.options().dtype(at::kFloat));
    p.out_partial = out_partial.data_ptr<float>();
    p.lse_partial = lse_partial.data_ptr<float>();
  }
  const bool launched = kernels.forward(p, dtype_of(q), padded_head_dim(head_dim_qk, head_dim_v));
  TORCH_CHECK(launched, kOp, "no kernel compiled for head dims ", head_dim_qk, "/", head_dim_v);
  return {out, lse};
}


// The backward op on checked inputs (as attention_forward): checks the forward's outputs and the
// gradients, computes delta, allocates the gradients and runs kernels.backward (and kernels.rotate_back).
// num_splits: the dQ pass's split of each query block's key tiles (split_dq kernels only).
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_backward(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& grad_lse, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse,
    const std::optional<at::Tensor>& key_padding_mask,
    const Checked& checked, int64_t rotary_dim, bool rotary_interleaved, bool causal, double scale,
    int64_t num_splits, const Kernels& kernels) {
  const at::Tensor& index = checked.index;
  const int64_t batch = k.size(0), num_keys = k.size(1), heads = k.size(2), head_dim_qk = k.size(3);
  const int64_t num_queries = q.size(1), head_dim_v = v.size(3);
  TORCH_CHECK(grad_out.sizes() == out.sizes() && out.dim() == 4 && out.size(0) == batch && out.size(1) == num_queries &&
                  out.size(2) == heads && out.size(3) == head_dim_v,
              kOp, "grad_out and out must be (", batch, ", ", num_queries, ", ", heads, ", ", head_dim_v, "), got ",
              shape_of(grad_out), " and ", shape_of(out));
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 3 && lse.size(0) == batch && lse.size(1) == heads &&
                  lse.size(2) == num_queries,
              kOp, "lse must be float32 (", batch, ", ", heads, ", ", num_queries, "), got ", shape_of(lse));
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), kOp,
              "grad_out and out must have q's dtype ", q.scalar_type(), ", got ", grad_out.scalar_type(), " and ",
              out.scalar_type());
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(), kOp,
              "grad_out, out and lse must be on ", q.device());
  if (grad_lse.has_value()) {
    TORCH_CHECK(grad_lse->sizes() == lse.sizes() && grad_lse->device() == q.device(), kOp,
                "grad_lse must be shaped like lse ", shape_of(lse), " on ", q.device(), ", got ", shape_of(*grad_lse));
  }
  // With kv_index the kernel writes only the gathered rows: the others' gradients are zero.
  auto dk = index.defined() ? at::zeros({batch, num_keys, heads, head_dim_qk}, q.options())
                            : at::empty({batch, num_keys, heads, head_dim_qk}, q.options());
  auto dv = index.defined() ? at::zeros({batch, num_keys, heads, head_dim_v}, q.options())
                            : at::empty({batch, num_keys, heads, head_dim_v}, q.options());
  const int64_t key_axis = index.defined() ? index.size(1) : num_keys;
  const auto zero_dq = [&] { return at::zeros({q.size(0), num_queries, heads, head_dim_qk}, q.options()); };
  if (batch == 0 || heads == 0 || num_keys == 0) return {zero_dq(), dk, dv};
  if (key_axis == 0) return {zero_dq(), dk.zero_(), dv.zero_()};  // nothing gathered
  if (num_queries == 0) return {zero_dq(), dk.zero_(), dv.zero_()};

  const at::Tensor lse_c = lse.contiguous();
  at::Tensor dout = with_unit_last_dim(grad_out);  // e.g. the zero-stride gradient of out.sum()
  if (kernels.aligned_rows && !rows_16_byte_aligned(dout)) dout = grad_out.clone(at::MemoryFormat::Contiguous);

  // delta = rowsum(dO * O) - dlse, per (b, h, query): the softmax backward's row term.
  const DType dtype = dtype_of(q);
  const at::Tensor out_rows = with_unit_last_dim(out);
  const at::Tensor dlse = grad_lse.has_value() ? grad_lse->to(at::kFloat).contiguous() : at::Tensor();
  auto delta = at::empty({batch, heads, num_queries}, q.options().dtype(at::kFloat));
  DeltaParams dp{};
  dp.grad_out = dout.data_ptr();
  dp.out = out_rows.data_ptr();
  dp.grad_lse = dlse.defined() ? dlse.data_ptr<float>() : nullptr;
  dp.delta = delta.data_ptr<float>();
  dp.do_batch_stride = dout.stride(0);
  dp.do_row_stride = dout.stride(1);
  dp.do_head_stride = dout.stride(2);
  dp.out_batch_stride = out_rows.stride(0);
  dp.out_row_stride = out_rows.stride(1);
  dp.out_head_stride = out_rows.stride(2);
  dp.batch = static_cast<int>(batch);
  dp.heads = static_cast<int>(heads);
  dp.num_queries = static_cast<int>(num_queries);
  dp.head_dim_v = static_cast<int>(head_dim_v);
  kernels.delta(dp, dtype);

  BackwardParams p{};
  fill_common(p, q, k, v, key_padding_mask, checked, rotary_dim, rotary_interleaved, causal, scale);
  p.grad_out = dout.data_ptr();
  p.lse = lse_c.data_ptr<float>();
  p.delta = delta.data_ptr<float>();
  p.dk = dk.data_ptr();
  p.dv = dv.data_ptr();
  p.do_batch_stride = dout.stride(0);
  p.do_row_stride = dout.stride(1);
  p.do_head_stride = dout.stride(2);
  // dQ: float32 partials (num_splits, B, Nq, H, Dqk) to sum, or one buffer the kernels add into.
  const auto float_options = q.options().dtype(at::kFloat);
  at::Tensor dq_accum, dq_partial;
  if (kernels.split_dq) {
    p.num_splits = clamp_splits(num_splits, key_axis);
    dq_partial = at::empty({p.num_splits, batch, num_queries, heads, head_dim_qk}, float_options);
    p.dq_partial = dq_partial.data_ptr<float>();
  } else {
    dq_accum = at::zeros({q.size(0), num_queries, heads, head_dim_qk}, float_options);
    p.dq_accum = dq_accum.data_ptr<float>();
    p.dq_batch_stride = q.size(0) == 1 ? 0 : dq_accum.stride(0);
    p.dq_row_stride = dq_accum.stride(1);
    p.dq_head_stride = dq_accum.stride(2);
  }
  at::Tensor dk_float;
  if (rotary_dim > 0) {
    dk_float = index.defined() ? at::zeros({batch, num_keys, heads, head_dim_qk}, float_options)
                               : at::empty({batch, num_keys, heads, head_dim_qk}, float_options);
    p.dk_float = dk_float.data_ptr<float>();
  }
  const bool launched = kernels.backward(p, dtype, padded_head_dim(head_dim_qk, head_dim_v));
  TORCH_CHECK(launched, kOp, "no backward kernel compiled for head dims ", head_dim_qk, "/", head_dim_v);
  if (kernels.split_dq) {  // sum the splits and, for a query broadcast over the batch, the samples
    const bool sum_samples = q.size(0) != batch;
    if (p.num_splits == 1 && !sum_samples) {
      dq_accum = dq_partial[0];
    } else {
      dq_accum = sum_samples ? dq_partial.sum(at::IntArrayRef{0, 1}).unsqueeze(0) : dq_partial.sum(0);
    }
  }
  if (rotary_dim == 0) return {dq_accum.to(q.scalar_type()), dk, dv};
  // dQ and dK were computed in the rotated frame: turn them back (float32 in, q's dtype out).
  auto dq = at::empty_like(dq_accum, q.options());
  kernels.rotate_back(dq_accum.data_ptr<float>(), dq.data_ptr(), p.q_rope, p.q_rope_batch, q.size(0), p.num_queries,
                      p.heads, p.head_dim_qk, p.rotary_dim, rotary_interleaved, dtype);
  kernels.rotate_back(dk_float.data_ptr<float>(), dk.data_ptr(), p.k_rope, p.k_rope_batch, batch, p.num_keys, p.heads,
                      p.head_dim_qk, p.rotary_dim, rotary_interleaved, dtype);
  return {dq, dk, dv};
}

}  // namespace host
}  // namespace perceiver_kernels
