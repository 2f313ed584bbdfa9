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
#pragma GCC diagnostic ignored "-Wuninitialized"  // the same false positive, seen through 8-row fma_blocks

#include "qsk/cpu_common.h"
#include "qsk/isa.h"
#include "panel_avx512.h"
#include "sparse_gemv.h"

namespace qsk::cpu {
namespace {

// How many listed rows ahead the prefetches run: one group (a row's panel is 4..16 KB, so this
// is far enough ahead to cover the memory latency).
constexpr int64_t kPrefetchRows = 4;
// Listed rows accumulated per pass over the panel (the accumulators stay in registers meanwhile).
constexpr int kGroup = 4;

// ---- 32 columns <-> two float32 vectors, per weight dtype ----

QSK_TARGET_AVX512 inline void load_pair(const float* p, __mmask32 m, __m512& a, __m512& b) {
  a = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m), p);
  b = _mm512_maskz_loadu_ps(static_cast<__mmask16>(m >> 16), p + 16);
}

QSK_TARGET_AVX512 inline void load_pair(const c10::Half* p, __mmask32 m, __m512& a, __m512& b) {
  const __m512i v = _mm512_maskz_loadu_epi16(m, p);  // one 64-byte load, then two conversions
  a = _mm512_cvtph_ps(_mm512_castsi512_si256(v));
  b = _mm512_cvtph_ps(_mm512_extracti64x4_epi64(v, 1));
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
  permute_chunk(acc, _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23),
                _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31));
}

// The activation x[g][m] of fma_block: MB <= 4 rows hold them in registers across the panel;
// more rows broadcast each from memory next to its two FMAs, since their MB x 2 accumulators
// take half the registers.
template <int MB>
struct XRegs {
  const __m512 (*xb)[MB];
  QSK_TARGET_AVX512 inline __attribute__((always_inline)) __m512 operator()(int g, int m) const { return xb[g][m]; }
};
template <int MB>
struct XMem {
  const float* xv;  // [G][MB]
  QSK_TARGET_AVX512 inline __attribute__((always_inline)) __m512 operator()(int g, int m) const {
    return _mm512_set1_ps(xv[g * MB + m]);
  }
};

// The 32 weight columns of listed row g of fma_block, as two float32 vectors: WLoad converts them
// from the weight row when asked (just before their FMAs), WRegs hands out rows converted earlier.
template <typename T>
struct WLoad {
  const T* const* rows;
  int64_t off;
  __mmask32 cols;
  QSK_TARGET_AVX512 inline __attribute__((always_inline)) void operator()(int g, __m512& w0, __m512& w1) const {
    load_pair(rows[g] + off, cols, w0, w1);
  }
};
template <int G>
struct WRegs {
  const __m512 (&w)[G][2];
  QSK_TARGET_AVX512 inline __attribute__((always_inline)) void operator()(int g, __m512& w0, __m512& w1) const {
    w0 = w[g][0];
    w1 = w[g][1];
  }
};

// Rows M0 .. M0 + R - 1 of fma_block: acc[m][32 columns] += sum over g < G of x(g, m) * W(g), in
// g order, the accumulators in registers across the G rows (one load and one store per G rows).
template <int M0, int R, int G, typename W, typename X>
QSK_TARGET_AVX512 inline __attribute__((always_inline)) void fma_rows(const W& wrow, const X& x, float* acc,
                                                                      int64_t os) {
  __m512 a[R][2];
  load_rows<M0, R>(a, acc, os);
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) {
    __m512 w0, w1;
    wrow(g, w0, w1);
#pragma GCC unroll 8
    for (int m = 0; m < R; ++m) {
      const __m512 xg = x(g, M0 + m);
      a[m][0] = _mm512_fmadd_ps(xg, w0, a[m][0]);
      a[m][1] = _mm512_fmadd_ps(xg, w1, a[m][1]);
    }
  }
  store_rows<M0, R>(a, acc, os);
}

// acc[m][32 columns] += sum over g < G of x(g, m) * (32 weights at rows[g] + off), in g order.
// Up to 8 rows each weight row is converted just before its FMAs; more rows (2 x 8 x 2
// accumulators would take every register) convert the G weight rows first and then take the
// accumulators in two chunks of rows, each reusing the converted weights.
template <typename T, int MB, int G, typename X>
QSK_TARGET_AVX512 inline __attribute__((always_inline)) void fma_block(const T* const* rows, int64_t off,
                                                                       __mmask32 cols, const X& x, float* acc,
                                                                       int64_t os) {
  const WLoad<T> load{rows, off, cols};
  if constexpr (MB > 8) {
    __m512 w[G][2];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g) load(g, w[g][0], w[g][1]);
    fma_rows<0, 8, G>(WRegs<G>{w}, x, acc, os);
    fma_rows<8, MB - 8, G>(WRegs<G>{w}, x, acc, os);
  } else {
    fma_rows<0, MB, G>(load, x, acc, os);
  }
}

