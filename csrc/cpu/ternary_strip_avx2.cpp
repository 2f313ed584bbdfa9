// AVX2 strip kernel of the ternary GEMV (contract: csrc/include/qsk/cpu_ternary.h).
//
// Same scheme as the AVX-512 kernel (csrc/cpu/ternary_strip_avx512.cpp), on 16 packed bytes
// (64 outputs) of each plan row so that one batch row's accumulators fit in 8 of the 16 ymm:
//   1. load the 16 B strip of each of the 4 rows of a quad (xmm);
//   2. byte-transpose: ab = unpack{lo,hi}_epi8(a, b), cd = unpack{lo,hi}_epi8(c, d), then
//      v[g] = unpack{lo,hi}_epi16(ab, cd): dword t of v[g] holds byte p = 4g + t of (a, b, c, d);
//      h[0] = [v[0] | v[1]], h[1] = [v[2] | v[3]] as ymm, so dword l of h[k] holds byte p = 8k + l;
//   3. code s of every byte, (byte >> 2s) & 3 (16-bit shift, then a mask for the dragged-in bits);
//   4. pmaddubsw (u8 codes x s8 activations, pairs to int16, |.| <= 768: no saturation), pmaddwd
//      with ones (pairs to int32), add.
// Accumulator 4k + s, dword l, is output 4p + s with p = 8k + l.
// Quads are decoded kChunkQuads at a time into scratch and consumed by every batch row.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>

#include "qsk/cpu_ternary.h"
#include "qsk/isa.h"

namespace qsk::cpu::ternary {
namespace {

constexpr int64_t kW = kStripAvx2;

QSK_TARGET_AVX2 inline __attribute__((always_inline)) __m256i dot4(__m256i acc, __m256i codes, __m256i x) {
  const __m256i pairs = _mm256_maddubs_epi16(codes, x);
  return _mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1)));
}

template <int S>
QSK_TARGET_AVX2 inline __attribute__((always_inline)) __m256i plane(__m256i v) {
  const __m256i three = _mm256_set1_epi8(3);
  if constexpr (S == 0) return _mm256_and_si256(v, three);
  else return _mm256_and_si256(_mm256_srli_epi16(v, 2 * S), three);
}

// Steps 1-3 for quad q: 8 code vectors, index 4k + s.
QSK_TARGET_AVX2 inline __attribute__((always_inline)) void decode_quad(const RowPlan& p, int64_t q, int64_t b0,
                                                                       __m256i* codes) {
  __m128i r[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i)
    r[i] = _mm_loadu_si128(
        reinterpret_cast<const __m128i*>(p.packed + static_cast<int64_t>(p.rows[4 * q + i]) * p.cols + b0));
  const __m128i ab_lo = _mm_unpacklo_epi8(r[0], r[1]), ab_hi = _mm_unpackhi_epi8(r[0], r[1]);
  const __m128i cd_lo = _mm_unpacklo_epi8(r[2], r[3]), cd_hi = _mm_unpackhi_epi8(r[2], r[3]);
  const __m256i h[2] = {
      _mm256_set_m128i(_mm_unpackhi_epi16(ab_lo, cd_lo), _mm_unpacklo_epi16(ab_lo, cd_lo)),
      _mm256_set_m128i(_mm_unpackhi_epi16(ab_hi, cd_hi), _mm_unpacklo_epi16(ab_hi, cd_hi)),
  };
  for (int k = 0; k < 2; ++k) {
    codes[4 * k + 0] = plane<0>(h[k]);
    codes[4 * k + 1] = plane<1>(h[k]);
    codes[4 * k + 2] = plane<2>(h[k]);
    codes[4 * k + 3] = plane<3>(h[k]);
  }
}

QSK_TARGET_AVX2 void strip(const RowPlan& p, int64_t b0, int32_t* out, int64_t ld, int32_t* scratch) {
  const auto base = (reinterpret_cast<uintptr_t>(scratch) + 63) & ~static_cast<uintptr_t>(63);
  __m256i* codes = reinterpret_cast<__m256i*>(base);  // [kChunkQuads][8]
  __m256i* pacc = codes + kChunkQuads * 8;            // [M][8]
  for (int64_t i = 0; i < p.M * 8; ++i) pacc[i] = _mm256_setzero_si256();
  const Prefetch pf = strip_prefetch(p, b0, kW);
  for (int64_t q = 0; q < kPrefetchQuads; ++q) prefetch_quad(p, q, b0, pf);
  for (int64_t q0 = 0; q0 < p.n_quads; q0 += kChunkQuads) {
    const int64_t nq = std::min(kChunkQuads, p.n_quads - q0);
    for (int64_t c = 0; c < nq; ++c) {
      prefetch_quad(p, q0 + c + kPrefetchQuads, b0, pf);
      decode_quad(p, q0 + c, b0, codes + 8 * c);
    }
    for (int64_t m = 0; m < p.M; ++m) {
      const int32_t* xm = p.x4 + m * p.n_quads + q0;
      // The unroll pragmas let GCC keep a[] in registers.
      __m256i a[8];
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) a[i] = pacc[8 * m + i];
      for (int64_t c = 0; c < nq; ++c) {
        if (xm[c] == 0) continue;  // row m dropped all 4 features of this quad
        const __m256i x = _mm256_set1_epi32(xm[c]);
#pragma GCC unroll 8
        for (int i = 0; i < 8; ++i) a[i] = dot4(a[i], codes[8 * c + i], x);
      }
#pragma GCC unroll 8
      for (int i = 0; i < 8; ++i) pacc[8 * m + i] = a[i];
    }
  }
  // Accumulator 4k + s, dword l -> output 4p + s, p = 8k + l.
  for (int64_t m = 0; m < p.M; ++m) {
    alignas(32) int32_t tmp[8][8];
    for (int i = 0; i < 8; ++i) _mm256_store_si256(reinterpret_cast<__m256i*>(tmp[i]), pacc[8 * m + i]);
    int32_t* o = out + m * ld;
    for (int k = 0; k < 2; ++k)
      for (int l = 0; l < 8; ++l)
        for (int s = 0; s < 4; ++s) o[4 * (8 * k + l) + s] = tmp[4 * k + s][l];
  }
}

}  // namespace

void strip_avx2(const RowPlan& plan, int64_t b0, int64_t nbytes, int32_t* acc, int64_t ld, int32_t* scratch) {
  (void)nbytes;  // always kW: the caller overlaps a short last strip with the previous one
  strip(plan, b0, acc, ld, scratch);
}

}  // namespace qsk::cpu::ternary
