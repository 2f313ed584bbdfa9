// AVX-512 helpers on 16 float32 lanes shared by the CPU kernels (rms_norm.cpp, attention.cpp):
// masked widening loads, and stores rounded as c10 rounds (nearest even; bf16 NaN -> 0x7fc0).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>

#include "qsk/isa.h"

// GCC 12 reports its own masked-load / convert intrinsics as reading an uninitialised value (a
// known false positive in avx512fintrin.h); silenced for the files that include this one.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace qsk::cpu {

constexpr __mmask16 kAll16 = 0xffff;
// The first `left` of 16 lanes (all for left >= 16, none for left <= 0).
QSK_TARGET_AVX512 inline __mmask16 mask16(int64_t left) {
  return left >= 16 ? kAll16 : left <= 0 ? 0 : static_cast<__mmask16>((1u << left) - 1);
}

// The lanes of m widened to float32 (exact); the others 0.
QSK_TARGET_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
QSK_TARGET_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  const __m256i h = _mm256_maskz_loadu_epi16(m, p);
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
QSK_TARGET_AVX512 inline __m512 load16(const c10::Half* p, __mmask16 m) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(m, p));
}

// v rounded to bf16, kept as the float it stands for (its upper 16 bits; the lower 16 are 0).
QSK_TARGET_AVX512 inline __m512i bf16_high(__m512 v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7fff));
  const __m512i r = _mm512_and_si512(_mm512_add_epi32(u, bias), _mm512_set1_epi32(static_cast<int>(0xffff0000u)));
  return _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7fc00000));
}
QSK_TARGET_AVX512 inline __m256i bf16_bits(__m512 v) {
  return _mm512_cvtepi32_epi16(_mm512_srli_epi32(bf16_high(v), 16));
}

// v rounded to T, as a float32 (for float the value itself).
QSK_TARGET_AVX512 inline __m512 round16(__m512 v, float*) { return v; }
QSK_TARGET_AVX512 inline __m512 round16(__m512 v, c10::BFloat16*) { return _mm512_castsi512_ps(bf16_high(v)); }
QSK_TARGET_AVX512 inline __m512 round16(__m512 v, c10::Half*) {
  return _mm512_cvtph_ps(_mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

// The lanes of m rounded to T and stored.
QSK_TARGET_AVX512 inline void store16(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }
QSK_TARGET_AVX512 inline void store16(c10::BFloat16* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, bf16_bits(v));
}
QSK_TARGET_AVX512 inline void store16(c10::Half* p, __m512 v, __mmask16 m) {
  _mm256_mask_storeu_epi16(p, m, _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}

}  // namespace qsk::cpu
