// AVX-512 strip kernels of the ternary GEMV (contract: csrc/include/qsk/cpu_ternary.h).
//
// One strip = 64 packed bytes of every plan row = 256 outputs. Per quad of plan rows:
//   1. load the strip of each of the 4 rows (one zmm each, masked for a short last strip);
//   2. byte-transpose them with two unpack levels so that every dword holds the same packed byte
//      of the 4 rows (the 4 input features of one output group);
//   3. split each byte into its 4 two-bit codes ((v >> 2s) & 3, s = output j % 4), giving
//      dwords (c0, c1, c2, c3) of one output over the 4 input features, as u8;
//   4. vpdpbusd with the quad's 4 int8 activations broadcast to every dword (x4 in RowPlan):
//      acc_j += c0 * x0 + c1 * x1 + c2 * x2 + c3 * x3, exact in int32.
// Without VNNI, step 4 is pmaddubsw (pairs to int16, at most 2 * 3 * 128 = 768: no saturation)
// then pmaddwd with ones (the two pairs to int32).
//
// Output order. unpack works inside each 128-bit lane L (bytes 16L..16L+15). After
//   ab_lo = unpacklo_epi8(a, b), ab_hi = unpackhi_epi8(a, b)   (same for c, d)
//   v[0] = unpacklo_epi16(ab_lo, cd_lo), v[1] = unpackhi_epi16(ab_lo, cd_lo),
//   v[2] = unpacklo_epi16(ab_hi, cd_hi), v[3] = unpackhi_epi16(ab_hi, cd_hi)
// dword t of lane L of v[g] holds byte p = 16L + 4g + t of rows (a, b, c, d), so accumulator
// 4g + s, dword 4L + t, is output 4p + s of the strip. store_natural undoes this once per strip.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "qsk/cpu_ternary.h"
#include "qsk/isa.h"

