// AVX-512 column panel of the sparse GEMV (contract in sparse_gemv.h).
//
// Per listed weight row u: broadcast the mb activations, convert the row's panel 32 columns at a
// time to float32 and FMA it into the mb accumulator rows (L1-resident). The weight rows of
// upcoming features are software-prefetched, one prefetch per 64-byte line consumed: their
// addresses are data dependent, so the hardware prefetchers cannot run ahead across rows.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstring>
#include <type_traits>

// GCC 12 reports its own 16-bit masked-load intrinsics (_mm*_maskz_loadu_epi16) as reading an
// uninitialised value (a known false positive in avx512bwintrin.h); silence it in this file only.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "qsk/isa.h"
#include "sparse_gemv.h"

namespace qsk::cpu {
namespace {

// How many listed rows ahead the prefetches run (a row's panel is 4..16 KB: one row is enough
// to cover the memory latency; more would evict the accumulators' lines sooner).
constexpr int64_t kPrefetchRows = 2;

inline __mmask32 cols_mask(int64_t left) {
  return left >= 32 ? static_cast<__mmask32>(0xffffffffu) : static_cast<__mmask32>((1u << left) - 1);
}

// ---- 32 columns <-> two float32 vectors, per weight dtype ----

QSK_TARGET_AVX512 inline void load_pair(const float* p, __mmask32 m, __m512& a, __m512& b) {
  a = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m), p);
  b = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m >> 16), p + 16);
}

QSK_TARGET_AVX512 inline void load_pair(const c10::Half* p, __mmask32 m, __m512& a, __m512& b) {
  a = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>(m), p));
  b = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>(m >> 16), p + 16));
}

// bf16 -> float32 is a 16-bit left shift. Read 32 bf16 as 16 dwords: the low halves (even
// columns) shifted up and the high halves (odd columns) masked are two float32 vectors with no
// shuffle, a = columns 0, 2, .., 30 and b = 1, 3, .., 31. unpermute_block undoes the interleave
// once per panel instead of once per row.
QSK_TARGET_AVX512 inline void load_pair(const c10::BFloat16* p, __mmask32 m, __m512& a, __m512& b) {
  const __m512i v = _mm512_maskz_loadu_epi16(m, p);
  a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  b = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// Restores natural column order in a bf16 panel's accumulators (see load_pair), in place.
QSK_TARGET_AVX512 inline void unpermute_block(float* acc) {
  const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
  const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
  const __m512 a = _mm512_loadu_ps(acc), b = _mm512_loadu_ps(acc + 16);
  _mm512_storeu_ps(acc, _mm512_permutex2var_ps(a, lo, b));
  _mm512_storeu_ps(acc + 16, _mm512_permutex2var_ps(a, hi, b));
}

// acc[m][32c .. 32c + 32) += xb[m] * (32 weights at w, columns masked by `cols`).
template <typename T, int MB>
QSK_TARGET_AVX512 inline void fma_block(const T* w, __mmask32 cols, const __m512* xb, float* acc, int64_t os) {
  __m512 w0, w1;
  load_pair(w, cols, w0, w1);
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m) {
    float* a = acc + m * os;
    _mm512_storeu_ps(a, _mm512_fmadd_ps(xb[m], w0, _mm512_loadu_ps(a)));
    _mm512_storeu_ps(a + 16, _mm512_fmadd_ps(xb[m], w1, _mm512_loadu_ps(a + 16)));
  }
}

template <typename T, int MB>
QSK_TARGET_AVX512 void panel(const T* wt, int64_t ld, const SparseRows& r, int64_t j0, int64_t ncols, float* out,
                             int64_t os) {
  const int64_t nfull = ncols / 32;
  const __mmask32 tail = cols_mask(ncols - 32 * nfull);  // 0 when ncols % 32 == 0
  const int64_t nblocks = nfull + (tail != 0);
  for (int m = 0; m < MB; ++m) std::memset(out + m * os, 0, nblocks * 32 * sizeof(float));

  // Lines of weight per 32-column block: 1 for the half types, 2 for float32.
  constexpr int kLinesPerBlock = 32 * sizeof(T) / 64;
  const T* base = wt + j0;
  const int32_t* idx = r.idx;
  for (int64_t u = 0; u < r.n; ++u) {
    const T* row = base + static_cast<int64_t>(idx[u]) * ld;
    // The row kPrefetchRows ahead (the current one again near the end: harmless, no branch).
    const char* pf = reinterpret_cast<const char*>(
        u + kPrefetchRows < r.n ? base + static_cast<int64_t>(idx[u + kPrefetchRows]) * ld : row);
    __m512 xb[MB];
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) xb[m] = _mm512_set1_ps(r.vals[u * MB + m]);
    for (int64_t c = 0; c < nfull; ++c) {
#pragma GCC unroll 2
      for (int l = 0; l < kLinesPerBlock; ++l) _mm_prefetch(pf + (c * kLinesPerBlock + l) * 64, _MM_HINT_T1);
      fma_block<T, MB>(row + 32 * c, static_cast<__mmask32>(0xffffffffu), xb, out + 32 * c, os);
    }
    if (tail) fma_block<T, MB>(row + 32 * nfull, tail, xb, out + 32 * nfull, os);
  }
  if constexpr (std::is_same_v<T, c10::BFloat16>) {
    for (int m = 0; m < MB; ++m)
      for (int64_t c = 0; c < nblocks; ++c) unpermute_block(out + m * os + 32 * c);
  }
}

}  // namespace

template <typename T>
void sparse_gemv_panel_avx512(const T* wt, int64_t ld, const SparseRows& r, int64_t j0, int64_t ncols, float* out,
                              int64_t os) {
  switch (r.mb) {
    case 1: return panel<T, 1>(wt, ld, r, j0, ncols, out, os);
    case 2: return panel<T, 2>(wt, ld, r, j0, ncols, out, os);
    case 3: return panel<T, 3>(wt, ld, r, j0, ncols, out, os);
    default: return panel<T, 4>(wt, ld, r, j0, ncols, out, os);
  }
}

template void sparse_gemv_panel_avx512<float>(const float*, int64_t, const SparseRows&, int64_t, int64_t, float*,
                                              int64_t);
template void sparse_gemv_panel_avx512<c10::BFloat16>(const c10::BFloat16*, int64_t, const SparseRows&, int64_t,
                                                      int64_t, float*, int64_t);
template void sparse_gemv_panel_avx512<c10::Half>(const c10::Half*, int64_t, const SparseRows&, int64_t, int64_t,
                                                  float*, int64_t);

}  // namespace qsk::cpu
