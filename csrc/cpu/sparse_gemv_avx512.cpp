// AVX-512 column tile of the sparse GEMV (contract in sparse_gemv.h).
//
// Per listed weight row u: broadcast the mb activations, convert 32 columns at a time to float32
// and FMA them into mb x cols register accumulators. The weight rows of upcoming features are
// software-prefetched (their addresses are data dependent, so the hardware prefetcher cannot
// follow them): with the loads always a few rows ahead, the loop streams at memory bandwidth.
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

// GCC 12 reports its own 16-bit masked-load intrinsics (_mm*_maskz_loadu_epi16) as reading an
// uninitialised value (a known false positive in avx512bwintrin.h); silence it in this file only.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "qsk/isa.h"
#include "sparse_gemv.h"

namespace qsk::cpu {
namespace {

// How many listed rows ahead the prefetches run (a row segment is 128..1024 bytes).
constexpr int64_t kPrefetchRows = 6;

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
// shuffle, a = columns 0, 2, .., 30 and b = 1, 3, .., 31. store_pair undoes the interleave once
// per tile instead of once per row.
QSK_TARGET_AVX512 inline void load_pair(const c10::BFloat16* p, __mmask32 m, __m512& a, __m512& b) {
  const __m512i v = _mm512_maskz_loadu_epi16(m, p);
  a = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  b = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

template <typename T>
QSK_TARGET_AVX512 inline void store_pair(__m512 a, __m512 b, float* out, __mmask32 m) {
  if constexpr (std::is_same_v<T, c10::BFloat16>) {  // (even, odd) columns back to natural order
    const __m512i lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    const __m512i hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    const __m512 a2 = _mm512_permutex2var_ps(a, lo, b), b2 = _mm512_permutex2var_ps(a, hi, b);
    a = a2;
    b = b2;
  }
  _mm512_mask_storeu_ps(out, static_cast<__mmask16>(m), a);
  _mm512_mask_storeu_ps(out + 16, static_cast<__mmask16>(m >> 16), b);
}

// MB rows x NP * 32 columns of accumulators (MB * NP * 2 <= 16 zmm). kTail: masked columns.
template <typename T, int MB, int NP, bool kTail>
QSK_TARGET_AVX512 void tile(const T* wt, int64_t ld, const SparseRows& r, int64_t j0, int64_t ncols, float* out,
                            int64_t out_stride) {
  __mmask32 mask[NP];
#pragma GCC unroll 8
  for (int c = 0; c < NP; ++c) mask[c] = kTail ? cols_mask(ncols - 32 * c) : static_cast<__mmask32>(0xffffffffu);
  __m512 acc[MB][2 * NP];
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 16
    for (int c = 0; c < 2 * NP; ++c) acc[m][c] = _mm512_setzero_ps();

  const T* base = wt + j0;
  const int32_t* idx = r.idx;
  const float* vals = r.vals;
  constexpr int kLines = (NP * 32 * static_cast<int>(sizeof(T))) / 64 + 1;  // +1: rows are not line-aligned
  for (int64_t u = 0; u < r.n; ++u) {
    if (u + kPrefetchRows < r.n) {
      const char* pf = reinterpret_cast<const char*>(base + static_cast<int64_t>(idx[u + kPrefetchRows]) * ld);
#pragma GCC unroll 17
      for (int l = 0; l < kLines; ++l) _mm_prefetch(pf + 64 * l, _MM_HINT_T0);
    }
    const T* row = base + static_cast<int64_t>(idx[u]) * ld;
    __m512 xb[MB];
#pragma GCC unroll 4
    for (int m = 0; m < MB; ++m) xb[m] = _mm512_set1_ps(vals[u * MB + m]);
#pragma GCC unroll 8
    for (int c = 0; c < NP; ++c) {
      __m512 w0, w1;
      load_pair(row + 32 * c, mask[c], w0, w1);
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) {
        acc[m][2 * c] = _mm512_fmadd_ps(xb[m], w0, acc[m][2 * c]);
        acc[m][2 * c + 1] = _mm512_fmadd_ps(xb[m], w1, acc[m][2 * c + 1]);
      }
    }
  }
#pragma GCC unroll 4
  for (int m = 0; m < MB; ++m)
#pragma GCC unroll 8
    for (int c = 0; c < NP; ++c) store_pair<T>(acc[m][2 * c], acc[m][2 * c + 1], out + m * out_stride + 32 * c, mask[c]);
}

template <typename T, int MB, int NP>
void tile_any(const T* wt, int64_t ld, const SparseRows& r, int64_t j0, int64_t ncols, float* out, int64_t os) {
  if (ncols == NP * 32)
    tile<T, MB, NP, false>(wt, ld, r, j0, ncols, out, os);
  else
    tile<T, MB, NP, true>(wt, ld, r, j0, ncols, out, os);
}

}  // namespace

template <typename T>
void sparse_gemv_tile_avx512(const T* wt, int64_t ld, const SparseRows& r, int64_t j0, int64_t ncols, float* out,
                             int64_t os) {
  // Pairs of 32 columns per mb, matching tile_cols(): 8 (256 columns), 4 (128), 2 (64).
  switch (r.mb) {
    case 1: return tile_any<T, 1, 8>(wt, ld, r, j0, ncols, out, os);
    case 2: return tile_any<T, 2, 4>(wt, ld, r, j0, ncols, out, os);
    case 3: return tile_any<T, 3, 2>(wt, ld, r, j0, ncols, out, os);
    default: return tile_any<T, 4, 2>(wt, ld, r, j0, ncols, out, os);
  }
}

template void sparse_gemv_tile_avx512<float>(const float*, int64_t, const SparseRows&, int64_t, int64_t, float*,
                                             int64_t);
template void sparse_gemv_tile_avx512<c10::BFloat16>(const c10::BFloat16*, int64_t, const SparseRows&, int64_t,
                                                     int64_t, float*, int64_t);
template void sparse_gemv_tile_avx512<c10::Half>(const c10::Half*, int64_t, const SparseRows&, int64_t, int64_t,
                                                 float*, int64_t);

}  // namespace qsk::cpu