namespace qsk::cpu::ternary {
namespace {

constexpr int64_t kW = kStripAvx512;
template <bool kVnni>
QSK_TARGET_AVX512 inline __attribute__((always_inline)) __m512i dot4(__m512i acc, __m512i codes, __m512i x) {
  if constexpr (kVnni) {
    return _mm512_dpbusd_epi32(acc, codes, x);
  } else {
    const __m512i pairs = _mm512_maddubs_epi16(codes, x);
    return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
  }
}

// Steps 1-2: the strip of the 4 rows of quad q, byte-transposed into v[0..3] (see the top).
template <bool kTail>
QSK_TARGET_AVX512 inline __attribute__((always_inline)) void load_quad(const RowPlan& p, int64_t q, int64_t b0,
                                                                       __mmask64 mask, __m512i v[4]) {
  __m512i r[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const uint8_t* src = p.packed + static_cast<int64_t>(p.rows[4 * q + i]) * p.stride + b0;
    // A masked load never touches the bytes past the row end (fault suppression), so a short
    // last strip reads exactly its own bytes; masked-off bytes read as code 0 (no contribution).
    r[i] = kTail ? _mm512_maskz_loadu_epi8(mask, src) : _mm512_loadu_si512(src);
  }
  const __m512i ab_lo = _mm512_unpacklo_epi8(r[0], r[1]), ab_hi = _mm512_unpackhi_epi8(r[0], r[1]);
  const __m512i cd_lo = _mm512_unpacklo_epi8(r[2], r[3]), cd_hi = _mm512_unpackhi_epi8(r[2], r[3]);
  v[0] = _mm512_unpacklo_epi16(ab_lo, cd_lo);
  v[1] = _mm512_unpackhi_epi16(ab_lo, cd_lo);
  v[2] = _mm512_unpacklo_epi16(ab_hi, cd_hi);
  v[3] = _mm512_unpackhi_epi16(ab_hi, cd_hi);
}

// Step 3: code s of every byte, (byte >> 2s) & 3. The shift is per 16-bit word (AVX-512 has no
// byte shift), which drags the low bits of the next byte into the top of this one; the mask
// drops them.
template <int S>
QSK_TARGET_AVX512 inline __attribute__((always_inline)) __m512i plane(__m512i v) {
  const __m512i three = _mm512_set1_epi8(3);
  if constexpr (S == 0) return _mm512_and_si512(v, three);
  else return _mm512_and_si512(_mm512_srli_epi16(v, 2 * S), three);
}

// Step 3 without the shift (the VNNI kernels of M == 1): code s of every byte left in place,
// byte & (3 << 2s) = code * 4^s, one AND instead of a shift and an AND. vpdpbusd then accumulates
// 4^s times the true sum, and the store divides it back out (an exact arithmetic shift: every term
// is a multiple of 4^s). Valid codes give at most 2 * 64 = 128 per byte (u8 operand), and the
// accumulator of s = 3 stays below 2^31 while rows * 2 * 127 * 64 does: kScaledMaxRows.
template <int S>
QSK_TARGET_AVX512 inline __attribute__((always_inline)) __m512i plane_scaled(__m512i v) {
  return _mm512_and_si512(v, _mm512_set1_epi8(static_cast<char>(3 << (2 * S))));
}
constexpr int64_t kScaledMaxRows = (int64_t{1} << 31) / (2 * 127 * 64) - 4;

// Accumulator 4g + s, dword 4L + t -> output 4p + s, p = 16L + 4g + t (see the top); only the
// first nbytes packed bytes of the strip are written. acc is the accumulators stored in order;
// kScaled: accumulator 4g + s holds 4^s times its sum (plane_scaled).
template <bool kScaled = false>
inline void store_natural(const int32_t (*acc)[16], int64_t nbytes, int32_t* out) {
  for (int L = 0; L < 4; ++L)
    for (int g = 0; g < 4; ++g)
      for (int t = 0; t < 4; ++t) {
        const int p = 16 * L + 4 * g + t;
        if (p >= nbytes) continue;
        for (int s = 0; s < 4; ++s) out[4 * p + s] = kScaled ? acc[4 * g + s][4 * L + t] >> (2 * s)
                                                             : acc[4 * g + s][4 * L + t];
      }
}

// store_natural of a full strip (nbytes == kW) of the batch kernels, transposed in registers: for
// group g, the 4 x 4 dword blocks of accumulators 4g .. 4g + 3 (unpacks within lanes give R_t, whose
// lane L holds outputs 64L + 16g + 4t + s), then the 4 x 4 blocks of 128-bit lanes (R_t lane L ->
// the 16 outputs at 64L + 16g). (block_m1 keeps the scalar loop: inlined there, this one slowed it.)
QSK_TARGET_AVX512 inline void store_natural_strip(const __m512i* acc, int32_t* out) {
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
    const __m512i* a = acc + 4 * g;
    const __m512i t0 = _mm512_unpacklo_epi32(a[0], a[1]), t1 = _mm512_unpackhi_epi32(a[0], a[1]);
    const __m512i t2 = _mm512_unpacklo_epi32(a[2], a[3]), t3 = _mm512_unpackhi_epi32(a[2], a[3]);
    const __m512i r0 = _mm512_unpacklo_epi64(t0, t2), r1 = _mm512_unpackhi_epi64(t0, t2);
    const __m512i r2 = _mm512_unpacklo_epi64(t1, t3), r3 = _mm512_unpackhi_epi64(t1, t3);
    const __m512i u0 = _mm512_shuffle_i32x4(r0, r1, 0x44), u1 = _mm512_shuffle_i32x4(r0, r1, 0xEE);
    const __m512i u2 = _mm512_shuffle_i32x4(r2, r3, 0x44), u3 = _mm512_shuffle_i32x4(r2, r3, 0xEE);
    _mm512_storeu_si512(out + 16 * g, _mm512_shuffle_i32x4(u0, u2, 0x88));
    _mm512_storeu_si512(out + 64 + 16 * g, _mm512_shuffle_i32x4(u0, u2, 0xDD));
    _mm512_storeu_si512(out + 128 + 16 * g, _mm512_shuffle_i32x4(u1, u3, 0x88));
    _mm512_storeu_si512(out + 192 + 16 * g, _mm512_shuffle_i32x4(u1, u3, 0xDD));
  }
}

// M == 1 over a block of up to kMaxBlockAvx512 bytes per row (several strips): rows are visited in
// chunks of `chunk` quads, and for each chunk every strip of the block runs over the
// chunk's rows with its 16 accumulators in registers (parked in L1 between chunks). So each row is
// read as one run of up to kBlockAvx512 contiguous bytes within a short time, which DRAM serves far
// better than isolated lines; while strip s runs, line s of the next chunk's rows is prefetched
// into L2. (Measurements: qsk/cpu_ternary.h, kBlockAvx512.)
// Row-major prefetch of one chunk (the one after next) for short rows, spread over the strips
// and quads of the current chunk: every (strip, quad) step fetches the next per_step lines of the
// chunk's rows, row after row, each row's span line after line. A cursor, not an index: deriving
// (row, line) from a running index took two 64-bit divisions per line, which was half of the
// kernel's time once the weight was in cache.
struct RowMajorPrefetch {
  const RowPlan* p;
  int64_t q0;        // first quad of the chunk to prefetch
  int64_t rows;      // its plan rows (0: strip-major prefetch instead)
  int64_t b0;        // block start in each row
  int64_t nbytes;    // block width
  int64_t lines;     // lines of one row's block span, at most (a span may start mid-line)
  int64_t per_step;  // lines fetched per (strip, quad) step
  int64_t row = 0, line = 0;  // the next line to fetch
  uintptr_t first = 0, span = 0;  // the row's first line, and its span's end from there

