// A CPU emulation of the CUDA execution model, just wide enough for the CUDA backend's kernels: the SIMT
// ones (csrc/simt_kernels.cuh), the tensor-core ones (csrc/attention_fwd.cuh, attention_bwd.cuh) and the
// small kernels around them (csrc/finish_kernels.cuh). Every thread is a fiber (ucontext) with its own
// threadIdx; fibers switch only at barriers: __syncthreads, __syncwarp, and the warp-collective operations
// built on warp barriers (shuffles; mma.sync.m16n8k16 and ldmatrix.x2.trans, emulated from their PTX
// fragment definitions).
//
// What it checks that a reading cannot: fragment layouts, indexing, masks, tile ranges, barriers and
// cp.async waits. A launch's schedule comes from its seed (Schedule::from_seed), so that different seeds
// expose different hazards:
// - Order: CTAs, warps and the threads of a warp run in a seeded random order (seed 0: in order), so a
//   shared-memory race between threads of a phase changes the results from one seed to the next.
// - Skew: warps run in lockstep (one stretch between warp barriers each), or each warp runs ahead to its
//   next __syncthreads before the next warp starts, the two extremes of real warp scheduling.
// - cp.async: copies land at the wait_group that must wait for them (the latest the PTX allows: catches
//   reads before the wait), at issue (the earliest: catches a prefetch overwriting a buffer others still
//   read), or at a random barrier in between. Misaligned 16-byte copies raise.
// - Barrier identity: every barrier records its call site; threads of a CTA at different __syncthreads
//   (or lanes of a warp at different warp-collective calls), a thread that exits while others wait at a
//   __syncthreads, or a barrier some thread never reaches, raise an error naming the lines.
// - Shared memory: filled with NaN bit patterns before each CTA (nothing reads what it did not write) and
//   guarded by a canary past the kernel's declared size (no out-of-range writes). Launch limits (grid,
//   block size, shared memory per CTA) are checked.
//
// Not emulated: the GPU's float rounding (--use_fast_math), the memory model beyond barrier order, lost
// updates of non-atomic read-modify-writes (stretches between barriers never interleave), timing. Those are
// the GPU run's job (tests/test_cuda_backend.py, compute-sanitizer).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <ucontext.h>

#include <algorithm>
#include <array>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <source_location>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

// Device-side integer min/max, as CUDA provides them unqualified.
using std::max;
using std::min;

namespace emulator {

// How one launch is scheduled, drawn from its seed.
struct Schedule {
  enum class Copies { kAtWait, kAtIssue, kAtRandomBarrier };
  Copies copies = Copies::kAtWait;
  bool run_ahead = false;  // warps run to their next __syncthreads one after another (else in lockstep)
  bool shuffle = false;    // CTAs, warps and threads in a random order (else in index order)
  std::mt19937_64 rng;

