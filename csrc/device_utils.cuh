// Device helpers shared by the forward and backward kernels: cp.async, ldmatrix, mma.sync m16n8k16 per
// 16-bit type, and the tile loader. Fragment layouts (PTX ISA, mma.m16n8k16, g = lane / 4, t = lane % 4):
//   A (16x16, row): a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B (16x8, col):  b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C (16x8):       c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
// A 32-bit register holds the lower column index in its low 16 bits.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <c10/cuda/CUDAException.h>

#include <cstdint>

#include "attention.h"

namespace perceiver_kernels {
namespace detail {

constexpr float kLog2e = 1.4426950408889634f;

__device__ __forceinline__ uint32_t shared_address(const void* ptr) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(ptr));
}

#ifdef PERCEIVER_KERNELS_EMULATION
// The emulator names each warp-collective call by its call site in the kernel: its barrier identity.
#define PERCEIVER_KERNELS_CALL_SITE , const std::source_location &call_site = std::source_location::current()
#else
#define PERCEIVER_KERNELS_CALL_SITE
#endif

// 16-byte global -> shared copy; `valid == false` writes 16 zero bytes instead (src-size 0 reads nothing).
// With PERCEIVER_KERNELS_EMULATION (the CPU emulation in tests/simt_emulation) the four primitives below
// and mma.sync are the emulator's implementations of their PTX definitions instead of inline PTX.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
#ifdef PERCEIVER_KERNELS_EMULATION
  emulator::cp_async_16(dst, src, valid);
#else
  const int src_size = valid ? 16 : 0;
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(src_size));
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#ifdef PERCEIVER_KERNELS_EMULATION
  emulator::cp_async_commit();
#else
  asm volatile("cp.async.commit_group;\n" ::: "memory");
#endif
}

template <int N>
__device__ __forceinline__ void cp_async_wait() {
#ifdef PERCEIVER_KERNELS_EMULATION
  emulator::cp_async_wait(N);
#else
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
#endif
}

// Two 8x8 16-bit matrices, transposed: thread i gets rows 2(i%4), 2(i%4)+1 of column i/4 of each, which
// is the B fragment (k16 x n8, "col") of mma.m16n8k16 when the rows are keys and the columns head dims.
__device__ __forceinline__ void ldmatrix_x2_trans(uint32_t (&frag)[2],
                                                  const void* row_address PERCEIVER_KERNELS_CALL_SITE) {
#ifdef PERCEIVER_KERNELS_EMULATION
  emulator::ldmatrix_x2_trans(frag, row_address, emulator::site_of(call_site));
#else
  asm volatile("ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16 {%0, %1}, [%2];\n"
               : "=r"(frag[0]), "=r"(frag[1])
               : "r"(shared_address(row_address)));
#endif
}

template <typename T>
struct Types;