  inline __attribute__((always_inline)) void step() {
    for (int64_t i = 0; i < per_step && row < rows; ++i) {
      if (line == 0) {
        const auto a = reinterpret_cast<uintptr_t>(p->packed + static_cast<int64_t>(p->rows[4 * q0 + row]) * p->stride + b0);
        first = a & ~uintptr_t{63};
        span = (a & 63) + static_cast<uintptr_t>(nbytes);
      }
      const auto off = 64 * static_cast<uintptr_t>(line);
      if (off < span) _mm_prefetch(reinterpret_cast<const char*>(first + off), _MM_HINT_T1);
      if (++line == lines) {
        line = 0;
        ++row;
      }
    }
  }
};

template <bool kVnni, bool kTail, bool kScaled>
QSK_TARGET_AVX512 inline __attribute__((always_inline)) void block_strip(const RowPlan& p, int64_t q0, int64_t nq,
                                                                         int64_t bs, int64_t nbytes,
                                                                         int32_t (*acc_mem)[16],
                                                                         RowMajorPrefetch& pf) {
  const __mmask64 mask = kTail ? _bzhi_u64(~0ull, static_cast<unsigned>(nbytes)) : ~0ull;
  __m512i acc[16];
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) acc[i] = _mm512_load_si512(acc_mem[i]);
  const int64_t next = q0 + nq;
  for (int64_t c = 0; c < nq; ++c) {
    if (pf.rows > 0) {
      pf.step();  // row-major: this (strip, quad)'s share of the chunk after next
    } else if (next + c < p.n_quads) {  // strip-major: this strip's line of the next chunk's rows, into L2
      for (int r = 0; r < 4; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(p.packed + static_cast<int64_t>(p.rows[4 * (next + c) + r]) * p.stride +
                                                   bs),
                     _MM_HINT_T1);
    }
    __m512i v[4];
    load_quad<kTail>(p, q0 + c, bs, mask, v);
    const __m512i x = _mm512_set1_epi32(p.x4[q0 + c]);
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      if constexpr (kScaled) {
        acc[4 * g + 0] = dot4<kVnni>(acc[4 * g + 0], plane_scaled<0>(v[g]), x);
        acc[4 * g + 1] = dot4<kVnni>(acc[4 * g + 1], plane_scaled<1>(v[g]), x);
        acc[4 * g + 2] = dot4<kVnni>(acc[4 * g + 2], plane_scaled<2>(v[g]), x);
        acc[4 * g + 3] = dot4<kVnni>(acc[4 * g + 3], plane_scaled<3>(v[g]), x);
      } else {
        acc[4 * g + 0] = dot4<kVnni>(acc[4 * g + 0], plane<0>(v[g]), x);
        acc[4 * g + 1] = dot4<kVnni>(acc[4 * g + 1], plane<1>(v[g]), x);
        acc[4 * g + 2] = dot4<kVnni>(acc[4 * g + 2], plane<2>(v[g]), x);
        acc[4 * g + 3] = dot4<kVnni>(acc[4 * g + 3], plane<3>(v[g]), x);
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < 16; ++i) _mm512_store_si512(acc_mem[i], acc[i]);
}

// kScaled (VNNI only, see plane_scaled): needs 4 * n_quads <= kScaledMaxRows.
template <bool kVnni, bool kScaled>
QSK_TARGET_AVX512 void block_m1(const RowPlan& p, int64_t b0, int64_t nbytes, int32_t* out, int64_t chunk,
                                bool row_major) {
  const int64_t ns = (nbytes + kW - 1) / kW;
  alignas(64) int32_t acc_mem[kMaxBlockAvx512 / kW][16][16];
  std::memset(acc_mem, 0, sizeof(int32_t) * 16 * 16 * ns);
  // row_major: prefetch whole spans row by row, two chunks ahead (see qsk/cpu_ternary.h); the
  // first chunks' runs are fetched here, later ones by earlier chunks.
  for (int64_t q = 0; q < std::min((row_major ? 2 : 1) * chunk, p.n_quads); ++q)
    for (int r = 0; r < 4; ++r)
      for (int64_t s = 0; s < ns; ++s)
        _mm_prefetch(reinterpret_cast<const char*>(p.packed + static_cast<int64_t>(p.rows[4 * q + r]) * p.stride + b0 +
                                                   kW * s),
                     _MM_HINT_T0);
  for (int64_t q0 = 0; q0 < p.n_quads; q0 += chunk) {
    const int64_t nq = std::min(chunk, p.n_quads - q0);
    const int64_t ahead = q0 + 2 * chunk;
    const int64_t pf_rows = row_major && ahead < p.n_quads ? 4 * std::min(chunk, p.n_quads - ahead) : 0;
    const int64_t lines = (63 + nbytes + 63) / 64;
    RowMajorPrefetch pf{&p, ahead, pf_rows, b0, nbytes, lines, (pf_rows * lines + ns * nq - 1) / (ns * nq)};
    for (int64_t s = 0; s < ns; ++s) {
      const int64_t nb = std::min(kW, nbytes - kW * s);
      if (nb == kW)
        block_strip<kVnni, false, kScaled>(p, q0, nq, b0 + kW * s, nb, acc_mem[s], pf);
      else
        block_strip<kVnni, true, kScaled>(p, q0, nq, b0 + kW * s, nb, acc_mem[s], pf);
    }
  }
  for (int64_t s = 0; s < ns; ++s)
    store_natural<kScaled>(acc_mem[s], std::min(kW, nbytes - kW * s), out + 4 * kW * s);
}

// The 64 B aligned start of a batch kernel's scratch (strip_scratch_words reserves the slack).
inline __m512i* aligned_scratch(int32_t* scratch) {
  return reinterpret_cast<__m512i*>((reinterpret_cast<uintptr_t>(scratch) + 63) & ~static_cast<uintptr_t>(63));
}

// Steps 1-3 for quads q0 .. q0 + nq - 1 of the strip at b0 (nbytes wide): code vector s of group g
// of chunk quad c (plane s of v[g]) to codes[g * sg + c * sc + s], prefetching kPrefetchQuads ahead.
template <bool kTail>
QSK_TARGET_AVX512 inline __attribute__((always_inline)) void decode_chunk(const RowPlan& p, int64_t q0, int64_t nq,
                                                                          int64_t b0, int64_t nbytes,
                                                                          const Prefetch& pf, __m512i* codes,
                                                                          int64_t sg, int64_t sc) {
  const __mmask64 mask = kTail ? _bzhi_u64(~0ull, static_cast<unsigned>(nbytes)) : ~0ull;
  for (int64_t c = 0; c < nq; ++c) {
    prefetch_quad(p, q0 + c + kPrefetchQuads, b0, pf);
    __m512i v[4];
    load_quad<kTail>(p, q0 + c, b0, mask, v);
#pragma GCC unroll 4
    for (int g = 0; g < 4; ++g) {
      __m512i* cc = codes + g * sg + c * sc;
      cc[0] = plane<0>(v[g]);
      cc[1] = plane<1>(v[g]);
      cc[2] = plane<2>(v[g]);
      cc[3] = plane<3>(v[g]);
    }
  }
}

// M > 1: decode kChunkQuads quads into scratch once, then every batch row runs its dot products
// over the decoded codes (so the decode cost is shared by the batch). Batch row m's accumulators
// live in scratch between chunks.
template <bool kVnni, bool kTail>
QSK_TARGET_AVX512 void strip_mn(const RowPlan& p, int64_t b0, int64_t nbytes, int32_t* out, int64_t ld,
                                int32_t* scratch) {
  __m512i* codes = aligned_scratch(scratch);  // [kChunkQuads][16]
  __m512i* pacc = codes + kChunkQuads * 16;   // [M][16]
  for (int64_t i = 0; i < p.M * 16; ++i) pacc[i] = _mm512_setzero_si512();
  const Prefetch pf = strip_prefetch(p, b0, kW);
  for (int64_t q = 0; q < kPrefetchQuads; ++q) prefetch_quad(p, q, b0, pf);
  for (int64_t q0 = 0; q0 < p.n_quads; q0 += kChunkQuads) {
    const int64_t nq = std::min(kChunkQuads, p.n_quads - q0);
    decode_chunk<kTail>(p, q0, nq, b0, nbytes, pf, codes, 4, 16);
    for (int64_t m = 0; m < p.M; ++m) {
      const int32_t* xm = p.x4 + m * p.n_quads + q0;
      __m512i a[16];
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) a[i] = pacc[16 * m + i];
      for (int64_t c = 0; c < nq; ++c) {
        if (xm[c] == 0) continue;  // row m dropped all 4 features of this quad
        const __m512i x = _mm512_set1_epi32(xm[c]);
#pragma GCC unroll 16
        for (int i = 0; i < 16; ++i) a[i] = dot4<kVnni>(a[i], codes[16 * c + i], x);
      }
#pragma GCC unroll 16
      for (int i = 0; i < 16; ++i) pacc[16 * m + i] = a[i];
    }
  }
  for (int64_t m = 0; m < p.M; ++m)
    nbytes == kW ? store_natural_strip(pacc + 16 * m, out + m * ld)
                 : store_natural(reinterpret_cast<const int32_t(*)[16]>(pacc + 16 * m), nbytes, out + m * ld);
}

