// A CPU emulation of the CUDA execution model, just wide enough for the CUDA backend's kernels: the SIMT
// ones (csrc/simt_kernels.cuh), the tensor-core ones (csrc/attention_fwd.cuh, attention_bwd.cuh) and the
// small kernels after them (csrc/finish_kernels.cuh). CTAs run one after another; inside a CTA every
// thread is a fiber (ucontext) with its own threadIdx, and the fibers switch only at barriers:
// __syncthreads, __syncwarp, and the warp-collective operations built on warp barriers (shuffles,
// mma.sync.m16n8k16 and ldmatrix, emulated from their PTX fragment definitions). cp.async copies are queued
// per thread and land only at the cp.async.wait_group that must wait for them, the latest the PTX allows,
// so a tile read before its wait reads stale data.
//
// What it checks that a reading cannot: indexing, masks, tile ranges, the placement of barriers. Every
// barrier records the source line it is called from: threads of one CTA waiting at different
// __syncthreads (or lanes of one warp at different warp barriers), or a barrier that some live thread never
// reaches, raise an error naming the lines: the divergent barriers a GPU would hang on or silently
// miscompute. Between barriers the fibers run in an order drawn from `seed` (0: in thread order), so a
// shared-memory race (a thread reading what another writes in the same phase) changes the results from
// one seed to the next.
//
// Not emulated: the tensor-core kernels (inline PTX), the GPU's float rounding of --use_fast_math, memory
// coalescing, timing. Those are the GPU run's job (tests/test_cuda_backend.py, compute-sanitizer).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstring>
#include <type_traits>
#include <cstdint>
#include <functional>
#include <numeric>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

// Device-side integer min/max, as CUDA provides them unqualified.
using std::max;
using std::min;

namespace emulator {

struct Fiber {
  enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };
  ucontext_t context;
  std::vector<char> stack;
  State state = State::kReady;
  uint3 thread;
  int line = 0;  // the source line of the barrier this fiber waits at
  struct Copy {
    void* dst;
    const void* src;
    bool valid;
  };
  std::vector<Copy> open_group;                // cp.async copies not yet committed
  std::vector<std::vector<Copy>> groups;       // committed groups, oldest first, not yet landed
};

// The CTA being run: its fibers, the scheduler's context, the warp-shuffle mailboxes.
struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  uint3 index;
  dim3 dim;
  std::vector<float> mailbox;  // one float per thread
  std::vector<const void*> pointers;           // ldmatrix row addresses, one per thread
  std::vector<std::array<uint32_t, 6>> fragments;  // mma.sync A (4) and B (2) registers, one set per thread
  const std::function<void()>* body = nullptr;
};

inline Block& block() {
  static Block instance;
  return instance;
}

inline const uint3& thread_index() { return block().fibers[block().current].thread; }
inline const uint3& block_index() { return block().index; }
inline const dim3& block_dim() { return block().dim; }

inline void wait(Fiber::State state, int line) {
  Block& b = block();
  Fiber& fiber = b.fibers[b.current];
  fiber.state = state;
  fiber.line = line;
  swapcontext(&fiber.context, &b.scheduler);
}

// Every fiber in [first, last) with state `state` waits at the same line, or a divergent barrier is reported.
inline void check_same_line(const Block& b, size_t first, size_t last, Fiber::State state, const char* what) {
  int line = -1;
  for (size_t i = first; i < last; ++i) {
    const Fiber& f = b.fibers[i];
    if (f.state != state) continue;
    if (line < 0) line = f.line;
    if (f.line != line) {
      throw std::runtime_error(std::string("emulator: divergent ") + what + ": threads of CTA " +
                               std::to_string(b.index.x) + " wait at lines " + std::to_string(line) + " and " +
                               std::to_string(f.line));
    }
  }
}

