// The one place that maps a dtype and head dims to kernel instantiations (host code): the launchers
// (attention_*.cu) and the CPU emulation (tests/simt_emulation) call kernels through these.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "attention.h"

namespace perceiver_kernels {

// fn.template operator()<T>() with the element type of dtype.
template <typename Fn>
void with_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      fn.template operator()<float>();
      break;
    case DType::kFloat16:
      fn.template operator()<__half>();
      break;
    case DType::kBFloat16:
      fn.template operator()<__nv_bfloat16>();
      break;
  }
}

// The tensor-core kernels: fn.template operator()<T, D>() for float16/bfloat16 and a padded head dim D in
// {32, 64, 128, 256}; false (and no call) for anything else.
template <typename Fn>
bool with_tensor_core_config(DType dtype, int padded_head_dim, Fn&& fn) {
  if (dtype == DType::kFloat32) return false;
  if (padded_head_dim != 32 && padded_head_dim != 64 && padded_head_dim != 128 && padded_head_dim != 256) {
    return false;
  }
  auto by_head_dim = [&]<typename T>() {
    switch (padded_head_dim) {
      case 32:
        fn.template operator()<T, 32>();
        break;
      case 64:
        fn.template operator()<T, 64>();
        break;
      case 128:
        fn.template operator()<T, 128>();
        break;
      default:
        fn.template operator()<T, 256>();
        break;
    }
  };
  if (dtype == DType::kFloat16) {
    by_head_dim.template operator()<__half>();
  } else {
    by_head_dim.template operator()<__nv_bfloat16>();
  }
  return true;
}

// The SIMT kernels: fn.template operator()<T, D>() for every dtype and the head-dim group D (64, 128 or
// 256) of max_head_dim; false (and no call) above 256.
template <typename Fn>
bool with_simt_config(DType dtype, int max_head_dim, Fn&& fn) {
  if (max_head_dim > 256) return false;
  with_dtype(dtype, [&]<typename T>() {
    if (max_head_dim <= 64) {
      fn.template operator()<T, 64>();
    } else if (max_head_dim <= 128) {
      fn.template operator()<T, 128>();
    } else {
      fn.template operator()<T, 256>();
    }
  });
  return true;
}

// Block sizes of the small kernels (finish_kernels.cuh).
constexpr int kCombineThreads = 64;
inline int rotate_back_threads(int head_dim) { return head_dim >= 128 ? 128 : 64; }

}  // namespace perceiver_kernels
