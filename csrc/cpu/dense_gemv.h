// The dense row-major GEMV of sparse_linear at k = d (csrc/cpu/dense_gemv.cpp).
#pragma once

#include <ATen/Context.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <limits>

#include "qsk/isa.h"

namespace qsk::cpu {

// Batch rows dense_gemv_rowmajor multiplies in one pass over the weight (more rows: several passes).
constexpr int64_t kMaxRowGemvRows = 4;

// Whether torch's CPU GEMMs in the 16-bit types are fast: oneDNN's native kernels, which need
// AVX512-FP16 (fp16) or AVX512-BF16 (bf16; AMX implies it) and torch.backends.mkldnn enabled.
// Without them torch runs these dtypes as one GEMV per row (measured on an AVX2-only Zen 3: ~1.1
// ms per row at 2048 -> 5632 whatever M), so the library's kernels take every batch size
// (sparse_linear.cpp: sparse_max_rows; row_gemv_max_rows below).
inline bool torch_fp16_gemm_fast() {
  return cpu_has_avx512_fp16() && at::hasMKLDNN() && at::globalContext().userEnabledMkldnn();
}
inline bool torch_bf16_gemm_fast() {
  return cpu_has_avx512_bf16() && at::hasMKLDNN() && at::globalContext().userEnabledMkldnn();
}

// Batch rows up to which a row-major weight at k = d takes dense_gemv_rowmajor; above it torch's
// GEMM. Measured on the 2-core Sapphire Rapids, 2048 -> 32000 (a TinyLlama head), both threads,
// median [min, max] of 7 interleaved pairs, time / F.linear on the same weight:
//   bf16 M = 1: 0.71 [0.67, 0.91], 2: 0.94, 3: 1.05, 4: 1.19 (torch's AMX GEMM from 3 rows)
//   fp32 M = 1: 1.04 [0.94, 1.09] (MKL's sgemv is at bandwidth too), 2: 0.92, 3: 0.90, 4: 0.56
//   fp16 M = 1: 0.52, 2: 0.61, 3: 0.65, 4: 0.64
// On an AVX2-only Zen 3 (2026-12-03, same shape, 15 interleaved pairs, F.linear time / time):
// bf16 M = 1: 1.22 [0.94, 1.28], 2: 1.80; fp16 1.13, 1.66, 4: 2.54; fp32 1.47, 2.90, 4: 4.87.
// Where torch's 16-bit GEMM is slow (above), those dtypes take the GEMV at every M.
// On Zen 4 (AVX512-BF16, no AMX; 2026-12-05, the two-value bf16 order, 5 interleaved rounds,
// F.linear time / time) bf16 takes the GEMV up to 4 rows as fp32 and fp16 do: the head M = 1 1.84
// [1.81, 1.94], 2: 1.66, 3: 1.62, 4: 1.44 [1.37, 1.54], 6: 1.08, 8: 0.89; 2048 -> 5632 (in cache)
// 2.61, 1.68, 1.38, 4: 1.09 [1.02, 1.16], 6: 0.80.
inline int64_t row_gemv_max_rows(c10::ScalarType dtype) {
  constexpr int64_t kAlways = std::numeric_limits<int64_t>::max();
  if (dtype == c10::kBFloat16) return !torch_bf16_gemm_fast() ? kAlways : cpu_has_amx_bf16() ? 2 : kMaxRowGemvRows;
  if (dtype == c10::kHalf) return torch_fp16_gemm_fast() ? kMaxRowGemvRows : kAlways;
  return kMaxRowGemvRows;
}

// y[M][N] = x[M][d] . w[N][d]^T (+ bias[N]) for a row-major weight (row n at w + n * ldw, ldw >= d),
// x and y contiguous, M >= 1 (kMaxRowGemvRows rows per pass); float32 sums in a fixed order (dense_gemv.cpp).
// T is float, c10::BFloat16 or c10::Half.
template <typename T>
void dense_gemv_rowmajor(const T* x, int64_t M, int64_t d, const T* w, int64_t ldw, const T* bias, T* y, int64_t N);

}  // namespace qsk::cpu
