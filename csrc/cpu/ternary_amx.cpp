// AMX-INT8 batch kernel of the ternary GEMM (contract: csrc/include/qsk/cpu_ternary.h, tiles_amx).
//
// Tiles (palette 1, every tile 16 rows x 64 bytes):
//   A = 16 batch rows x 64 plan rows of int8 activations (AmxOperands.xa, one row per batch row);
//   B = 16 quads of plan rows x 16 outputs, each dword the 4 int8 weights t = code - 1 of one output
//       over the quad's 4 plan rows (the VNNI layout tdpbssd wants);
//   C = 16 batch rows x 16 outputs, int32:  C[m][n] += sum_{c, r} A[m][4c + r] * B[c][4n + r].
// With t in {-1, 0, 1} and |x_q| <= 127 every partial sum stays within 127 * d <= INT32_MAX
// (d <= kMaxTernaryD): no wrap-around, and C is x_q @ t^T itself (the epilogue subtracts nothing).
//
// Decode. One strip = 64 packed bytes (256 outputs) of each plan row. A quad of plan rows is
// loaded and byte-transposed exactly as in the AVX-512 kernel (csrc/cpu/ternary_strip_avx512.cpp,
// load_quad): vector 4g + s (code s of v[g]) has in dword 4L + t the 4 codes of output 4p + s,
// p = 16L + 4g + t, over the quad's rows; minus 1 it is row c of B tile j = 4g + s. So a strip
// is 16 B tiles per 16 quads, and tile column 4L + t of tile 4g + s is output 4p + s.
// A call covers a block of up to kAmxBlockStrips strips. Each chunk of kAmxChunkBlocks x 16 quads
// is decoded once into scratch, every quad across the whole block (each row read as one run),
// then every batch row block runs its tile products over it, strip by strip: the decode is shared
// by the whole batch.
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "qsk/cpu_ternary.h"
#include "qsk/isa.h"

