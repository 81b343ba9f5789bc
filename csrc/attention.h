// Perceiver attention, CUDA C++ (sm_80+): the launch parameters shared by the host code and the kernels.
// Layout as in perceiver_kernels.attention: q (Bq, Nq, H, Dqk), k (B, Nk, H, Dqk), v (B, Nk, H, Dv),
// out (B, Nq, H, Dv), lse (B, H, Nq) float32. Strides are in elements.
#pragma once

#include <cstddef>
#include <cstdint>

#include <cuda_runtime.h>

namespace perceiver_kernels {

// What the forward and the backward both read: the inputs, the masks, the key axis and rotary.
struct CommonParams {
  const void* q;
  const void* k;
  const void* v;
  const bool* key_padding_mask;  // (B, Nk), True = padding; may be null
  const int64_t* kv_lengths;     // (B,) as int64; may be null
  const int64_t* keys_after;     // (B,) as int64; may be null: causal counts the sequence's keys after these
  // kv_index (B, Nk') int64: attend to key rows kv_index[b] (prefix dropout); num_gathered = Nk'. Masks,
  // rotary positions and padding flags follow the memory rows; kv_lengths and causal refer to Nk'.
  const int64_t* kv_index;
  int64_t kv_index_batch_stride;
  int num_gathered;
  // Rotary embeddings (rotary_dim > 0): float32 cos/sin tables (2, Bt, N, rotary_dim / 2), Bt = 1 or B, for
  // the queries and the keys; pairs (2i, 2i+1) when interleaved, else (i, i + rotary_dim / 2).
  const float* q_rope;
  const float* k_rope;
  int q_rope_batch, k_rope_batch;
  int rotary_dim;
  bool rotary_interleaved;

  int64_t q_batch_stride, q_row_stride, q_head_stride;  // q_batch_stride 0: a query broadcast over the batch
  int64_t k_batch_stride, k_row_stride, k_head_stride;
  int64_t v_batch_stride, v_row_stride, v_head_stride;
  int64_t mask_batch_stride, mask_row_stride;

  int batch, heads, num_queries, num_keys;
  int head_dim_qk, head_dim_v;
  float scale;  // applied to q.k
  bool causal;  // bottom-right aligned: query i sees key j iff j <= i + L_b + keys_after[b] - Nq
};

struct AttentionParams : CommonParams {
  void* out;
  float* lse;
  // Split-KV partials (num_splits > 1): out_partial (splits, B, H, Nq, Dv) and lse_partial (splits, B, H, Nq).
  float* out_partial;
  float* lse_partial;
  int64_t out_batch_stride, out_row_stride, out_head_stride;
  int num_splits;
};

// The backward: dK, dV per key block (one CTA owns 64 keys of one (batch, head)); dQ either by a second,
// query-parallel kernel into float32 partials (the tensor-core family) or accumulated with float32 atomics
// across key blocks (the SIMT family; across the batch too for a broadcast query).
struct BackwardParams : CommonParams {
  const void* grad_out;  // (B, Nq, H, Dv)
  const float* lse;      // (B, H, Nq)
  const float* delta;    // (B, H, Nq): rowsum(dO * O) - dlse
  float* dq_accum;       // SIMT: (Bq, Nq, H, Dqk) float32, zero-initialised
  float* dq_partial;     // tensor cores: (num_splits, B, Nq, H, Dqk) float32, summed by the host
  int num_splits;        // tensor cores: splits of each query block's key tiles for dQ
  void* dk;              // (B, Nk, H, Dqk), contiguous; dK/dV are scattered to the gathered rows with kv_index
  float* dk_float;       // with rotary: dK in the rotated frame, float32 (B, Nk, H, Dqk), turned back after
  void* dv;              // (B, Nk, H, Dv), contiguous
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  int64_t dq_batch_stride, dq_row_stride, dq_head_stride;  // of dq_accum; batch stride 0 for a broadcast query
};

// The backward's row term, before its kernels: delta (B, H, Nq) = rowsum(dO * O) - dlse, in float32.
struct DeltaParams {
  const void* grad_out;   // (B, Nq, H, Dv), unit last-dim stride
  const void* out;        // (B, Nq, H, Dv), unit last-dim stride
  const float* grad_lse;  // (B, H, Nq) contiguous, or null
  float* delta;           // (B, H, Nq) contiguous
  int64_t do_batch_stride, do_row_stride, do_head_stride;
  int64_t out_batch_stride, out_row_stride, out_head_stride;
  int batch, heads, num_queries, head_dim_v;
};

enum class DType { kFloat16, kBFloat16, kFloat32 };

// The tensor-core kernels (attention_fwd.cu, attention_bwd.cu): float16/bfloat16, head dims that are
// multiples of 8 (padded to padded_head_dim in {32, 64, 128, 256}), 16-byte rows. They run the forward
// (and, with num_splits > 1, the combine) on `stream`, and return false when no kernel is compiled for
// this dtype and head-dim group (the host code checks before, so this is a bug guard).
bool launch_attention_forward(const AttentionParams& params, DType dtype, int padded_head_dim, cudaStream_t stream);
// The backward runs the dK/dV kernel, then the dQ kernel (params.dq_partial).
bool launch_attention_backward(const BackwardParams& params, DType dtype, int padded_head_dim, cudaStream_t stream);
// The most dynamic shared memory a CTA of the tensor-core kernels takes, up to D = 128 (the forward's) and
// at D = 256 (the dK/dV kernel's); GPUs that cannot opt into as much run those head dims on the SIMT kernels.
// The launchers static_assert these bounds.
constexpr size_t kTensorCoreSharedMemory = 87040;
constexpr size_t kTensorCoreWideHeadSharedMemory = 101632;

// The SIMT kernels (attention_simt.cu): float32, float16 and bfloat16, any head dims up to 256, any row
// layout with a unit last-dim stride, no grid limit but int32 CTA counts. Same contract as above.
bool launch_attention_forward_simt(const AttentionParams& params, DType dtype, int max_head_dim, cudaStream_t stream);
bool launch_attention_backward_simt(const BackwardParams& params, DType dtype, int max_head_dim, cudaStream_t stream);

// Merges split-KV partials (params.out_partial, params.lse_partial) into params.out and params.lse.
void launch_combine_splits(const AttentionParams& params, DType dtype, cudaStream_t stream);

// DeltaParams::delta from grad_out and out (of dtype), one warp per row.
void launch_delta(const DeltaParams& params, DType dtype, cudaStream_t stream);
// out (Bg, N, H, D) = the inverse rotation of grad (float32, same shape, contiguous) by rope (2, Bt, N, R/2),
// cast to dtype; channels >= rotary_dim are copied. Turns gradients computed in the rotated frame back.
void launch_rotate_back(const float* grad, void* out, const float* rope, int rope_batch, int64_t batch, int n,
                        int heads, int head_dim, int rotary_dim, bool interleaved, DType dtype, cudaStream_t stream);

}  // namespace perceiver_kernels
