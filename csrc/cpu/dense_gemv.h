// The dense row-major GEMV of sparse_linear at k = d (csrc/cpu/dense_gemv.cpp).
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

namespace qsk::cpu {

// The most batch rows dense_gemv_rowmajor takes.
constexpr int64_t kMaxRowGemvRows = 4;

// Batch rows up to which a row-major weight at k = d takes dense_gemv_rowmajor; above it torch's
// GEMM. Measured on the 2-core Sapphire Rapids, 2048 -> 32000 (a TinyLlama head), both threads,
// median [min, max] of 7 interleaved pairs, time / F.linear on the same weight:
//   bf16 M = 1: 0.71 [0.67, 0.91], 2: 0.94, 3: 1.05, 4: 1.19 (torch's AMX GEMM from 3 rows)
//   fp32 M = 1: 1.04 [0.94, 1.09] (MKL's sgemv is at bandwidth too), 2: 0.92, 3: 0.90, 4: 0.56
//   fp16 M = 1: 0.52, 2: 0.61, 3: 0.65, 4: 0.64
inline int64_t row_gemv_max_rows(c10::ScalarType dtype) { return dtype == c10::kBFloat16 ? 2 : kMaxRowGemvRows; }

// y[M][N] = x[M][d] . w[N][d]^T (+ bias[N]) for a row-major weight (row n at w + n * ldw, ldw >= d),
// x and y contiguous, 1 <= M <= kMaxRowGemvRows; float32 sums in a fixed order (dense_gemv.cpp).
// T is float, c10::BFloat16 or c10::Half.
template <typename T>
void dense_gemv_rowmajor(const T* x, int64_t M, int64_t d, const T* w, int64_t ldw, const T* bias, T* y, int64_t N);

}  // namespace qsk::cpu
