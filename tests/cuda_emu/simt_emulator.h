// A SIMT emulator for the subset of CUDA that csrc/cuda uses, so that its kernels run on the host
// (csrc/cuda/runtime.cuh with QSK_CUDA_EMULATION). Each CUDA thread of a block is a fiber
// (ucontext) on the calling OS thread, run round-robin until it waits at a barrier or exits;
// blocks run one after another, so `__shared__` (a function-local static here) is per block.
// Barriers, warp shuffles, shared-memory atomics and the integer/float intrinsics behave as the
// CUDA documentation specifies; a barrier that not every live thread reaches is reported as a
// deadlock (an exception) instead of hanging. Under ASan the fiber switches are annotated.
// cub's BlockScan / BlockReduce are stand-ins with cub's contract: the caller must
// __syncthreads() before reusing their TempStorage, and BlockReduce's result is defined in
// thread 0 only (others get a poison value).
// Not emulated: warp-level lockstep (code relying on implicit warp synchrony would fail here,
// which is intended), memory-ordering subtleties beyond what barriers order, timing.
#pragma once

#if defined(__SANITIZE_ADDRESS__)
#include <sanitizer/common_interface_defs.h>
#endif

#include <sys/mman.h>
#include <ucontext.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <stdexcept>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(16) uint4 {
  unsigned int x, y, z, w;
};

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

namespace simt {

constexpr int kWarp = 32;
constexpr size_t kStackBytes = 256 * 1024;  // per CUDA thread (ASan's frames are large)

struct Run;
inline thread_local Run* tl_run = nullptr;  // the block being run on this OS thread
inline thread_local int tl_linear_tid = 0;  // the CUDA thread being run (threadIdx, linearized)
void yield_to_scheduler();
[[noreturn]] void throw_deadlock(const char* what);

// A barrier over the live threads of a group (block or warp); a thread that exits drops out, as
// on the GPU. Arrivals and releases count as progress for the scheduler's deadlock check.
struct Barrier {
  int live = 0, arrived = 0;
  uint64_t gen = 0;
  void wait(const char* what);
  void drop();
};

// The state of one block: its threads are fibers run round-robin on the calling OS thread; a
// fiber runs until it waits at a barrier or exits.
struct Run {
  std::function<void()> body;
  int threads = 0, current = 0;
  dim3 block;
  std::vector<ucontext_t> ctx;
  std::vector<char> done;
  ucontext_t scheduler{};
  Barrier sync;
  std::vector<Barrier> warp;
  std::vector<uint64_t> slot;  // shuffle exchange, one per thread
  uint64_t progress = 0;
  bool deadlock = false;
  std::string deadlock_at;
  std::exception_ptr err;
  // ASan's view of the stacks being switched (the fiber annotations keep it from misreporting).
  const void* sched_stack = nullptr;
  size_t sched_stack_size = 0;
};

#if defined(__SANITIZE_ADDRESS__)
inline void asan_start_switch(void** fake, const void* bottom, size_t size) {
  __sanitizer_start_switch_fiber(fake, bottom, size);
}
inline void asan_finish_switch(void* fake, const void** bottom, size_t* size) {
  __sanitizer_finish_switch_fiber(fake, bottom, size);
}
#else
inline void asan_start_switch(void**, const void*, size_t) {}
inline void asan_finish_switch(void*, const void**, size_t*) {}
#endif

// Fiber stacks, reused across blocks and launches; the lowest page of each is a guard page.
inline char* fiber_stack(int t) {
  static thread_local std::vector<char*> stacks;
  while (static_cast<int>(stacks.size()) <= t) {
    void* p = mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED) throw std::runtime_error("simt: cannot map a fiber stack");
    mprotect(p, 4096, PROT_NONE);
    stacks.push_back(static_cast<char*>(p));
  }
  return stacks[t];
}

inline void set_thread_index(Run& r, int t) {
  tl_linear_tid = t;
  threadIdx = dim3(t % r.block.x, (t / r.block.x) % r.block.y, t / (r.block.x * r.block.y));
}

inline void yield_to_scheduler() {
  Run& r = *tl_run;
  const int t = r.current;
  void* fake = nullptr;
  asan_start_switch(&fake, r.sched_stack, r.sched_stack_size);
  swapcontext(&r.ctx[t], &r.scheduler);
  asan_finish_switch(fake, &r.sched_stack, &r.sched_stack_size);
}

[[noreturn]] inline void throw_deadlock(const char* what) {
  throw std::runtime_error(std::string("simt: deadlock: ") + what + " is waited on by threads that cannot all reach it" +
                           (tl_run->deadlock_at.empty() ? "" : " (" + tl_run->deadlock_at + ")"));
}

inline void Barrier::wait(const char* what) {
  Run& r = *tl_run;
  if (r.deadlock) throw_deadlock(what);
  const uint64_t g = gen;
  ++r.progress;
  if (++arrived == live) {
    arrived = 0;
    ++gen;
    return;
  }
  while (gen == g) {
    yield_to_scheduler();
    if (gen == g && r.deadlock) throw_deadlock(what);
  }
}