// Listed rows u0 .. u0 + G - 1 into the panel; prefetches rows pf[0 .. G) meanwhile.
template <typename T, int MB, int G>
QSK_TARGET_AVX512 inline void rows_into_panel(const T* base, int64_t ld, const SparseRows& r, int64_t u0,
                                              const char* const* pf, int64_t nfull, __mmask32 tail, float* out,
                                              int64_t os) {
  constexpr int kLinesPerBlock = 32 * sizeof(T) / 64;  // 1 for the half types, 2 for float32
  const T* rows[G];
#pragma GCC unroll 4
  for (int g = 0; g < G; ++g) rows[g] = base + static_cast<int64_t>(r.idx[u0 + g]) * ld;
  auto prefetch = [&](int64_t c) {
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 2
      for (int l = 0; l < kLinesPerBlock; ++l) _mm_prefetch(pf[g] + (c * kLinesPerBlock + l) * 64, _MM_HINT_T1);
  };
  auto run = [&](const auto& x) QSK_TARGET_AVX512 {
    for (int64_t c = 0; c < nfull; ++c) {
      prefetch(c);
      fma_block<T, MB, G>(rows, 32 * c, static_cast<__mmask32>(0xffffffffu), x, out + 32 * c, os);
    }
    if (tail) fma_block<T, MB, G>(rows, 32 * nfull, tail, x, out + 32 * nfull, os);
  };
  if constexpr (MB > 4) {
    run(XMem<MB>{r.vals + u0 * MB});
  } else {
    __m512 xb[G][MB];
#pragma GCC unroll 4
    for (int g = 0; g < G; ++g)
#pragma GCC unroll 4
      for (int m = 0; m < MB; ++m) xb[g][m] = _mm512_set1_ps(r.vals[(u0 + g) * MB + m]);
    run(XRegs<MB>{xb});
  }
}

template <typename T, int MB>
QSK_TARGET_AVX512 void panel(const T* wt, int64_t ld, const SparseRows& r, int64_t j0, int64_t ncols, float* out,
                             int64_t os) {
  const int64_t nfull = ncols / 32;
  const __mmask32 tail = tail_mask32(ncols - 32 * nfull);  // 0 when ncols % 32 == 0
  const int64_t nblocks = nfull + (tail != 0);
  for (int m = 0; m < MB; ++m) std::memset(out + m * os, 0, nblocks * 32 * sizeof(float));

  const T* base = wt + j0;
  // The row kPrefetchRows ahead of each row (the row itself near the end: harmless, no branch).
  auto pf_row = [&](int64_t u) {
    const int64_t v = u + kPrefetchRows < r.n ? u + kPrefetchRows : u;
    return reinterpret_cast<const char*>(base + static_cast<int64_t>(r.idx[v]) * ld);
  };
  // Rows in groups of kGroup (accumulators loaded and stored once per group), then the rest.
  int64_t u = 0;
  for (; u + kGroup <= r.n; u += kGroup) {
    const char* pf[kGroup];
    for (int g = 0; g < kGroup; ++g) pf[g] = pf_row(u + g);
    rows_into_panel<T, MB, kGroup>(base, ld, r, u, pf, nfull, tail, out, os);
  }
  for (; u < r.n; ++u) {
    const char* pf[1] = {pf_row(u)};
    rows_into_panel<T, MB, 1>(base, ld, r, u, pf, nfull, tail, out, os);
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
  with_block_rows(r.mb, [&]<int MB>() { panel<T, MB>(wt, ld, r, j0, ncols, out, os); });
}

template void sparse_gemv_panel_avx512<float>(const float*, int64_t, const SparseRows&, int64_t, int64_t, float*,
                                              int64_t);
template void sparse_gemv_panel_avx512<c10::BFloat16>(const c10::BFloat16*, int64_t, const SparseRows&, int64_t,
                                                      int64_t, float*, int64_t);
template void sparse_gemv_panel_avx512<c10::Half>(const c10::Half*, int64_t, const SparseRows&, int64_t, int64_t,
                                                  float*, int64_t);

}  // namespace qsk::cpu
