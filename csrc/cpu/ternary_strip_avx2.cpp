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
#include <cstring>

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
        reinterpret_cast<const __m128i*>(p.packed + static_cast<int64_t>(p.rows[4 * q + i]) * p.stride + b0));
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

// ---- M == 1 (block_avx2_m1): pairs of plan rows, int16 accumulators, no transpose ----
//
// One step takes a pair of plan rows (a, b) of a quad and 32 packed bytes of each (128 outputs):
//   u[h] = unpack{lo,hi}_epi8(a, b): int16 lane 8L + t of u[h] holds byte p = 16L + 8h + t of
//          (a, b) (unpack works inside each 128-bit lane L);
//   plane s of u[h] is then the u8 pair (code_a, code_b) of output 4p + s, and pmaddubsw with
//          the pair's activations (x_a, x_b) in every int16 lane gives code_a x_a + code_b x_b,
//          at most 2 * 3 * 128 = 768 in magnitude (no saturation, even for code 3);
//   paddw accumulates those in int16, exact for up to kPairsInt16 pairs; then the 8 int16
//          accumulators are widened and added into int32 ones in memory.
// About 35 uops per 256 products, against about 60 plus 16 scratch loads and stores for strip()'s
// quad transpose; each row is read as runs of the block's bytes (see block_avx512_m1).
constexpr int64_t kW1 = kStripAvx2M1;
constexpr int64_t kPairsInt16 = 32767 / 768;  // 42

// One 32 B strip of a block: int16 accumulator [h][s], int32 accumulator [h][s][L][t].
struct StripAcc {
  __m256i i16[8];
  alignas(32) int32_t i32[8][16];
};

// A strip of one row at src; a short last strip (kTail) reads its nb bytes through a zeroed copy,
// so it reads nothing past the row (zero bytes are code 0: no contribution).
template <bool kTail>
QSK_TARGET_AVX2 inline __attribute__((always_inline)) __m256i load_row(const uint8_t* src, int64_t nb) {
  if constexpr (kTail) {
    alignas(32) uint8_t buf[kW1] = {};
    std::memcpy(buf, src, static_cast<size_t>(nb));
    return _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
  } else {
    return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src));
  }
}

// The block start of each plan row of quads [q0, q0 + nq): computed once per chunk, not per strip.
inline void row_starts(const RowPlan& p, int64_t q0, int64_t nq, int64_t b0, const uint8_t** out) {
  for (int64_t i = 0; i < 4 * nq; ++i) out[i] = p.packed + static_cast<int64_t>(p.rows[4 * q0 + i]) * p.stride + b0;
}

// The chunk's rows (row starts cur, activations x4) over the strip at offset o of the block;
// next: the next chunk's row starts (n_next quads), whose lines of bytes [o, o + 64) this strip
// prefetches into L2 at even strips (two strips share a line; the strip-major prefetch of
// block_avx512_m1). flush: widen the int16 sums into the int32 ones afterwards (first: store
// them instead of adding) and restart.
template <bool kTail>
QSK_TARGET_AVX2 void block_strip_m1(const uint8_t* const* cur, const int32_t* x4, int64_t nq, const uint8_t* const* next,
                                    int64_t n_next, int64_t o, int64_t nb, bool flush, bool first, StripAcc& sa) {
  __m256i acc[8];
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) acc[i] = sa.i16[i];
  const bool fetch = o % 64 == 0;
  for (int64_t c = 0; c < nq; ++c) {
    if (fetch && c < n_next) {
#pragma GCC unroll 4
      for (int r = 0; r < 4; ++r) {
        const char* a = reinterpret_cast<const char*>(next[4 * c + r] + o);
        if (o == 0) _mm_prefetch(a, _MM_HINT_T1);
        _mm_prefetch(a + 63, _MM_HINT_T1);
      }
    }
    const auto xq = static_cast<uint32_t>(x4[c]);
    const uint8_t* const* rows = cur + 4 * c;
#pragma GCC unroll 2
    for (int pair = 0; pair < 2; ++pair) {
      const __m256i ra = load_row<kTail>(rows[2 * pair] + o, nb);
      const __m256i rb = load_row<kTail>(rows[2 * pair + 1] + o, nb);
      const __m256i x = _mm256_set1_epi16(static_cast<int16_t>(xq >> (16 * pair)));  // (x_a, x_b)
      const __m256i u[2] = {_mm256_unpacklo_epi8(ra, rb), _mm256_unpackhi_epi8(ra, rb)};
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        acc[4 * h + 0] = _mm256_add_epi16(acc[4 * h + 0], _mm256_maddubs_epi16(plane<0>(u[h]), x));
        acc[4 * h + 1] = _mm256_add_epi16(acc[4 * h + 1], _mm256_maddubs_epi16(plane<1>(u[h]), x));
        acc[4 * h + 2] = _mm256_add_epi16(acc[4 * h + 2], _mm256_maddubs_epi16(plane<2>(u[h]), x));
        acc[4 * h + 3] = _mm256_add_epi16(acc[4 * h + 3], _mm256_maddubs_epi16(plane<3>(u[h]), x));
      }
    }
  }
  if (flush) {
#pragma GCC unroll 8
    for (int i = 0; i < 8; ++i) {
      __m256i* dst = reinterpret_cast<__m256i*>(sa.i32[i]);
      const __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(acc[i]));
      const __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(acc[i], 1));
      _mm256_store_si256(dst, first ? lo : _mm256_add_epi32(_mm256_load_si256(dst), lo));
      _mm256_store_si256(dst + 1, first ? hi : _mm256_add_epi32(_mm256_load_si256(dst + 1), hi));
      acc[i] = _mm256_setzero_si256();
    }
  }
