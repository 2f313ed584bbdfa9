// Launch-shape helpers shared by the CUDA GEMV kernels.
#pragma once

#include <algorithm>
#include <cstdint>

#include "runtime.cuh"

namespace qsk::cuda {

constexpr int kGemvThreads = 256;
constexpr int64_t kMaxSplitRows = 512;  // kept rows per split-K block (their indices live in smem)

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// Split-K plan: enough blocks to fill the GPU (about 4 per SM), each over a multiple of 4 kept rows.
struct SplitPlan {
  int64_t splits, rows_per_split;
};

inline SplitPlan plan_splits(int64_t kept, int64_t tiles, int64_t M) {
  const int64_t sms = sm_count();
  int64_t splits = std::max<int64_t>(1, ceil_div(4 * sms, std::max<int64_t>(1, tiles * M)));
  splits = std::min(splits, std::max<int64_t>(1, ceil_div(kept, 8)));  // at least ~8 rows per split
  int64_t rows = ceil_div(std::max<int64_t>(kept, 1), splits);
  rows = std::min(ceil_div(rows, 4) * 4, kMaxSplitRows);
  splits = std::max<int64_t>(1, ceil_div(kept, rows));
  return {splits, rows};
}

}  // namespace qsk::cuda