// ---- M > 1 with VNNI: register tiles of batch rows (strip_tiled) ----
// strip_mn keeps one batch row's 16 accumulators in registers, so every vpdpbusd loads its codes
// from L1 (one 64-byte load per instruction, the load port's rate) and the accumulators go back to
// scratch every kChunkQuads quads. strip_tiled decodes kTiledChunkQuads quads into scratch, in
// four planes of 4 code vectors each (group g: accumulators 4g .. 4g + 3), then for each tile of
// up to kTileRows batch rows and each group runs all the chunk's quads with the tile's
// kTileRows x 4 accumulators in registers: per quad 4 code loads and kTileRows activation
// broadcasts for 4 x kTileRows vpdpbusd.
constexpr int kTileRows = 6;

// pacc[16 r + i] (+)= sum over the chunk's nq quads c of vpdpbusd(codes[4 c + i], the quad's
// activations of tile row r) for r < R, i < 4; first: the sums start from zero instead.
template <int R>
QSK_TARGET_AVX512 inline __attribute__((always_inline)) void tile_group(const __m512i* codes, int64_t nq,
                                                                        const int32_t* x4, int64_t ldx, __m512i* pacc,
                                                                        bool first) {
  __m512i a[R][4];
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) a[r][i] = first ? _mm512_setzero_si512() : pacc[16 * r + i];
  for (int64_t c = 0; c < nq; ++c) {
    const __m512i c0 = codes[4 * c], c1 = codes[4 * c + 1], c2 = codes[4 * c + 2], c3 = codes[4 * c + 3];
#pragma GCC unroll 6
    for (int r = 0; r < R; ++r) {
      const __m512i x = _mm512_set1_epi32(x4[r * ldx + c]);
      a[r][0] = _mm512_dpbusd_epi32(a[r][0], c0, x);
      a[r][1] = _mm512_dpbusd_epi32(a[r][1], c1, x);
      a[r][2] = _mm512_dpbusd_epi32(a[r][2], c2, x);
      a[r][3] = _mm512_dpbusd_epi32(a[r][3], c3, x);
    }
  }
