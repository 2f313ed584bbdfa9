// AVX2 column panel of the sparse GEMV (contract in sparse_gemv.h), for CPUs without AVX-512.
//
// The AVX-512 kernel's scheme on 8-lane vectors: per group of kGroup listed weight rows, the
// panel is walked 16 columns at a time; each row's 16 weights are converted to two float32
// vectors (F16C for fp16, a 16-bit shift for bf16) and FMA'd into the accumulators of every
// activation row, which stay in registers across the group. 16 ymm registers hold at most
// kChunkRows rows x 2 accumulators next to the weights and the broadcast activation, so larger
// blocks take their rows in chunks, each chunk re-reading the group's weights from L1. Upcoming
// weight rows are software-prefetched (their addresses are data dependent). A short last block of
// columns goes through a zero-padded copy, so no weight outside [j0, j0 + ncols) is read.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <utility>

#include "qsk/isa.h"
#include "qsk/avx2_lanes.h"
#include "sparse_gemv.h"

namespace qsk::cpu {
namespace {

constexpr int64_t kPrefetchRows = 4;  // how many listed rows ahead the prefetches run
constexpr int kGroup = 4;             // listed rows per pass over the panel
constexpr int kChunkRows = 6;         // activation rows whose accumulators share the registers
constexpr int kCols = 16;             // columns per step: two float32 vectors

// acc[M0 + m][16 columns] += sum over g < G of xv[g][M0 + m] * (16 weights at rows[g] + off),
// in g order, for m < R; the accumulators in registers across the G rows.
template <typename T, int MB, int M0, int R, int G>
QSK_TARGET_AVX2 inline __attribute__((always_inline)) void fma_rows(const T* const* rows, int64_t off,
                                                                    const float* xv, float* acc, int64_t os) {
  __m256 a[R][2];
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m) {
    a[m][0] = _mm256_loadu_ps(acc + (M0 + m) * os);
    a[m][1] = _mm256_loadu_ps(acc + (M0 + m) * os + 8);
  }
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) {
    const __m256 w0 = load8(rows[g] + off), w1 = load8(rows[g] + off + 8);
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) {
      const __m256 x = _mm256_broadcast_ss(xv + g * MB + M0 + m);
      a[m][0] = _mm256_fmadd_ps(x, w0, a[m][0]);
      a[m][1] = _mm256_fmadd_ps(x, w1, a[m][1]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < R; ++m) {
    _mm256_storeu_ps(acc + (M0 + m) * os, a[m][0]);
    _mm256_storeu_ps(acc + (M0 + m) * os + 8, a[m][1]);
  }
}

// All MB rows, kChunkRows at a time.
template <typename T, int MB, int G, int M0 = 0>
QSK_TARGET_AVX2 inline __attribute__((always_inline)) void fma_block(const T* const* rows, int64_t off,
                                                                     const float* xv, float* acc, int64_t os) {
  constexpr int R = std::min(kChunkRows, MB - M0);
  fma_rows<T, MB, M0, R, G>(rows, off, xv, acc, os);
  if constexpr (M0 + R < MB) fma_block<T, MB, G, M0 + R>(rows, off, xv, acc, os);
}

// Listed rows u0 .. u0 + G - 1 into the panel; prefetches rows pf[0 .. G) meanwhile.
template <typename T, int MB, int G>
QSK_TARGET_AVX2 void rows_into_panel(const T* base, int64_t ld, const SparseRows& r, int64_t u0,
                                     const char* const* pf, int64_t ncols, float* out, int64_t os) {
  const T* rows[G];
  for (int g = 0; g < G; ++g) rows[g] = base + static_cast<int64_t>(r.idx[u0 + g]) * ld;
  const float* xv = r.vals + u0 * MB;
  const int64_t nfull = ncols / kCols;
  for (int64_t c = 0; c < nfull; ++c) {
    // One prefetch per 64-byte line: every step for float32, every other step for 16-bit types.
    if (sizeof(T) == 4 || (c & 1) == 0)
      for (int g = 0; g < G; ++g) _mm_prefetch(pf[g] + c * kCols * sizeof(T), _MM_HINT_T1);
    fma_block<T, MB, G>(rows, kCols * c, xv, out + kCols * c, os);
  }
  if (const int64_t left = ncols - kCols * nfull; left > 0) {
    T pad[G][kCols] = {};
    const T* padded[G];
    for (int g = 0; g < G; ++g) {
      std::memcpy(pad[g], rows[g] + kCols * nfull, left * sizeof(T));
      padded[g] = pad[g];
    }
    fma_block<T, MB, G>(padded, 0, xv, out + kCols * nfull, os);
  }
}

template <typename T, int MB>
QSK_TARGET_AVX2 void panel(const T* wt, int64_t ld, const SparseRows& r, int64_t j0, int64_t ncols, float* out,
                           int64_t os) {
  const int64_t padded_cols = (ncols + kCols - 1) / kCols * kCols;  // <= panel_cols(MB), a multiple of 32
  for (int m = 0; m < MB; ++m) std::memset(out + m * os, 0, padded_cols * sizeof(float));
  const T* base = wt + j0;
  // The row kPrefetchRows ahead of each row (the row itself near the end: harmless, no branch).
  auto pf_row = [&](int64_t u) {
    const int64_t v = u + kPrefetchRows < r.n ? u + kPrefetchRows : u;
    return reinterpret_cast<const char*>(base + static_cast<int64_t>(r.idx[v]) * ld);
  };
  int64_t u = 0;
  for (; u + kGroup <= r.n; u += kGroup) {
    const char* pf[kGroup];
    for (int g = 0; g < kGroup; ++g) pf[g] = pf_row(u + g);
    rows_into_panel<T, MB, kGroup>(base, ld, r, u, pf, ncols, out, os);
  }
  for (; u < r.n; ++u) {
    const char* pf[1] = {pf_row(u)};
    rows_into_panel<T, MB, 1>(base, ld, r, u, pf, ncols, out, os);
  }
}

template <typename T, int... MB>
void dispatch(std::integer_sequence<int, MB...>, const T* wt, int64_t ld, const SparseRows& r, int64_t j0,
              int64_t ncols, float* out, int64_t os) {
  using Fn = void (*)(const T*, int64_t, const SparseRows&, int64_t, int64_t, float*, int64_t);
  static constexpr Fn kPanels[] = {&panel<T, MB + 1>...};
  kPanels[r.mb - 1](wt, ld, r, j0, ncols, out, os);
}

}  // namespace

template <typename T>
void sparse_gemv_panel_avx2(const T* wt, int64_t ld, const SparseRows& r, int64_t j0, int64_t ncols, float* out,
                            int64_t os) {
  dispatch(std::make_integer_sequence<int, kMaxBlockRows>{}, wt, ld, r, j0, ncols, out, os);
}

template void sparse_gemv_panel_avx2<float>(const float*, int64_t, const SparseRows&, int64_t, int64_t, float*,
                                            int64_t);
template void sparse_gemv_panel_avx2<c10::BFloat16>(const c10::BFloat16*, int64_t, const SparseRows&, int64_t,
                                                    int64_t, float*, int64_t);
template void sparse_gemv_panel_avx2<c10::Half>(const c10::Half*, int64_t, const SparseRows&, int64_t, int64_t,
                                                float*, int64_t);

}  // namespace qsk::cpu