  static Schedule from_seed(uint64_t seed) {
    Schedule s;
    s.copies = static_cast<Copies>(seed % 3);
    s.run_ahead = (seed / 3) % 2 == 1;
    s.shuffle = seed != 0;
    s.rng.seed(seed);
    return s;
  }
};

// A kernel's dynamic shared memory: the emulator's buffer for it and the bytes the launch asks for.
struct SharedMemory {
  void* base = nullptr;
  size_t capacity = 0;
  size_t bytes = 0;
};

constexpr size_t kMaxSharedMemoryPerBlock = 232448;  // the largest opt-in of the GPUs built for (H100)
constexpr unsigned char kCanary = 0xA5;

struct Site {
  const char* file = "";
  int line = 0;
  bool operator==(const Site& other) const { return line == other.line && std::strcmp(file, other.file) == 0; }
  std::string str() const { return std::string(file) + ":" + std::to_string(line); }
};

inline Site site_of(const std::source_location& where) {
  return {where.file_name(), static_cast<int>(where.line())};
}

struct Fiber {
  enum class State { kReady, kAtBlockBarrier, kAtWarpBarrier, kDone };
  ucontext_t context;
  std::vector<char> stack;
  State state = State::kReady;
  uint3 thread;
  Site site;  // where this fiber waits
  struct Copy {
    void* dst;
    const void* src;
    bool valid;
  };
  std::vector<Copy> open_group;           // cp.async copies not yet committed
  std::vector<std::vector<Copy>> groups;  // committed groups, oldest first, not landed yet
};

// The CTA being run: its fibers, the scheduler's context, the mailboxes of warp-collective operations.
struct Block {
  std::vector<Fiber> fibers;
  ucontext_t scheduler;
  int current = 0;
  uint3 index;
  dim3 dim;
  std::vector<float> mailbox;                      // shuffles: one float per thread
  std::vector<const void*> pointers;               // ldmatrix row addresses, one per thread
  std::vector<std::array<uint32_t, 6>> fragments;  // mma.sync A (4) and B (2) registers, one set per thread
  const std::function<void()>* body = nullptr;
  Schedule* schedule = nullptr;
};

inline Block& block() {
  static Block instance;
  return instance;
}

inline const uint3& thread_index() { return block().fibers[block().current].thread; }
inline const uint3& block_index() { return block().index; }
inline const dim3& block_dim() { return block().dim; }

[[noreturn]] inline void fail(const std::string& what) {
  const Block& b = block();
  throw std::runtime_error("emulator: " + what + " (CTA " + std::to_string(b.index.x) + ", " +
                           std::to_string(b.index.y) + ", " + std::to_string(b.index.z) + ")");
}

inline void land(const std::vector<Fiber::Copy>& group) {
  for (const Fiber::Copy& c : group) {
    if (c.valid) {
      std::memcpy(c.dst, c.src, 16);
    } else {
      std::memset(c.dst, 0, 16);
    }
  }
}

inline void wait(Fiber::State state, Site site) {
  Block& b = block();
  Fiber& fiber = b.fibers[b.current];
  if (b.schedule->copies == Schedule::Copies::kAtRandomBarrier && !fiber.groups.empty()) {
    // Some prefix of the committed groups lands now (any time between issue and wait is legal).
    const size_t landed = std::uniform_int_distribution<size_t>(0, fiber.groups.size())(b.schedule->rng);
    for (size_t g = 0; g < landed; ++g) land(fiber.groups[g]);
    fiber.groups.erase(fiber.groups.begin(), fiber.groups.begin() + static_cast<std::ptrdiff_t>(landed));
  }
  fiber.state = state;
  fiber.site = site;
  swapcontext(&fiber.context, &b.scheduler);
}

inline void trampoline() {
  Block& b = block();
  (*b.body)();
  b.fibers[b.current].state = Fiber::State::kDone;
  swapcontext(&b.fibers[b.current].context, &b.scheduler);
}

// Every fiber of [first, last) in `state` waits at one site, or the barrier is divergent.
inline void check_one_site(const Block& b, size_t first, size_t last, Fiber::State state, const char* what) {
  const Fiber* reference = nullptr;
  for (size_t i = first; i < last; ++i) {
    const Fiber& f = b.fibers[i];
    if (f.state != state) continue;
    if (reference == nullptr) reference = &f;
    if (!(f.site == reference->site)) {
      fail(std::string("divergent ") + what + ": threads wait at " + reference->site.str() + " and " + f.site.str());
    }
  }
}

// Releases warp w from a complete warp barrier (all 32 lanes wait at one warp-collective call).
inline bool release_warp(Block& b, size_t w) {
  const size_t first = w * 32, last = std::min(b.fibers.size(), first + 32);
  size_t waiting = 0, done = 0;
  for (size_t i = first; i < last; ++i) {
    waiting += b.fibers[i].state == Fiber::State::kAtWarpBarrier;
    done += b.fibers[i].state == Fiber::State::kDone;
  }
  if (waiting == 0) return false;
  if (done > 0) fail("a warp-collective operation (full mask) in a warp some of whose lanes have exited");
  if (waiting < last - first) return false;
  check_one_site(b, first, last, Fiber::State::kAtWarpBarrier, "warp-collective calls");
  for (size_t i = first; i < last; ++i) b.fibers[i].state = Fiber::State::kReady;
  return true;
}

// Releases a complete __syncthreads: every thread waits at one; none has exited.
inline bool release_block(Block& b) {
  size_t waiting = 0, done = 0;
  for (const Fiber& f : b.fibers) {
    waiting += f.state == Fiber::State::kAtBlockBarrier;
    done += f.state == Fiber::State::kDone;
  }
  if (waiting == 0 || waiting + done < b.fibers.size()) return false;
  if (done > 0) fail("a thread exited while others wait at a __syncthreads");
  check_one_site(b, 0, b.fibers.size(), Fiber::State::kAtBlockBarrier, "__syncthreads");
  for (Fiber& f : b.fibers) f.state = Fiber::State::kReady;
  return true;
}

// Runs every ready fiber of warp w once, in the schedule's order; whether any ran.
inline bool run_warp(Block& b, size_t w, std::vector<int>& lanes) {
  const size_t first = w * 32, count = std::min<size_t>(32, b.fibers.size() - first);
  lanes.resize(count);
  std::iota(lanes.begin(), lanes.end(), static_cast<int>(first));
  if (b.schedule->shuffle) std::shuffle(lanes.begin(), lanes.end(), b.schedule->rng);
  bool ran = false;
  for (int t : lanes) {
    if (b.fibers[t].state != Fiber::State::kReady) continue;
    b.current = t;
    swapcontext(&b.scheduler, &b.fibers[t].context);
    ran = true;
  }
  return ran;
}

// Runs `body` as one CTA of `dim` threads.
inline void run_block(uint3 index, dim3 dim, const std::function<void()>& body, Schedule& schedule,
                      const SharedMemory& shared) {
  constexpr size_t kStackBytes = 256 * 1024;
  Block& b = block();
  const int threads = static_cast<int>(dim.x * dim.y * dim.z);
  b.index = index;
  b.dim = dim;
  b.body = &body;
  b.schedule = &schedule;
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
  if (shared.base != nullptr) {  // NaN bit patterns where the CTA may read, a canary past its size
    std::memset(shared.base, 0xFF, shared.bytes);
    std::memset(static_cast<char*>(shared.base) + shared.bytes, kCanary, shared.capacity - shared.bytes);
  }

  const size_t warps = (b.fibers.size() + 31) / 32;
  std::vector<size_t> warp_order(warps);
  std::iota(warp_order.begin(), warp_order.end(), 0);
  std::vector<int> lanes;
  while (true) {
    if (schedule.shuffle) std::shuffle(warp_order.begin(), warp_order.end(), schedule.rng);
    bool progressed = false;
    for (size_t w : warp_order) {
      if (schedule.run_ahead) {  // this warp until it waits at a __syncthreads (or is done)
        while (true) {
          const bool ran = run_warp(b, w, lanes);
          const bool released = release_warp(b, w);
          progressed = progressed || ran || released;
          if (!ran && !released) break;
        }
      } else {
        progressed = run_warp(b, w, lanes) || progressed;
      }
    }
    if (!schedule.run_ahead) {
      for (size_t w = 0; w < warps; ++w) progressed = release_warp(b, w) || progressed;
    }
    if (std::all_of(b.fibers.begin(), b.fibers.end(), [](const Fiber& f) { return f.state == Fiber::State::kDone; })) {
      break;
    }
    if (release_block(b)) continue;
    if (!progressed) fail("deadlock: a barrier that not every live thread (or warp lane) reaches");
  }
  if (shared.base != nullptr) {
    const auto* guard = static_cast<const unsigned char*>(shared.base) + shared.bytes;
    for (size_t i = 0; i < shared.capacity - shared.bytes; ++i) {
      if (guard[i] != kCanary) {
        fail("a write past the kernel's dynamic shared memory (" + std::to_string(shared.bytes) + " bytes)");
      }
    }
  }
}

// kernel<<<grid, threads, shared.bytes>>>, every CTA, under the schedule of `seed`.
inline void launch(dim3 grid, dim3 threads, const std::function<void()>& body, uint64_t seed,
                   const SharedMemory& shared = {}) {
  if (grid.x > 0x7fffffffu || grid.y > 65535 || grid.z > 65535) throw std::runtime_error("emulator: grid too large");
  if (threads.x * threads.y * threads.z > 1024) throw std::runtime_error("emulator: more than 1024 threads per CTA");
  if (shared.bytes > kMaxSharedMemoryPerBlock || shared.bytes > shared.capacity) {
    throw std::runtime_error("emulator: " + std::to_string(shared.bytes) + " bytes of shared memory per CTA");
  }
  Schedule schedule = Schedule::from_seed(seed);
  std::vector<uint3> ctas;
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) ctas.push_back(uint3{x, y, z});
    }
  }
  if (schedule.shuffle) std::shuffle(ctas.begin(), ctas.end(), schedule.rng);
  for (const uint3& cta : ctas) run_block(cta, threads, body, schedule, shared);
}