template <>
struct Types<__half> {
  __device__ __forceinline__ static __half from_float(float x) { return __float2half_rn(x); }
  __device__ __forceinline__ static float to_float(__half x) { return __half2float(x); }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2] PERCEIVER_KERNELS_CALL_SITE) {
#ifdef PERCEIVER_KERNELS_EMULATION
    emulator::mma_m16n8k16<__half>(c, a, b, emulator::site_of(call_site));
#else
    asm volatile(  // volatile, as CUTLASS: never moved or merged
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
};

template <>
struct Types<__nv_bfloat16> {
  __device__ __forceinline__ static __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  __device__ __forceinline__ static float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  __device__ __forceinline__ static uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  __device__ __forceinline__ static void mma(float (&c)[4], const uint32_t (&a)[4],
                                             const uint32_t (&b)[2] PERCEIVER_KERNELS_CALL_SITE) {
#ifdef PERCEIVER_KERNELS_EMULATION
    emulator::mma_m16n8k16<__nv_bfloat16>(c, a, b, emulator::site_of(call_site));
#else
    asm volatile(  // volatile, as CUTLASS: never moved or merged
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#endif
  }
};

// float32 tiles (the SIMT kernels): conversions only, nothing to multiply on tensor cores.
template <>
struct Types<float> {
  __device__ __forceinline__ static float from_float(float x) { return x; }
  __device__ __forceinline__ static float to_float(float x) { return x; }
};

// The memory row of key j of the (possibly gathered) key axis: index[j] clamped to [0, num_rows) when a
// kv_index row is given (prefix dropout), else j.
__device__ __forceinline__ int64_t key_row(const int64_t* index, int j, int num_rows) {
  if (index == nullptr) return j;
  const int64_t row = index[j];
  return row < 0 ? 0 : (row >= num_rows ? num_rows - 1 : row);
}

// Copies rows [first_row, first_row + ROWS) x columns [0, D) of a row-major global tile into shared
// memory (row stride D + 8); rows >= rows_valid and columns >= cols_valid are zero-filled. With `index`
// (one sample's kv_index row), row j is read from memory row key_row(index, j, num_rows). With `padded` (one
// sample's key_padding_mask row, stride padded_stride), a padded key's row is zero-filled too: never loaded,
// whatever its memory holds (NaN, Inf) cannot reach the output or dQ as a zero probability times its value.
template <typename T, int D, int ROWS, int THREADS>
__device__ __forceinline__ void load_tile(T* dst, const T* src, int64_t row_stride, int first_row, int rows_valid,
                                          int cols_valid, const int64_t* index = nullptr, int num_rows = 0,
                                          const bool* padded = nullptr, int64_t padded_stride = 0) {
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  constexpr int kStride = D + 8;
  for (int c = threadIdx.x; c < ROWS * kChunks; c += THREADS) {
    const int r = c / kChunks;
    const int col = (c % kChunks) * 8;
    bool valid = first_row + r < rows_valid && col < cols_valid;
    const int64_t row = valid ? key_row(index, first_row + r, num_rows) : 0;
    if (valid && padded != nullptr) valid = !padded[row * padded_stride];
    const T* from = valid ? src + row * row_stride + col : src;
    cp_async_16(dst + r * kStride + col, from, valid);
  }
}

// Sample b's row of the key padding mask (for the loaders above), or nullptr without one.
__device__ __forceinline__ const bool* padding_row(const CommonParams& p, int b) {
  return p.key_padding_mask == nullptr ? nullptr : p.key_padding_mask + b * p.mask_batch_stride;
}

// Rotates, in shared memory, the first rotary_dim channels of rows [0, rows_valid) of a (ROWS, D) tile
// (row stride STRIDE, elements of type Storage: T itself, or float32 in the SIMT kernels) holding rows
// first_row.. of the key (or query) axis, by the float32 cos/sin tables of one sample (cos row m at
// cos[m * half], sin = cos + sin_offset; m = key_row(index, first_row + r) with a kv_index row, so a
// gathered key keeps its own position), rounding to T as a naive rotation in T would.
// Each pair belongs to one thread: no race within the call; callers __syncthreads() before and after.
template <typename T, int D, int ROWS, int THREADS, typename Storage = T, int STRIDE = D + 8>
__device__ __forceinline__ void rotate_tile(Storage* tile, const float* cos, int64_t sin_offset, int first_row,
                                            int rows_valid, int rotary_dim, bool interleaved,
                                            const int64_t* index = nullptr, int num_rows = 0) {
  const int half = rotary_dim / 2;
  for (int c = threadIdx.x; c < ROWS * half; c += THREADS) {
    const int r = c / half;
    const int i = c % half;
    if (r >= rows_valid) continue;
    const int a = interleaved ? 2 * i : i;
    const int b = interleaved ? 2 * i + 1 : i + half;
    const int64_t table_row = key_row(index, first_row + r, num_rows);
    const float cs = cos[table_row * half + i];
    const float sn = cos[sin_offset + table_row * half + i];
    Storage* row = tile + r * STRIDE;
    const float x = Types<Storage>::to_float(row[a]);
    const float y = Types<Storage>::to_float(row[b]);
    row[a] = Types<Storage>::from_float(Types<T>::to_float(Types<T>::from_float(x * cs - y * sn)));
    row[b] = Types<Storage>::from_float(Types<T>::to_float(Types<T>::from_float(y * cs + x * sn)));
  }
}

// The A fragment (16 x 16, row-major) at rows first_row.., columns first_col.. of a shared-memory tile.
template <typename T>
__device__ __forceinline__ void load_a_fragment(uint32_t (&frag)[4], const T* tile, int first_row, int first_col,
                                                int stride) {
  const int lane = threadIdx.x % 32;
  const T* at = tile + (first_row + lane / 4) * stride + first_col + 2 * (lane % 4);
  frag[0] = *reinterpret_cast<const uint32_t*>(at);
  frag[1] = *reinterpret_cast<const uint32_t*>(at + 8 * stride);
  frag[2] = *reinterpret_cast<const uint32_t*>(at + 8);
  frag[3] = *reinterpret_cast<const uint32_t*>(at + 8 * stride + 8);
}

// Opts `Kernel` into more than 48 KB of dynamic shared memory, once per kernel and device (the attribute
// persists; setting it on every launch would only add host time). A template on the kernel itself, so each
// kernel has its own flags (kernels of one signature share a function type).
template <auto Kernel>
void allow_dynamic_shared_memory(size_t bytes) {
  if (bytes <= 48 * 1024) return;
  static bool done[64] = {};
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  if (device < 64 && done[device]) return;
  C10_CUDA_CHECK(cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
  if (device < 64) done[device] = true;
}

// L_b: the keys sample b may see (kv_lengths[b] clamped to [0, Nk], or Nk).
__device__ __forceinline__ int valid_length(const int64_t* kv_lengths, int b, int num_keys) {
  if (kv_lengths == nullptr) return num_keys;
  const int64_t given = kv_lengths[b];
  return static_cast<int>(given < 0 ? 0 : (given > num_keys ? num_keys : given));
}

// One (batch, head)'s row 0 of q, k and v (q's batch stride is 0 for a query broadcast over the batch).
template <typename T>
struct HeadInputs {
  const T* q;
  const T* k;
  const T* v;
};

template <typename T>
__device__ __forceinline__ HeadInputs<T> head_inputs(const CommonParams& p, int b, int h) {
  return {static_cast<const T*>(p.q) + b * p.q_batch_stride + h * p.q_head_stride,
          static_cast<const T*>(p.k) + b * p.k_batch_stride + h * p.k_head_stride,
          static_cast<const T*>(p.v) + b * p.v_batch_stride + h * p.v_head_stride};
}

// ... and the backward's: row 0 of dO, and the (b, h) rows of lse and delta.
template <typename T>
struct HeadGradients {
  const T* grad_out;
  const float* lse;
  const float* delta;
};

template <typename T>
__device__ __forceinline__ HeadGradients<T> head_gradients(const BackwardParams& p, int b, int h) {
  const int64_t row = (static_cast<int64_t>(b) * p.heads + h) * p.num_queries;
  return {static_cast<const T*>(p.grad_out) + b * p.do_batch_stride + h * p.do_head_stride, p.lse + row,
          p.delta + row};
}

// The key axis of sample b: the memory rows of k, or (prefix dropout) the rows its kv_index row gathers.
struct KeyAxis {
  const int64_t* index;  // this sample's kv_index row, or null
  int size;              // Nk, or Nk' with kv_index
  int length;            // L_b <= size: keys at or beyond it are masked (kv_lengths)
};

__device__ __forceinline__ KeyAxis key_axis(const CommonParams& p, int b) {
  KeyAxis axis;
  axis.index = p.kv_index == nullptr ? nullptr : p.kv_index + b * p.kv_index_batch_stride;
  axis.size = axis.index == nullptr ? p.num_keys : p.num_gathered;
  axis.length = valid_length(p.kv_lengths, b, axis.size);
  return axis;
}

// The causal diagonal, bottom-right aligned: query i sees key j iff j <= i + causal_offset(L_b, Nq), the
// queries being the last Nq positions (Perceiver AR). The same helper as perceiver_kernels/problem.py's and
// the Triton kernels' causal_offset (perceiver_kernels/kernels/common.py).
__device__ __forceinline__ int causal_offset(int length, int num_queries) { return length - num_queries; }

// ... of sample b's key axis, where (keys_after) the sequence goes on for keys_after[b] more keys held elsewhere
// (a chunk of it): clamped to [0, size], beyond which the diagonal already passes every key.
__device__ __forceinline__ int diagonal_offset(const CommonParams& p, const KeyAxis& axis, int b) {
  int after = 0;
  if (p.keys_after != nullptr) {
    const int64_t given = p.keys_after[b];
    after = static_cast<int>(given < 0 ? 0 : (given > axis.size ? axis.size : given));
  }
  return causal_offset(axis.length, p.num_queries) + after;
}

// Whether key j of the axis is visible apart from the causal mask: below L_b and not padding (the flag of
// its memory row).
__device__ __forceinline__ bool key_visible(const CommonParams& p, const KeyAxis& axis, int b, int key) {
  if (key >= axis.length) return false;
  if (p.key_padding_mask == nullptr) return true;
  return !p.key_padding_mask[b * p.mask_batch_stride + key_row(axis.index, key, p.num_keys) * p.mask_row_stride];
}

// rotate_tile on rows first_row.. of sample b's queries (a Q tile), with that sample's cos/sin table.
template <typename T, int D, int ROWS, int THREADS, typename Storage = T, int STRIDE = D + 8>
__device__ __forceinline__ void rotate_queries(Storage* tile, const CommonParams& p, int b, int first_row) {
  const int64_t table_rows = static_cast<int64_t>(p.num_queries) * (p.rotary_dim / 2);
  rotate_tile<T, D, ROWS, THREADS, Storage, STRIDE>(tile, p.q_rope + (p.q_rope_batch > 1 ? b : 0) * table_rows,
                                                    p.q_rope_batch * table_rows, first_row, p.num_queries - first_row,
                                                    p.rotary_dim, p.rotary_interleaved);
}

// ... and on keys first_row.. of sample b's key axis (a K tile): each key keeps the position of its
// memory row (kv_index), keys past L_b are left as loaded (zeros).
template <typename T, int D, int ROWS, int THREADS, typename Storage = T, int STRIDE = D + 8>
__device__ __forceinline__ void rotate_keys(Storage* tile, const CommonParams& p, int b, const KeyAxis& axis,
                                            int first_row) {
  const int64_t table_rows = static_cast<int64_t>(p.num_keys) * (p.rotary_dim / 2);
  rotate_tile<T, D, ROWS, THREADS, Storage, STRIDE>(tile, p.k_rope + (p.k_rope_batch > 1 ? b : 0) * table_rows,
                                                    p.k_rope_batch * table_rows, first_row, axis.length - first_row,
                                                    p.rotary_dim, p.rotary_interleaved, axis.index, p.num_keys);
}

// The key tiles [begin, end) of size block_n that split `split` of `num_splits` walks for the query block
// starting at m0 (block_m rows): every tile up to the last key any of its rows can see (causal: the last
// row's diagonal), divided into contiguous ranges per split.
__device__ __forceinline__ void forward_key_tiles(const CommonParams& p, const KeyAxis& axis, int b, int m0,
                                                  int block_m, int block_n, int split, int num_splits, int& begin,
                                                  int& end) {
  int key_end = axis.length;
  if (p.causal) {
    const int last_row = min(m0 + block_m, p.num_queries) - 1;
    key_end = max(0, min(axis.length, last_row + diagonal_offset(p, axis, b) + 1));
  }
  const int num_tiles = (key_end + block_n - 1) / block_n;
  const int tiles_per_split = (num_tiles + num_splits - 1) / num_splits;
  begin = split * tiles_per_split;
  end = min(num_tiles, begin + tiles_per_split);
}

}  // namespace detail
}  // namespace perceiver_kernels
