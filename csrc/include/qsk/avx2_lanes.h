// AVX2 helpers on 8 float32 lanes shared by the CPU kernels: widening loads and SPEC 4's int8
// quantization, each lane exactly as the scalar code in cpu_common.h computes it.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cstdint>
#include <limits>

#include "qsk/cpu_common.h"
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

// q[i] = quantize_i8(x[i] * s) for i < d, 8 entries per step; where `keep` is given, 0 wherever
// keep[i] == 0 (d bytes of 0 / 0xff). Returns the sum of q.
template <typename T>
QSK_TARGET_AVX2 inline int32_t quantize_row8(const T* x, int64_t d, float s, int8_t* q, const uint8_t* keep) {
  const int64_t d8 = d - d % 8;
  const __m256 vs = _mm256_set1_ps(s);
  __m256i sum = _mm256_setzero_si256();
  for (int64_t i = 0; i < d8; i += 8) {
    __m256i v = quantize8(_mm256_mul_ps(load8(x + i), vs));
    if (keep) v = _mm256_and_si256(v, _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(keep + i))));
    store8_i8(q + i, v);
    sum = _mm256_add_epi32(sum, v);
  }
  alignas(32) int32_t sums[8];
  _mm256_store_si256(reinterpret_cast<__m256i*>(sums), sum);
  int32_t total = 0;
  for (int32_t v : sums) total += v;
  for (int64_t i = d8; i < d; ++i) {
    const int8_t v = keep && !keep[i] ? 0 : quantize_i8(to_f32(x[i]) * s);
    q[i] = v;
    total += v;
  }
  return total;
}

}  // namespace qsk::cpu