namespace qsk::cpu::ternary {
namespace {

constexpr int64_t kW = kStripAvx512;
constexpr int64_t kTile = 1024;  // bytes of one 16 x 64 B tile

struct alignas(64) TileConfig {
  uint8_t palette = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

// Steps 1-2 of the AVX-512 kernel, then B rows: codes - 1 (t), tile 4g + s, row `row`.
template <bool kTail>
QSK_TARGET_AMX_INT8 inline __attribute__((always_inline)) void decode_quad(const RowPlan& p, int64_t q, int64_t b0,
                                                                           __mmask64 mask, int8_t* bt, int64_t row) {
  __m512i r[4];
#pragma GCC unroll 4
  for (int i = 0; i < 4; ++i) {
    const uint8_t* src = p.packed + static_cast<int64_t>(p.rows[4 * q + i]) * p.stride + b0;
    // Masked: never reads past the row end; masked-off bytes give outputs that are not stored.
    r[i] = kTail ? _mm512_maskz_loadu_epi8(mask, src) : _mm512_loadu_si512(src);
  }
  const __m512i ab_lo = _mm512_unpacklo_epi8(r[0], r[1]), ab_hi = _mm512_unpackhi_epi8(r[0], r[1]);
  const __m512i cd_lo = _mm512_unpacklo_epi8(r[2], r[3]), cd_hi = _mm512_unpackhi_epi8(r[2], r[3]);
  const __m512i v[4] = {_mm512_unpacklo_epi16(ab_lo, cd_lo), _mm512_unpackhi_epi16(ab_lo, cd_lo),
                        _mm512_unpacklo_epi16(ab_hi, cd_hi), _mm512_unpackhi_epi16(ab_hi, cd_hi)};
  const __m512i three = _mm512_set1_epi8(3), one = _mm512_set1_epi8(1);
#pragma GCC unroll 4
  for (int g = 0; g < 4; ++g) {
#pragma GCC unroll 4
    for (int s = 0; s < 4; ++s) {
      const __m512i codes = _mm512_and_si512(s == 0 ? v[g] : _mm512_srli_epi16(v[g], 2 * s), three);
      _mm512_store_si512(bt + (4 * g + s) * kTile + 64 * row, _mm512_sub_epi8(codes, one));
    }
  }
}

// C tiles of batch row blocks [mb, mb + kMT) x tiles [j, j + 2) over kb K-blocks of the chunk.
// Registers: C tmm0..3 (C[i][n] = tmm 2i + n), A tmm4..5, B tmm6..7.
template <int kMT>
QSK_TARGET_AMX_INT8 inline __attribute__((always_inline)) void tile_block(const int8_t* xa, int64_t lda, int64_t mb,
                                                                          int64_t kb0, int64_t nkb, const int8_t* bt,
                                                                          int32_t* cbuf, int64_t j, bool first) {
  int32_t* c0 = cbuf + (mb * 16 + j) * 256;  // C tile (mb, j); (mb, j + 1) follows, (mb + 1, j) is 16 tiles on
  if (first) {
    _tile_zero(0);
    _tile_zero(1);
    if constexpr (kMT == 2) {
      _tile_zero(2);
      _tile_zero(3);
    }
  } else {
    _tile_loadd(0, c0, 64);
    _tile_loadd(1, c0 + 256, 64);
    if constexpr (kMT == 2) {
      _tile_loadd(2, c0 + 16 * 256, 64);
      _tile_loadd(3, c0 + 17 * 256, 64);
    }
  }
  for (int64_t kb = 0; kb < nkb; ++kb) {
    const int8_t* a = xa + mb * 16 * lda + (kb0 + kb) * 64;
    const int8_t* b = bt + (kb * 16 + j) * kTile;
    _tile_loadd(4, a, lda);
    _tile_loadd(6, b, 64);
    _tile_loadd(7, b + kTile, 64);
    _tile_dpbssd(0, 4, 6);
    _tile_dpbssd(1, 4, 7);
    if constexpr (kMT == 2) {
      _tile_loadd(5, a + 16 * lda, lda);
      _tile_dpbssd(2, 5, 6);
      _tile_dpbssd(3, 5, 7);
    }
  }
  _tile_stored(0, c0, 64);
  _tile_stored(1, c0 + 256, 64);
  if constexpr (kMT == 2) {
    _tile_stored(2, c0 + 16 * 256, 64);
    _tile_stored(3, c0 + 17 * 256, 64);
  }
}

// The block runs [b0, b0 + nbytes) of the 4 rows of quad q, into L1.
QSK_TARGET_AMX_INT8 inline __attribute__((always_inline)) void prefetch_runs(const RowPlan& p, int64_t q, int64_t b0,
                                                                             int64_t nbytes) {
  for (int r = 0; r < 4; ++r) {
    const auto a = reinterpret_cast<uintptr_t>(p.packed + static_cast<int64_t>(p.rows[4 * q + r]) * p.stride + b0);
    for (uintptr_t l = a & ~uintptr_t{63}; l < a + static_cast<uintptr_t>(nbytes); l += 64)
      _mm_prefetch(reinterpret_cast<const char*>(l), _MM_HINT_T0);
  }
}

// Blocks of up to kAmxBlockStrips strips: every chunk decodes each quad's rows across the whole
// block (runs of up to kAmxBlockStrips x 64 contiguous bytes per row), prefetching the runs of the
// quad kPrefetchQuads ahead, then each strip of the block runs its tile products over the chunk.
QSK_TARGET_AMX_INT8 void block(const AmxOperands& o, int64_t mb0, int64_t nmb, int64_t b0, int64_t nbytes, int32_t* out,
                               int64_t ld, int8_t* scratch) {
  const RowPlan& p = o.plan;
  const int64_t ns = (nbytes + kW - 1) / kW;
  const int64_t tail = nbytes - kW * (ns - 1);  // bytes of the last strip, 1..64
  const __mmask64 tail_mask = _bzhi_u64(~0ull, static_cast<unsigned>(tail));
  const auto base = (reinterpret_cast<uintptr_t>(scratch) + 63) & ~static_cast<uintptr_t>(63);
  int8_t* bt = reinterpret_cast<int8_t*>(base);  // [ns][kAmxChunkBlocks][16 tiles]
  int32_t* cbuf = reinterpret_cast<int32_t*>(bt + kAmxBlockStrips * kAmxChunkBlocks * 16 * kTile);  // [ns][nmb][16 tiles]
  const int64_t bt_strip = kAmxChunkBlocks * 16 * kTile, c_strip = nmb * 16 * 256;
  const int8_t* xa = o.xa + mb0 * 16 * o.lda;
  const int64_t nkb_all = p.n_quads / 16;
  if (nkb_all == 0) std::memset(cbuf, 0, sizeof(int32_t) * c_strip * ns);  // no kept rows: acc = 0
  for (int64_t kb0 = 0; kb0 < nkb_all; kb0 += kAmxChunkBlocks) {
    const int64_t nkb = std::min(kAmxChunkBlocks, nkb_all - kb0);
    for (int64_t c = 0; c < 16 * nkb; ++c) {
      const int64_t q = 16 * kb0 + c;
      if (q + kPrefetchQuads < p.n_quads) prefetch_runs(p, q + kPrefetchQuads, b0, nbytes);
      int8_t* dst = bt + (c / 16) * 16 * kTile;
      for (int64_t s = 0; s + 1 < ns; ++s) decode_quad<false>(p, q, b0 + kW * s, ~0ull, dst + s * bt_strip, c % 16);
      if (tail == kW) decode_quad<false>(p, q, b0 + kW * (ns - 1), ~0ull, dst + (ns - 1) * bt_strip, c % 16);
      else decode_quad<true>(p, q, b0 + kW * (ns - 1), tail_mask, dst + (ns - 1) * bt_strip, c % 16);
    }
    for (int64_t s = 0; s < ns; ++s) {
      const int8_t* bs = bt + s * bt_strip;
      int32_t* cs = cbuf + s * c_strip;
      int64_t mb = 0;
      for (; mb + 2 <= nmb; mb += 2)
        for (int64_t j = 0; j < 16; j += 2) tile_block<2>(xa, o.lda, mb, kb0, nkb, bs, cs, j, kb0 == 0);
      if (mb < nmb)
        for (int64_t j = 0; j < 16; j += 2) tile_block<1>(xa, o.lda, mb, kb0, nkb, bs, cs, j, kb0 == 0);
    }
  }
  // Tile column 4L + t of tile 4g + s -> output 4p + s, p = 16L + 4g + t; only bytes p < nbytes.
  for (int64_t st = 0; st < ns; ++st) {
    const int64_t nb = st + 1 < ns ? kW : tail;
    for (int64_t mb = 0; mb < nmb; ++mb)
      for (int g = 0; g < 4; ++g)
        for (int s = 0; s < 4; ++s) {
          const int32_t* c = cbuf + st * c_strip + (mb * 16 + 4 * g + s) * 256;
          for (int r = 0; r < 16; ++r) {
            int32_t* o_row = out + (mb * 16 + r) * ld + 4 * kW * st;
            for (int L = 0; L < 4; ++L)
              for (int t = 0; t < 4; ++t) {
                const int64_t pb = 16 * L + 4 * g + t;
                if (pb < nb) o_row[4 * pb + s] = c[16 * r + 4 * L + t];
              }
          }
        }
  }
}

}  // namespace

int64_t amx_scratch_bytes(int64_t nmb) { return kAmxBlockStrips * (kAmxChunkBlocks * 16 + nmb * 16) * kTile + 64; }

QSK_TARGET_AMX_INT8 void tiles_amx(const AmxOperands& o, int64_t mb0, int64_t nmb, int64_t b0, int64_t nbytes, int32_t* out, int64_t ld,
               int8_t* scratch) {
  TileConfig cfg;
  for (int i = 0; i < 8; ++i) {
    cfg.colsb[i] = 64;
    cfg.rows[i] = 16;
  }
  _tile_loadconfig(&cfg);
  block(o, mb0, nmb, b0, nbytes, out, ld, scratch);
  _tile_release();
}

}  // namespace qsk::cpu::ternary