#pragma GCC unroll 6
  for (int r = 0; r < R; ++r)
#pragma GCC unroll 4
    for (int i = 0; i < 4; ++i) pacc[16 * r + i] = a[r][i];
}

template <bool kTail>
QSK_TARGET_AVX512 void strip_tiled(const RowPlan& p, int64_t b0, int64_t nbytes, int32_t* out, int64_t ld,
                                   int32_t* scratch) {
  __m512i* codes = aligned_scratch(scratch);  // [4 groups][kTiledChunkQuads quads][4]
  __m512i* pacc = codes + kTiledChunkQuads * 16;  // [M][16]; the first chunk's tiles overwrite it
  if (p.n_quads == 0)
    for (int64_t i = 0; i < p.M * 16; ++i) pacc[i] = _mm512_setzero_si512();
  const Prefetch pf = strip_prefetch(p, b0, kW);
  for (int64_t q = 0; q < kPrefetchQuads; ++q) prefetch_quad(p, q, b0, pf);
  for (int64_t q0 = 0; q0 < p.n_quads; q0 += kTiledChunkQuads) {
    const int64_t nq = std::min(kTiledChunkQuads, p.n_quads - q0);
    decode_chunk<kTail>(p, q0, nq, b0, nbytes, pf, codes, 4 * kTiledChunkQuads, 4);
    for (int64_t m0 = 0; m0 < p.M; m0 += kTileRows) {
      const int rows = static_cast<int>(std::min<int64_t>(kTileRows, p.M - m0));
      const int32_t* x4 = p.x4 + m0 * p.n_quads + q0;
      for (int g = 0; g < 4; ++g) {
        const __m512i* cg = codes + 4 * g * kTiledChunkQuads;
        __m512i* pa = pacc + 16 * m0 + 4 * g;
        switch (rows) {
          case 1: tile_group<1>(cg, nq, x4, p.n_quads, pa, q0 == 0); break;
          case 2: tile_group<2>(cg, nq, x4, p.n_quads, pa, q0 == 0); break;
          case 3: tile_group<3>(cg, nq, x4, p.n_quads, pa, q0 == 0); break;
          case 4: tile_group<4>(cg, nq, x4, p.n_quads, pa, q0 == 0); break;
          case 5: tile_group<5>(cg, nq, x4, p.n_quads, pa, q0 == 0); break;
          default: tile_group<kTileRows>(cg, nq, x4, p.n_quads, pa, q0 == 0); break;
        }
      }
    }
  }
  for (int64_t m = 0; m < p.M; ++m)
    nbytes == kW ? store_natural_strip(pacc + 16 * m, out + m * ld)
                 : store_natural(reinterpret_cast<const int32_t(*)[16]>(pacc + 16 * m), nbytes, out + m * ld);
}

