// AVX512-BF16 column panel of the bf16 sparse GEMV (contract in sparse_gemv.h): vdpbf16ps over
// pairs of listed rows, for CPUs with AVX512-BF16 but no AMX (AMD Zen 4).
//
// Per pair of listed rows (u, u + 1) and 32 columns: two 64-byte loads, interleaved into the
// pairs vdpbf16ps reads by one unpack each way (unpacklo / unpackhi_epi16 within 128-bit lanes,
// so the accumulators hold the columns in the order 0-3, 8-11, .. / 4-7, 12-15, ..;
// unpermute_pairs restores it once per panel), then two vdpbf16ps per activation row with the
// row's two bf16 activations broadcast. Half the arithmetic of the float32 FMA panel, where
// Zen 4 runs both at one 512-bit instruction per cycle; the accumulators stay in registers over
// kPairs pairs. The weight rows of upcoming features are software-prefetched as in
// sparse_gemv_avx512.cpp.
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>

#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"  // GCC 12's masked 16-bit loads: see sparse_gemv_avx512.cpp
#pragma GCC diagnostic ignored "-Wuninitialized"

#include "qsk/cpu_common.h"
#include "qsk/isa.h"
#include "panel_avx512.h"
#include "sparse_gemv.h"

namespace qsk::cpu {
namespace {

// Pairs of listed rows per pass over the panel (12 weight rows), and activation rows whose
// accumulators are in registers at once: 12 pair vectors + 8 accumulators. Single thread, bf16
// 2048 -> 1024 and 1024 -> 2048 at 8 and 16 rows, LLC-resident (Zen 4, 2026-12-04, alternating
// builds, time / F.linear's): 6 x 4 1.05-1.53, 7 x 4 1.16-1.37, 5 x 4 1.31-1.52, 6 x 6 1.23-1.52,
// 8 x 4 1.25-1.51, 4 x 8 1.20-1.72, 8 x 2 1.39-1.50, 2 x 12 3.5 (spills).
constexpr int kPairs = 6;
constexpr int kRowChunk = 4;
constexpr int64_t kPrefetchRows = 2 * kPairs;  // how many listed rows ahead the prefetches run: one pass

// acc[m][32 columns] += sum over p < P of dp(pairs p of row M0 + m, w[p]) for m < R, in p order.
template <int M0, int R, int P>
QSK_TARGET_AVX512 inline __attribute__((always_inline)) void dp_rows(const __m512bh (&w)[P][2], const uint32_t* xp,
                                                                     int mb, float* acc, int64_t os) {
  __m512 a[R][2];
  load_rows<M0, R>(a, acc, os);
#pragma GCC unroll 4
  for (int p = 0; p < P; ++p) {
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(xp[p * mb + M0 + m]));
      a[m][0] = _mm512_dpbf16_ps(a[m][0], xv, w[p][0]);
      a[m][1] = _mm512_dpbf16_ps(a[m][1], xv, w[p][1]);
    }
  }
  store_rows<M0, R>(a, acc, os);
}

// Every row of the block, kRowChunk rows at a time.
template <int M0, int MB, int P>
QSK_TARGET_AVX512 inline __attribute__((always_inline)) void dp_all(const __m512bh (&w)[P][2], const uint32_t* xp,
                                                                    float* acc, int64_t os) {
  if constexpr (M0 < MB) {
    constexpr int R = MB - M0 < kRowChunk ? MB - M0 : kRowChunk;
    dp_rows<M0, R, P>(w, xp, MB, acc, os);
    dp_all<M0 + R, MB, P>(w, xp, acc, os);
  }
}

