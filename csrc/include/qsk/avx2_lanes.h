// AVX2 helpers on 8 float32 lanes shared by the CPU kernels: widening loads and SPEC 4's int8
// quantization, each lane exactly as the scalar code in cpu_common.h computes it.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <limits>

#include "qsk/isa.h"

namespace qsk::cpu {

// 8 entries -> float32 (exact: F16C for fp16, a 16-bit shift for bf16).
QSK_TARGET_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
QSK_TARGET_AVX2 inline __m256 load8(const c10::Half* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
QSK_TARGET_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  const __m256i v = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
}

// quantize_i8 (cpu_common.h) on 8 lanes, as int32: 0 for NaN / +-Inf, else the clamp to
// [-128, 127] rounded half to even by adding and subtracting 1.5 * 2^23.
QSK_TARGET_AVX2 inline __m256i quantize8(__m256 v) {
  const __m256 finite = _mm256_cmp_ps(_mm256_andnot_ps(_mm256_set1_ps(-0.0f), v),
                                      _mm256_set1_ps(std::numeric_limits<float>::max()), _CMP_LE_OQ);
  const __m256 c = _mm256_min_ps(_mm256_max_ps(v, _mm256_set1_ps(-128.f)), _mm256_set1_ps(127.f));
  const __m256 round = _mm256_set1_ps(12582912.0f);
  const __m256 r = _mm256_sub_ps(_mm256_add_ps(c, round), round);
  return _mm256_cvttps_epi32(_mm256_and_ps(r, finite));
}

// The 8 int32 lanes of q (each in [-128, 127]) stored as 8 int8 at dst.
QSK_TARGET_AVX2 inline void store8_i8(int8_t* dst, __m256i q) {
  const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(q), _mm256_extracti128_si256(q, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(dst), _mm_packs_epi16(w, w));
}

}  // namespace qsk::cpu
