// The inner kernel of sparse_linear on the CPU: a column panel of y = xs @ W^T that reads only the
// weight rows of kept input features. Private to csrc/cpu/{sparse,topk}_*.cpp.
//
// The weight is used through its transpose wt = W^T, row-major with leading dimension ld: for a
// column-major nn.Linear weight (weight.stride(0) == 1), input feature i's `out` weights are the
// contiguous row wt + i * ld (ld = weight.stride(1)). Skipping a feature skips that row.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <utility>
#include <vector>

#include "qsk/isa.h"

namespace qsk::cpu {

// The CPU topk_sparsify_kernel (topk_sparsify.cpp): x [M, d] contiguous float, 0 <= k <= d.
at::Tensor topk_sparsify_cpu(const at::Tensor& x, int64_t k);

// Each row's kept features, [M][k] int32, each row ascending (select_topk over the rows in
// parallel; topk_sparsify.cpp): x [M, d] contiguous float, 0 <= k <= d <= INT32_MAX.
std::vector<int32_t> select_rows(const at::Tensor& x, int64_t k);
// topk_sparsify_cpu(x, k) from rows already selected by select_rows(x, k).
at::Tensor sparsify_kept(const at::Tensor& x, const int32_t* kept, int64_t k);

// Up to kMaxBlockRows activation rows that share one list of weight rows: the union of the
// features they kept, ascending. vals holds each row's value for each listed feature (0 where
// that row dropped it), so every listed weight row is read once and feeds all the rows (Sapphire
// Rapids, 2 threads, s = 0.5, TinyLlama shapes, DRAM-resident, F.linear time / time). 8 rather
// than 4: fp32 M = 8 1.41-1.90 -> 1.81-2.87, M = 16 0.69-0.76 -> 0.90-1.06; fp16 M = 16
// 0.84-0.85 -> 0.87-0.91; bf16 M = 8 0.55-0.67 -> 0.70-0.80. 16 rather than 8 (one pass over
// the weight instead of two, the second from L3, which streams no faster than DRAM here), time
// ratio old / new: fp32 1.12-1.33 at 12 and 16 rows, fp16 1.09-1.25.
constexpr int kMaxBlockRows = 16;
struct SparseRows {
  const int32_t* idx;  // [n] input-feature indices, ascending
  const float* vals;   // [n][mb] activations in float32
  int64_t n;
  int mb;                            // 1 .. kMaxBlockRows
  const uint32_t* pairs = nullptr;  // bf16 only, for sparse_gemv_panel_avx512bf16: [ceil(n / 2)][mb]
                                    // vals of listed rows 2p (low half) and 2p + 1 (high; 0 past n) as bf16
};

// Calls f.template operator()<MB>() with MB = mb, for 1 <= mb <= kMaxBlockRows: the panel kernels'
// instantiation per block size.
template <typename F>
inline void with_block_rows(int mb, F&& f) {
  [&]<int... I>(std::integer_sequence<int, I...>) {
    (void)((mb == I + 1 ? (f.template operator()<I + 1>(), true) : false) || ...);
  }(std::make_integer_sequence<int, kMaxBlockRows>{});
}

// Output columns one panel call computes for a block of mb rows. The mb x cols float32
// accumulators live in an L1-resident buffer (16 KB), so every listed weight row is read as one
// long contiguous run of cols values: long runs are what the DRAM pages and the prefetchers
// stream well (a narrow register tile turns each row into many short, scattered reads).
constexpr int64_t kPanelFloats = 4096;
// Blocks of more than 4 rows get twice the accumulators where L1D holds them (48 KB on Sapphire
// Rapids; Zen 4's 32 KB keeps kPanelFloats): at 8 bf16 rows 1024-column panels ran 1.16-1.35x
// faster than 512-column ones, 1536 columns 1.15-1.24x (2026-12-03, TinyLlama's q, gate and down
// shapes, DRAM-resident weights, interleaved). kMaxPanelFloats sizes the accumulator buffers.
constexpr int64_t kMaxPanelFloats = 2 * kPanelFloats;
inline int64_t panel_cols(int mb) {
  const int64_t floats = mb > 4 && l1d_bytes() >= 48 * 1024 ? kMaxPanelFloats : kPanelFloats;
  return floats / mb / 32 * 32;
}

// out[m * out_stride + j] = sum_u vals[u][m] * wt[idx[u] * ld + j0 + j]  for m < mb, j < ncols,
// summed in float32 in ascending u (the same order for every panel, thread count and call).
// Requires 0 < ncols <= panel_cols(mb); reads no weight element outside columns [j0, j0 + ncols).
// T is float, c10::BFloat16 or c10::Half. Implemented with AVX-512 (sparse_gemv_avx512.cpp) and
// with AVX2 + FMA + F16C (sparse_gemv_avx2.cpp).
template <typename T>
void sparse_gemv_panel_avx512(const T* wt, int64_t ld, const SparseRows& rows, int64_t j0, int64_t ncols,
                              float* out, int64_t out_stride);
// sparse_gemv_panel_avx512 for bf16 with vdpbf16ps over pairs of listed rows (u, u + 1), u even
// (sparse_gemv_avx512bf16.cpp): out[m][j] sums, in float32 and ascending pair order, each pair's two
// products as vdpbf16ps does, which reads subnormal inputs as 0 and flushes subnormal results
// (callers guard against that: sparse_linear.cpp). Needs has_avx512_bf16() and rows.pairs.
void sparse_gemv_panel_avx512bf16(const c10::BFloat16* wt, int64_t ld, const SparseRows& rows, int64_t j0,
                                  int64_t ncols, float* out, int64_t out_stride);
template <typename T>
void sparse_gemv_panel_avx2(const T* wt, int64_t ld, const SparseRows& rows, int64_t j0, int64_t ncols,
                            float* out, int64_t out_stride);

// The row-sparse batch path of sparse_linear (sparse_gemm_rows_avx2.cpp): y[M, N] = linear(topk(x, k),
// W) + bias for x [M, d] contiguous and the column-major weight wt = W^T as [d][ld] rows, where
// each row multiplies only its own kept features kept[m][0 .. k) (ascending, select_rows): float32
// sums in ascending feature order, one FMA each. Needs isa() >= Avx2. M >= 1, 1 <= k <= d, N >= 1.
template <typename T>
void sparse_gemm_rows_avx2(const T* x, int64_t M, int64_t d, int64_t k, const int32_t* kept, const T* wt, int64_t ld,
                           const T* bias, T* y, int64_t N);

// The batched bf16 path of sparse_linear (sparse_gemm_bf16.cpp): y[M, N] = linear(topk(x, k), W)
// + bias for bf16 x [M, d] contiguous and the column-major weight wt = W^T as [d][ld] rows, over
// the union of the M rows' kept features, float32 accumulation on AMX-BF16 tiles (needs
// has_amx_bf16()). 0 <= k <= d, M >= 1, N >= 1.
// kept: the rows' kept features from select_rows, or nullptr to select them here.
void sparse_linear_bf16_batch(const c10::BFloat16* x, int64_t M, int64_t d, int64_t k, const c10::BFloat16* wt,
                              int64_t ld, const c10::BFloat16* bias, c10::BFloat16* y, int64_t N,
                              const int32_t* kept);

}  // namespace qsk::cpu