template <bool kVnni>
void strip_dispatch(const RowPlan& p, int64_t b0, int64_t nbytes, int32_t* acc, int64_t ld, int32_t* scratch) {
  if (p.M == 1) return block_m1<kVnni, false>(p, b0, nbytes, acc, kBlockRowQuads, false);  // a block of one strip
  if (runs_tiled(kVnni, p.M))
    return nbytes < kW ? strip_tiled<true>(p, b0, nbytes, acc, ld, scratch)
                       : strip_tiled<false>(p, b0, nbytes, acc, ld, scratch);
  nbytes < kW ? strip_mn<kVnni, true>(p, b0, nbytes, acc, ld, scratch)
              : strip_mn<kVnni, false>(p, b0, nbytes, acc, ld, scratch);
}

}  // namespace

void block_avx512_m1(const RowPlan& plan, int64_t b0, int64_t nbytes, bool vnni, int32_t* acc, int64_t chunk_quads,
                     bool row_major_prefetch) {
  if (!vnni) return block_m1<false, false>(plan, b0, nbytes, acc, chunk_quads, row_major_prefetch);
  4 * plan.n_quads <= kScaledMaxRows ? block_m1<true, true>(plan, b0, nbytes, acc, chunk_quads, row_major_prefetch)
                                     : block_m1<true, false>(plan, b0, nbytes, acc, chunk_quads, row_major_prefetch);
}

void strip_avx512(const RowPlan& plan, int64_t b0, int64_t nbytes, bool vnni, int32_t* acc, int64_t ld,
                  int32_t* scratch) {
  vnni ? strip_dispatch<true>(plan, b0, nbytes, acc, ld, scratch)
       : strip_dispatch<false>(plan, b0, nbytes, acc, ld, scratch);
}

}  // namespace qsk::cpu::ternary
