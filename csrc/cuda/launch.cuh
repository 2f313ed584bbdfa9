// Launch-shape helpers shared by the CUDA GEMV kernels: the split-K plan, the zeroed scratch the
// in-launch split-K reductions use, and the last-block handshake.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <map>
#include <mutex>
#include <utility>

#include "runtime.cuh"

namespace qsk::cuda {

// Blocks of the GEMV kernels. They are declared __launch_bounds__(kGemvThreads, kBlocksPerSm): with
// the thread count alone, ptxas for sm_80 capped the registers at 48-64 and spilled (issue 18;
// tests/test_cuda_ptxas.py checks that nothing spills); with a minimum of 2 blocks it may use up to
// 128, and two blocks always fit on an SM (shared memory stays under 114 KB per block).
constexpr int kGemvThreads = 256;
constexpr int kBlocksPerSm = 2;
// The block's threads form kRowGroups groups; group g multiplies the split's kept rows g, g + 4, ...
// over the same outputs, and the groups' sums are added in shared memory (in group order) before
// the block publishes them. A block thus covers a quarter of the outputs it would cover alone, so a
// launch has 4x the tiles and a quarter of the split-K partials to reduce.
constexpr int kRowGroups = 4;
constexpr int kGroupThreads = kGemvThreads / kRowGroups;
constexpr int64_t kMaxSplitRows = 512;  // kept rows per split-K block (their indices live in smem)
// Kept rows per split at least: every block re-derives its row's kept set before reading weights,
// so a split must carry enough weight rows to hide that prologue.
constexpr int64_t kMinSplitRows = 32;

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Split-K plan: one wave of blocks (kBlocksPerSm per SM; a second wave would pay the selection
// prologue again), each over a multiple of 4 kept rows.
struct SplitPlan {
  int64_t splits, rows_per_split;
};

inline SplitPlan plan_splits(int64_t kept, int64_t tiles, int64_t M) {
  if (kept <= 0) return {1, 4};
  const int64_t slots = kBlocksPerSm * static_cast<int64_t>(sm_count());
  int64_t splits = std::max<int64_t>(1, slots / std::max<int64_t>(1, tiles * M));
  splits = std::min(splits, std::max<int64_t>(1, ceil_div(kept, kMinSplitRows)));
  int64_t rows = ceil_div(kept, splits);
  rows = std::min(ceil_div(rows, 4) * 4, kMaxSplitRows);
  splits = std::max<int64_t>(1, ceil_div(kept, rows));
  return {splits, rows};
}

// Zero-filled int32 scratch of at least n elements for the current device and stream, kept between
// calls: the kernels that use it leave it zero again (each counter and accumulator is reset by the
// block that consumes it), so no call needs a memset launch. One buffer per stream, so calls on
// different streams never share one.
inline int32_t* zeroed_scratch(int64_t n, const at::Tensor& like) {
  static std::mutex mu;
  static std::map<std::pair<int64_t, uintptr_t>, at::Tensor> bufs;
  const std::lock_guard<std::mutex> lock(mu);
  const auto key = std::make_pair(static_cast<int64_t>(like.device().index()), stream_id(current_stream()));
  at::Tensor& t = bufs[key];
  if (!t.defined() || t.numel() < n) t = at::zeros({std::max<int64_t>(n, 1024)}, like.options().dtype(at::kInt));
  return t.data_ptr<int32_t>();
}

// The block's row-group sums: groups 1.. publish acc (N values per thread) into buf, shared memory
// of at least (kRowGroups - 1) * kGroupThreads * N values that is free for this use, and group 0
// adds them in group order. Every thread of the block calls it; true in group 0's threads, which
// then hold the block's sums.
template <typename A, int N>
__device__ __forceinline__ bool sum_row_groups(A (&acc)[N], A* buf) {
  const int g = threadIdx.x / kGroupThreads, lane = threadIdx.x % kGroupThreads;
  if (g > 0) {
#pragma unroll
    for (int i = 0; i < N; ++i) buf[((g - 1) * kGroupThreads + lane) * N + i] = acc[i];
  }
  __syncthreads();
  if (g > 0) return false;
  for (int gg = 0; gg < kRowGroups - 1; ++gg) {
#pragma unroll
    for (int i = 0; i < N; ++i) acc[i] += buf[(gg * kGroupThreads + lane) * N + i];
  }
  return true;
}

// The split-K handshake, called by every thread of a block after it published its partial
// results: true in the block that arrives last at `counter` (which is reset to 0 for the next
// call). Its threads may then read every other block's partials (with __ldcg / atomics: past L1).
__device__ __forceinline__ bool arrive_last(int* counter, int expected, int* s_flag) {
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const bool last = atomicAdd(counter, 1) == expected - 1;
    if (last) atomicExch(counter, 0);
    *s_flag = last;
  }
  __syncthreads();
  const bool last = *s_flag != 0;
  if (last) __threadfence();
  return last;
}

}  // namespace qsk::cuda