inline void trampoline() {
  Block& b = block();
  (*b.body)();
  b.fibers[b.current].state = Fiber::State::kDone;
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

// Releases the barrier the blocked fibers wait at, if one is complete; false when none is (a deadlock).
inline bool release(Block& b) {
  bool all_at_block = true;
  for (const Fiber& f : b.fibers) {
    if (f.state != Fiber::State::kDone && f.state != Fiber::State::kAtBlockBarrier) all_at_block = false;
  }
  if (all_at_block) {
    check_same_line(b, 0, b.fibers.size(), Fiber::State::kAtBlockBarrier, "__syncthreads");
    for (Fiber& f : b.fibers) {
      if (f.state == Fiber::State::kAtBlockBarrier) f.state = Fiber::State::kReady;
    }
    return true;
  }
  bool released = false;
  const size_t warps = (b.fibers.size() + 31) / 32;
  for (size_t w = 0; w < warps; ++w) {
    const size_t first = w * 32, last = std::min(b.fibers.size(), first + 32);
    bool complete = true;  // every lane of the warp waits at the warp barrier (full-mask syncs only)
    for (size_t i = first; i < last; ++i) complete = complete && b.fibers[i].state == Fiber::State::kAtWarpBarrier;
    if (!complete) continue;
    check_same_line(b, first, last, Fiber::State::kAtWarpBarrier, "warp barriers");
    for (size_t i = first; i < last; ++i) b.fibers[i].state = Fiber::State::kReady;
    released = true;
  }
  return released;
}

// Runs `body` as one CTA of `threads` threads.
inline void run_block(uint3 index, dim3 dim, const std::function<void()>& body, std::mt19937_64* order_rng) {
  constexpr size_t kStackBytes = 256 * 1024;
  Block& b = block();
  const int threads = static_cast<int>(dim.x * dim.y * dim.z);
  b.index = index;
  b.dim = dim;
  b.body = &body;
  b.fibers.resize(threads);
  b.mailbox.assign(threads, 0.f);
  b.pointers.assign(threads, nullptr);
  b.fragments.assign(threads, {});
  for (int t = 0; t < threads; ++t) {
    Fiber& f = b.fibers[t];
    f.stack.resize(kStackBytes);
    f.state = Fiber::State::kReady;
    f.open_group.clear();
    f.groups.clear();
    f.thread = uint3{static_cast<unsigned>(t % dim.x), static_cast<unsigned>(t / dim.x % dim.y),
                     static_cast<unsigned>(t / (dim.x * dim.y))};
    getcontext(&f.context);
    f.context.uc_stack.ss_sp = f.stack.data();
    f.context.uc_stack.ss_size = f.stack.size();
    f.context.uc_link = nullptr;
    makecontext(&f.context, trampoline, 0);
  }
  std::vector<int> order(threads);
  std::iota(order.begin(), order.end(), 0);
  while (true) {
    if (order_rng != nullptr) std::shuffle(order.begin(), order.end(), *order_rng);
    for (int t : order) {
      if (b.fibers[t].state != Fiber::State::kReady) continue;
      b.current = t;
      swapcontext(&b.scheduler, &b.fibers[t].context);
    }
    const bool done = std::all_of(b.fibers.begin(), b.fibers.end(),
                                  [](const Fiber& f) { return f.state == Fiber::State::kDone; });
    if (done) return;
    if (!release(b)) {
      throw std::runtime_error("emulator: deadlock in CTA (" + std::to_string(index.x) + ", " +
                               std::to_string(index.y) + ", " + std::to_string(index.z) +
                               "): a barrier that not every live thread (or warp lane) reaches");
    }
  }
}

// kernel<<<grid, threads>>>: every CTA in order; seed 0 runs threads in order, otherwise in a random one.
inline void launch(dim3 grid, dim3 threads, const std::function<void()>& body, uint64_t seed) {
  std::mt19937_64 rng(seed);
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) run_block(uint3{x, y, z}, threads, body, seed == 0 ? nullptr : &rng);
    }
  }
}

}  // namespace emulator

// The CUDA builtins the kernels use. (__launch_bounds__ is only a hint; the shared-address conversion is
// for the inline-PTX forms of cp.async/ldmatrix, which device_utils.cuh replaces by the ones above.)
#define PERCEIVER_KERNELS_EMULATION 1
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
inline size_t __cvta_generic_to_shared(const void*) { throw std::logic_error("emulator: no shared-space addresses"); }
#define threadIdx (::emulator::thread_index())
#define blockIdx (::emulator::block_index())
#define blockDim (::emulator::block_dim())

namespace emulator {

inline float shfl_xor(int line, float value, int lane_mask) {
  Block& b = block();
  const int me = b.current;
  b.mailbox[me] = value;
  wait(Fiber::State::kAtWarpBarrier, line);
  const float other = b.mailbox[(me & ~31) | ((me & 31) ^ lane_mask)];
  wait(Fiber::State::kAtWarpBarrier, -line);  // nobody overwrites a mailbox before every lane has read
  return other;
}

// cp.async.cg.shared.global [dst], [src], 16, (valid ? 16 : 0): queued until a wait lands it.
inline void cp_async_16(void* dst, const void* src, bool valid) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0)) {
    throw std::runtime_error("emulator: cp.async of 16 bytes between addresses that are not 16-byte aligned");
  }
  block().fibers[block().current].open_group.push_back({dst, src, valid});
}