// Pairs u0 / 2 .. u0 / 2 + P - 1 (listed rows u0 .. u0 + 2 P - 1, the last one possibly past n:
// a zero row) into the panel; prefetches the rows pf[0 .. 2 P) meanwhile.
template <int MB, int P>
QSK_TARGET_AVX512 inline void pairs_into_panel(const uint16_t* base, int64_t ld, const SparseRows& r, int64_t u0,
                                               const char* const* pf, int64_t nchunks, int64_t ncols, float* out,
                                               int64_t os) {
  const uint16_t* rows[2 * P];
#pragma GCC unroll 8
  for (int g = 0; g < 2 * P; ++g)
    rows[g] = u0 + g < r.n ? base + static_cast<int64_t>(r.idx[u0 + g]) * ld : nullptr;
  const uint32_t* xp = r.pairs + (u0 / 2) * MB;
  const bool last_full = rows[2 * P - 1] != nullptr;  // no zero row in this group
  for (int64_t c = 0; c < nchunks; ++c) {
#pragma GCC unroll 8
    for (int g = 0; g < 2 * P; ++g) _mm_prefetch(pf[g] + 64 * c, _MM_HINT_T1);
    __m512bh w[P][2];
    if (last_full && 32 * (c + 1) <= ncols) {
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) {
        const __m512i lo = _mm512_loadu_si512(rows[2 * p] + 32 * c);
        const __m512i hi = _mm512_loadu_si512(rows[2 * p + 1] + 32 * c);
        w[p][0] = (__m512bh)_mm512_unpacklo_epi16(lo, hi);
        w[p][1] = (__m512bh)_mm512_unpackhi_epi16(lo, hi);
      }
    } else {
      const __mmask32 cols = tail_mask32(ncols - 32 * c);
#pragma GCC unroll 4
      for (int p = 0; p < P; ++p) {
        const __m512i lo = _mm512_maskz_loadu_epi16(cols, rows[2 * p] + 32 * c);
        const __m512i hi = rows[2 * p + 1] ? _mm512_maskz_loadu_epi16(cols, rows[2 * p + 1] + 32 * c)
                                           : _mm512_setzero_si512();
        w[p][0] = (__m512bh)_mm512_unpacklo_epi16(lo, hi);
        w[p][1] = (__m512bh)_mm512_unpackhi_epi16(lo, hi);
      }
    }
    dp_all<0, MB, P>(w, xp, out + 32 * c, os);
  }
}

// Restores natural column order in 32 accumulators of one chunk (see the file comment), in place.
QSK_TARGET_AVX512 inline void unpermute_pairs(float* acc) {
  // Column c of a 16-column half: lane L = c / 8 of the low (c % 8 < 4) or high accumulator.
  permute_chunk(acc, _mm512_setr_epi32(0, 1, 2, 3, 16, 17, 18, 19, 4, 5, 6, 7, 20, 21, 22, 23),
                _mm512_setr_epi32(8, 9, 10, 11, 24, 25, 26, 27, 12, 13, 14, 15, 28, 29, 30, 31));
}

template <int MB>
QSK_TARGET_AVX512 void panel(const c10::BFloat16* wt, int64_t ld, const SparseRows& r, int64_t j0, int64_t ncols,
                             float* out, int64_t os) {
  const int64_t nchunks = (ncols + 31) / 32;
  for (int m = 0; m < MB; ++m) std::memset(out + m * os, 0, nchunks * 32 * sizeof(float));
  const uint16_t* base = reinterpret_cast<const uint16_t*>(wt) + j0;
  auto pf_row = [&](int64_t u) {  // the row kPrefetchRows ahead (near the end: the last row, harmless)
    const int64_t v = std::min(u + kPrefetchRows, r.n - 1);
    return reinterpret_cast<const char*>(base + static_cast<int64_t>(r.idx[v]) * ld);
  };
  int64_t u = 0;
  for (; u + 2 * kPairs <= r.n; u += 2 * kPairs) {
    const char* pf[2 * kPairs];
    for (int g = 0; g < 2 * kPairs; ++g) pf[g] = pf_row(u + g);
    pairs_into_panel<MB, kPairs>(base, ld, r, u, pf, nchunks, ncols, out, os);
  }
  for (; u < r.n; u += 2) {
    const char* pf[2] = {pf_row(u), pf_row(u + 1)};
    pairs_into_panel<MB, 1>(base, ld, r, u, pf, nchunks, ncols, out, os);
  }
  for (int m = 0; m < MB; ++m)
    for (int64_t c = 0; c < nchunks; ++c) unpermute_pairs(out + m * os + 32 * c);
}

}  // namespace

void sparse_gemv_panel_avx512bf16(const c10::BFloat16* wt, int64_t ld, const SparseRows& r, int64_t j0,
                                  int64_t ncols, float* out, int64_t os) {
  with_block_rows(r.mb, [&]<int MB>() { panel<MB>(wt, ld, r, j0, ncols, out, os); });
}

}  // namespace qsk::cpu