inline void Barrier::drop() {
  --live;
  if (arrived > 0 && arrived == live) {
    arrived = 0;
    ++gen;
    ++tl_run->progress;
  }
}

inline void fiber_main() {
  Run& r = *tl_run;
  const int t = r.current;
  asan_finish_switch(nullptr, &r.sched_stack, &r.sched_stack_size);
  try {
    r.body();
  } catch (...) {
    if (!r.err) r.err = std::current_exception();
  }
  r.sync.drop();
  r.warp[t / kWarp].drop();
  r.done[t] = 1;
  asan_start_switch(nullptr, r.sched_stack, r.sched_stack_size);  // this fiber's stack is finished
  swapcontext(&r.ctx[t], &r.scheduler);
}

// Runs every thread of one block to completion; a round in which no thread arrives at or passes
// a barrier means the live threads wait on each other: they are resumed once more and throw.
inline void run_block(Run& r) {
  for (int t = 0; t < r.threads; ++t) {
    r.done[t] = 0;
    getcontext(&r.ctx[t]);
    r.ctx[t].uc_stack.ss_sp = fiber_stack(t);
    r.ctx[t].uc_stack.ss_size = kStackBytes;
    r.ctx[t].uc_link = nullptr;
    makecontext(&r.ctx[t], fiber_main, 0);
  }
  r.sync = Barrier{r.threads};
  r.warp.assign((r.threads + kWarp - 1) / kWarp, Barrier{});
  for (int w = 0; w < static_cast<int>(r.warp.size()); ++w) r.warp[w].live = std::min(kWarp, r.threads - w * kWarp);
  int remaining = r.threads;
  while (remaining > 0) {
    const uint64_t before = r.progress;
    for (int t = 0; t < r.threads; ++t) {
      if (r.done[t]) continue;
      r.current = t;
      set_thread_index(r, t);
      void* fake = nullptr;
      asan_start_switch(&fake, fiber_stack(t), kStackBytes);
      swapcontext(&r.scheduler, &r.ctx[t]);
      asan_finish_switch(fake, nullptr, nullptr);
      if (r.done[t]) --remaining, ++r.progress;
    }
    if (remaining > 0 && r.progress == before) {
      r.deadlock = true;
      r.deadlock_at = "block (" + std::to_string(blockIdx.x) + ", " + std::to_string(blockIdx.y) + ", " +
                      std::to_string(blockIdx.z) + "), " + std::to_string(remaining) + " live threads";
    }
  }
}

inline int& sm_count_setting() {
  static int n = 132;  // an H100 / H200; tests change it to exercise other split-K plans
  return n;
}
inline int sm_count() { return sm_count_setting(); }

// Kernel launches since the library was loaded (tests assert how many one op call makes).
inline uint64_t& launch_count() {
  static uint64_t n = 0;
  return n;
}

inline void check_launch(dim3 grid, dim3 block) {
  const uint64_t threads = uint64_t(block.x) * block.y * block.z;
  if (threads == 0 || threads > 1024 || block.z > 64)
    throw std::runtime_error("simt: invalid launch: " + std::to_string(threads) + " threads per block");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || grid.y > 65535 || grid.z > 65535 || grid.x > 2147483647u)
    throw std::runtime_error("simt: invalid launch: grid (" + std::to_string(grid.x) + ", " + std::to_string(grid.y) +
                             ", " + std::to_string(grid.z) + ")");
}

// kernel<<<grid, block>>>(args...): the arguments are converted to the kernel's parameter types
// once, as a launch does; blocks run one after another, each thread calling the kernel.
template <class... P, class... A>
void run_grid(void (*kernel)(P...), dim3 grid, dim3 block, A&&... args) {
  static_assert(sizeof...(P) == sizeof...(A), "simt: kernel argument count");
  check_launch(grid, block);
  ++launch_count();
  if (tl_run) throw std::runtime_error("simt: a kernel launched from inside a kernel");
  const std::tuple<std::decay_t<P>...> params(static_cast<std::decay_t<P>>(std::forward<A>(args))...);
  Run r;
  r.body = [&] { std::apply(kernel, params); };
  r.block = block;
  r.threads = static_cast<int>(block.x * block.y * block.z);
  r.ctx.resize(r.threads);
  r.done.resize(r.threads);
  r.slot.resize(r.threads);
  tl_run = &r;
  blockDim = block;
  gridDim = grid;
  for (unsigned int z = 0; z < grid.z && !r.err; ++z)
    for (unsigned int y = 0; y < grid.y && !r.err; ++y)
      for (unsigned int x = 0; x < grid.x && !r.err; ++x) {
        blockIdx = dim3(x, y, z);
        run_block(r);
      }
  tl_run = nullptr;
  if (r.err) std::rethrow_exception(r.err);
}

}  // namespace simt

inline void __syncthreads() { simt::tl_run->sync.wait("__syncthreads"); }