inline void cp_async_commit() {
  Fiber& f = block().fibers[block().current];
  f.groups.push_back(std::move(f.open_group));
  f.open_group.clear();
}

// cp.async.wait_group n: every committed group but the n most recent has landed.
inline void cp_async_wait(int n) {
  Fiber& f = block().fibers[block().current];
  while (static_cast<int>(f.groups.size()) > n) {
    for (const Fiber::Copy& c : f.groups.front()) {
      if (c.valid) {
        std::memcpy(c.dst, c.src, 16);
      } else {
        std::memset(c.dst, 0, 16);
      }
    }
    f.groups.erase(f.groups.begin());
  }
}

inline uint16_t low_half(uint32_t r) { return static_cast<uint16_t>(r & 0xffff); }
inline uint16_t high_half(uint32_t r) { return static_cast<uint16_t>(r >> 16); }

template <typename T>
float to_float(uint16_t bits) {
  T value;
  std::memcpy(&value, &bits, sizeof(bits));
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(value);
  } else {
    return __bfloat162float(value);
  }
}

// ldmatrix.sync.aligned.m8n8.x2.trans.shared.b16: lanes 8m..8m+7 give the addresses of rows 0..7 of
// matrix m (8 consecutive 16-bit elements each); lane i receives, in register m, the elements (row
// 2 (i % 4), column i / 4) and (row 2 (i % 4) + 1, column i / 4), the first in the low half.
inline void ldmatrix_x2_trans(uint32_t (&frag)[2], const void* row_address) {
  Block& b = block();
  const int me = b.current, lane = me & 31, warp = me & ~31;
  b.pointers[me] = row_address;
  wait(Fiber::State::kAtWarpBarrier, __LINE__);
  for (int m = 0; m < 2; ++m) {
    const auto* first = static_cast<const uint16_t*>(b.pointers[warp + 8 * m + 2 * (lane % 4)]);
    const auto* second = static_cast<const uint16_t*>(b.pointers[warp + 8 * m + 2 * (lane % 4) + 1]);
    frag[m] = static_cast<uint32_t>(first[lane / 4]) | (static_cast<uint32_t>(second[lane / 4]) << 16);
  }
  wait(Fiber::State::kAtWarpBarrier, -__LINE__);
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: C (16x8, float32) += A (16x16) B (16x8), every lane
// holding its fragments (g = lane / 4, t = lane % 4; a register's low half is the lower column):
//   A: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C: c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
template <typename T>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b_frag)[2]) {
  Block& b = block();
  const int me = b.current, lane = me & 31, warp = me & ~31;
  b.fragments[me] = {a[0], a[1], a[2], a[3], b_frag[0], b_frag[1]};
  wait(Fiber::State::kAtWarpBarrier, __LINE__);
  auto element_a = [&](int row, int k) {
    const uint32_t r = b.fragments[warp + (row % 8) * 4 + (k % 8) / 2][(row >= 8 ? 1 : 0) + (k >= 8 ? 2 : 0)];
    return to_float<T>(k % 2 ? high_half(r) : low_half(r));
  };
  auto element_b = [&](int k, int n) {
    const uint32_t r = b.fragments[warp + n * 4 + (k % 8) / 2][4 + (k >= 8 ? 1 : 0)];
    return to_float<T>(k % 2 ? high_half(r) : low_half(r));
  };
  const int g = lane / 4, t = lane % 4;
  float result[4];
  for (int e = 0; e < 4; ++e) {
    const int row = g + 8 * (e / 2), n = 2 * t + e % 2;
    float sum = c[e];
    for (int k = 0; k < 16; ++k) sum += element_a(row, k) * element_b(k, n);
    result[e] = sum;
  }
  wait(Fiber::State::kAtWarpBarrier, -__LINE__);  // every lane has read the fragments
  for (int e = 0; e < 4; ++e) c[e] = result[e];
}

}  // namespace emulator

#define __syncthreads() ::emulator::wait(::emulator::Fiber::State::kAtBlockBarrier, __LINE__)
#define __syncwarp(...) ::emulator::wait(::emulator::Fiber::State::kAtWarpBarrier, __LINE__)
#define __shfl_xor_sync(mask, value, lane_mask) ::emulator::shfl_xor(__LINE__, value, lane_mask)

inline float atomicAdd(float* address, float value) {  // fibers never interleave inside a call
  const float old = *address;
  *address = old + value;
  return old;
}