// -- Warp-collective operations and cp.async ------------------------------------------------------------

inline float shfl_xor(Site site, float value, int lane_mask) {
  Block& b = block();
  const int me = b.current;
  b.mailbox[me] = value;
  wait(Fiber::State::kAtWarpBarrier, site);
  const float other = b.mailbox[(me & ~31) | ((me & 31) ^ lane_mask)];
  wait(Fiber::State::kAtWarpBarrier, {site.file, -site.line});  // nobody overwrites a mailbox before all read
  return other;
}

// cp.async.cg.shared.global [dst], [src], 16, (valid ? 16 : 0).
inline void cp_async_16(void* dst, const void* src, bool valid) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || (valid && reinterpret_cast<uintptr_t>(src) % 16 != 0)) {
    fail("cp.async of 16 bytes between addresses that are not 16-byte aligned");
  }
  Block& b = block();
  if (b.schedule->copies == Schedule::Copies::kAtIssue) {
    land({{dst, src, valid}});
  } else {
    b.fibers[b.current].open_group.push_back({dst, src, valid});
  }
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
    land(f.groups.front());
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
// matrix m (8 consecutive 16-bit elements, 16-byte aligned); lane i receives, in register m, the elements
// (row 2 (i % 4), column i / 4) and (row 2 (i % 4) + 1, column i / 4), the first in the low half.
inline void ldmatrix_x2_trans(uint32_t (&frag)[2], const void* row_address, Site site) {
  if (reinterpret_cast<uintptr_t>(row_address) % 16 != 0) fail("ldmatrix row address not 16-byte aligned");
  Block& b = block();
  const int me = b.current, lane = me & 31, warp = me & ~31;
  b.pointers[me] = row_address;
  wait(Fiber::State::kAtWarpBarrier, site);
  for (int m = 0; m < 2; ++m) {
    const auto* first = static_cast<const uint16_t*>(b.pointers[warp + 8 * m + 2 * (lane % 4)]);
    const auto* second = static_cast<const uint16_t*>(b.pointers[warp + 8 * m + 2 * (lane % 4) + 1]);
    frag[m] = static_cast<uint32_t>(first[lane / 4]) | (static_cast<uint32_t>(second[lane / 4]) << 16);
  }
  wait(Fiber::State::kAtWarpBarrier, {site.file, -site.line});
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: C (16x8, float32) += A (16x16) B (16x8), every lane
// holding its fragments (g = lane / 4, t = lane % 4; a register's low half is the lower column):
//   A: a0 = (g, 2t..2t+1), a1 = (g+8, 2t..), a2 = (g, 2t+8..), a3 = (g+8, 2t+8..)
//   B: b0 = (k 2t..2t+1, n g), b1 = (k 2t+8..2t+9, n g)
//   C: c0, c1 = (g, 2t..2t+1), c2, c3 = (g+8, 2t..2t+1)
template <typename T>
void mma_m16n8k16(float (&c)[4], const uint32_t (&a)[4], const uint32_t (&b_frag)[2], Site site) {
  Block& b = block();
  const int me = b.current, lane = me & 31, warp = me & ~31;
  b.fragments[me] = {a[0], a[1], a[2], a[3], b_frag[0], b_frag[1]};
  wait(Fiber::State::kAtWarpBarrier, site);
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
  wait(Fiber::State::kAtWarpBarrier, {site.file, -site.line});  // every lane has read the fragments
  for (int e = 0; e < 4; ++e) c[e] = result[e];
}

}  // namespace emulator

// The CUDA builtins the kernels use. __launch_bounds__ is only a hint; the shared-address conversion
// belongs to the inline-PTX forms of cp.async and ldmatrix, which device_utils.cuh replaces by the
// emulator's under PERCEIVER_KERNELS_EMULATION.
#define PERCEIVER_KERNELS_EMULATION 1
#ifndef __launch_bounds__
#define __launch_bounds__(...)
#endif
inline size_t __cvta_generic_to_shared(const void*) { throw std::logic_error("emulator: no shared-space addresses"); }

#define threadIdx (::emulator::thread_index())
#define blockIdx (::emulator::block_index())
#define blockDim (::emulator::block_dim())
#define __syncthreads() ::emulator::wait(::emulator::Fiber::State::kAtBlockBarrier, {__FILE__, __LINE__})
#define __syncwarp(...) ::emulator::wait(::emulator::Fiber::State::kAtWarpBarrier, {__FILE__, __LINE__})
#define __shfl_xor_sync(mask, value, lane_mask) ::emulator::shfl_xor({__FILE__, __LINE__}, value, lane_mask)

inline float atomicAdd(float* address, float value) {  // fibers never interleave inside a call
  const float old = *address;
  *address = old + value;
  return old;
}
