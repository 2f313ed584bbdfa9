// Helpers shared by the AVX-512 sparse GEMV panels (sparse_gemv_avx512.cpp, sparse_gemv_avx512bf16.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

#include "qsk/isa.h"

namespace qsk::cpu {

// Reorders the 32 float32 accumulators of one 32-column chunk in place: acc[c] = old[first[c]] for
// c < 16 and old[second[c - 16]] above, indices into the old 32 (vpermt2ps). The panels keep a chunk's
// columns in the order their loads produce them and restore natural order once per panel.
QSK_TARGET_AVX512 inline void permute_chunk(float* acc, __m512i first, __m512i second) {
  const __m512 a = _mm512_loadu_ps(acc), b = _mm512_loadu_ps(acc + 16);
  _mm512_storeu_ps(acc, _mm512_permutex2var_ps(a, first, b));
  _mm512_storeu_ps(acc + 16, _mm512_permutex2var_ps(a, second, b));
}

// The float32 accumulators of rows M0 .. M0 + R - 1 of a 32-column chunk (row stride os), two
// vectors per row, between memory and registers.
template <int M0, int R>
QSK_TARGET_AVX512 inline __attribute__((always_inline)) void load_rows(__m512 (&a)[R][2], const float* acc,
                                                                       int64_t os) {
#pragma GCC unroll 16
  for (int m = 0; m < R; ++m) {
    a[m][0] = _mm512_loadu_ps(acc + (M0 + m) * os);
    a[m][1] = _mm512_loadu_ps(acc + (M0 + m) * os + 16);
  }
}
template <int M0, int R>
QSK_TARGET_AVX512 inline __attribute__((always_inline)) void store_rows(const __m512 (&a)[R][2], float* acc,
                                                                        int64_t os) {
#pragma GCC unroll 16
  for (int m = 0; m < R; ++m) {
    _mm512_storeu_ps(acc + (M0 + m) * os, a[m][0]);
    _mm512_storeu_ps(acc + (M0 + m) * os + 16, a[m][1]);
  }
}

}  // namespace qsk::cpu