#pragma GCC unroll 8
  for (int i = 0; i < 8; ++i) sa.i16[i] = acc[i];
}

QSK_TARGET_AVX2 void block_m1(const RowPlan& p, int64_t b0, int64_t nbytes, int32_t* out, int64_t chunk) {
  if (p.n_quads == 0) {
    std::fill(out, out + 4 * nbytes, 0);
    return;
  }
  constexpr int64_t kMaxChunk = kPairsInt16 / 2;  // a chunk's pairs fit the int16 sums
  chunk = std::clamp<int64_t>(chunk, 1, kMaxChunk);
  const int64_t ns = (nbytes + kW1 - 1) / kW1;
  StripAcc sa[kMaxBlockAvx2 / kW1];
  for (int64_t s = 0; s < ns; ++s)
    for (auto& v : sa[s].i16) v = _mm256_setzero_si256();
  // The first chunk's lines.
  for (int64_t q = 0; q < std::min(chunk, p.n_quads); ++q)
    for (int r = 0; r < 4; ++r) {
      const char* a = reinterpret_cast<const char*>(p.packed + static_cast<int64_t>(p.rows[4 * q + r]) * p.stride + b0);
      for (int64_t l = 0; l < nbytes + 63; l += 64) _mm_prefetch(a + std::min(l, nbytes - 1), _MM_HINT_T0);
    }
  const uint8_t* starts[2][4 * kMaxChunk];  // this chunk's row starts and the next one's
  row_starts(p, 0, std::min(chunk, p.n_quads), b0, starts[0]);
  int64_t pending = 0;  // pairs in the int16 sums
  bool first = true;
  for (int64_t q0 = 0, i = 0; q0 < p.n_quads; q0 += chunk, i ^= 1) {
    const int64_t nq = std::min(chunk, p.n_quads - q0);
    const int64_t next_nq = std::min(chunk, p.n_quads - q0 - nq);
    row_starts(p, q0 + nq, next_nq, b0, starts[i ^ 1]);
    pending += 2 * nq;
    const bool flush = next_nq == 0 || pending + 2 * next_nq > kPairsInt16;
    for (int64_t s = 0; s < ns; ++s) {
      const int64_t nb = std::min(kW1, nbytes - kW1 * s);
      if (nb == kW1)
        block_strip_m1<false>(starts[i], p.x4 + q0, nq, starts[i ^ 1], next_nq, kW1 * s, nb, flush, first, sa[s]);
      else
        block_strip_m1<true>(starts[i], p.x4 + q0, nq, starts[i ^ 1], next_nq, kW1 * s, nb, flush, first, sa[s]);
    }
    if (flush) {
      pending = 0;
      first = false;
    }
  }
  // int32 sum [h][s][L][t] -> output 4p + s, p = 16L + 8h + t (see the top of this section).
  for (int64_t s = 0; s < ns; ++s) {
    const int64_t nb = std::min(kW1, nbytes - kW1 * s);
    int32_t* o = out + 4 * kW1 * s;
    for (int h = 0; h < 2; ++h)
      for (int L = 0; L < 2; ++L)
        for (int t = 0; t < 8; ++t) {
          const int pb = 16 * L + 8 * h + t;
          if (pb >= nb) continue;
          for (int c = 0; c < 4; ++c) o[4 * pb + c] = sa[s].i32[4 * h + c][8 * L + t];
        }
  }
}

}  // namespace

void block_avx2_m1(const RowPlan& plan, int64_t b0, int64_t nbytes, int32_t* acc, int64_t chunk_quads) {
  block_m1(plan, b0, nbytes, acc, chunk_quads);
}

void strip_avx2(const RowPlan& plan, int64_t b0, int64_t nbytes, int32_t* acc, int64_t ld, int32_t* scratch) {
  (void)nbytes;  // always kW: the caller overlaps a short last strip with the previous one
  strip(plan, b0, acc, ld, scratch);
}

}  // namespace qsk::cpu::ternary