template <class T>
T __shfl_xor_sync(unsigned int mask, T v, int lane_mask) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable_v<T>);
  simt::Run& r = *simt::tl_run;
  const int t = simt::tl_linear_tid, lane = t % simt::kWarp, base = t - lane;
  simt::Barrier& w = r.warp[t / simt::kWarp];
  if (mask != 0xffffffffu) throw std::runtime_error("simt: only full-warp shuffles are emulated");
  if (w.live != simt::kWarp) throw std::runtime_error("simt: full-mask shuffle in a warp with exited or missing lanes");
  std::memcpy(&r.slot[t], &v, sizeof(T));
  w.wait("__shfl_xor_sync");
  T out;
  std::memcpy(&out, &r.slot[base + (lane ^ (lane_mask & (simt::kWarp - 1)))], sizeof(T));
  w.wait("__shfl_xor_sync");
  return out;
}

inline unsigned int atomicAdd(unsigned int* p, unsigned int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline int atomicAdd(int* p, int v) { return __atomic_fetch_add(p, v, __ATOMIC_RELAXED); }
inline unsigned int atomicMax(unsigned int* p, unsigned int v) {
  unsigned int cur = __atomic_load_n(p, __ATOMIC_RELAXED);
  while (cur < v && !__atomic_compare_exchange_n(p, &cur, v, true, __ATOMIC_RELAXED, __ATOMIC_RELAXED)) {
  }
  return cur;
}

inline int atomicExch(int* p, int v) { return __atomic_exchange_n(p, v, __ATOMIC_RELAXED); }
// Blocks run one after another here, so every earlier block's writes are visible: a fence orders
// nothing more, and a load past L1 is a load.
inline void __threadfence() {}
template <class T>
T __ldcg(const T* p) {
  return *p;
}

inline unsigned int __float_as_uint(float f) {
  unsigned int u;
  std::memcpy(&u, &f, 4);
  return u;
}
inline float __uint_as_float(unsigned int u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float __int_as_float(int i) { return __uint_as_float(static_cast<unsigned int>(i)); }
// IEEE round-to-nearest-even operations (the host build has -ffp-contract=off: no hidden FMA).
inline float __frcp_rn(float a) { return 1.0f / a; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fdiv_rn(float a, float b) { return a / b; }

// Byte n of the result is byte (s >> 4n) & 7 of the 8-byte value {y, x}; the sign-replicate mode
// (selector bit 3) is not used by the kernels and is rejected.
inline unsigned int __byte_perm(unsigned int x, unsigned int y, unsigned int s) {
  const uint64_t src = (static_cast<uint64_t>(y) << 32) | x;
  unsigned int r = 0;
  for (int n = 0; n < 4; ++n) {
    const unsigned int sel = (s >> (4 * n)) & 0xfu;
    if (sel & 8u) throw std::runtime_error("simt: __byte_perm sign-replicate selectors are not emulated");
    r |= static_cast<unsigned int>((src >> (8 * sel)) & 0xffu) << (8 * n);
  }
  return r;
}

// c + the dot product of the four signed bytes of a and b.
inline int __dp4a(int a, int b, int c) {
  for (int n = 0; n < 4; ++n)
    c += static_cast<int>(static_cast<int8_t>(a >> (8 * n))) * static_cast<int>(static_cast<int8_t>(b >> (8 * n)));
  return c;
}

namespace qsk::cuda {  // CUDA's overloaded device min / max, where the kernels look them up
template <class T>
inline T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
inline T max(T a, T b) {
  return a < b ? b : a;
}
}  // namespace qsk::cuda

namespace cub {

// What BlockScan and BlockReduce share: every thread publishes its value in the TempStorage and
// waits at a barrier; the collective then reads them all (no trailing barrier, as in cub).
template <class T, int THREADS>
class BlockCollective {
 public:
  struct TempStorage {
    T v[THREADS];
  };
  explicit BlockCollective(TempStorage& s) : s_(s) {}

 protected:
  const T* publish(T in) {
    if (int(blockDim.x * blockDim.y * blockDim.z) != THREADS)
      throw std::runtime_error("simt: a cub block collective used with another block size");
    s_.v[simt::tl_linear_tid] = in;
    __syncthreads();
    return s_.v;
  }

 private:
  TempStorage& s_;
};

template <class T, int THREADS>
class BlockScan : public BlockCollective<T, THREADS> {
 public:
  using BlockCollective<T, THREADS>::BlockCollective;
  void ExclusiveSum(T in, T& out, T& aggregate) {
    const T* v = this->publish(in);
    T before = T(0), all = T(0);
    for (int i = 0; i < THREADS; ++i) {
      if (i < simt::tl_linear_tid) before += v[i];
      all += v[i];
    }
    out = before;
    aggregate = all;
  }
};

template <class T, int THREADS>
class BlockReduce : public BlockCollective<T, THREADS> {
 public:
  using BlockCollective<T, THREADS>::BlockCollective;
  T Sum(T in) {
    const T* v = this->publish(in);
    if (simt::tl_linear_tid != 0) return T(0x5eed);  // undefined outside thread 0 in cub
    T all = T(0);
    for (int i = 0; i < THREADS; ++i) all += v[i];
    return all;
  }
};

}  // namespace cub
