// The batched bf16 sparse_linear on AMX-BF16 tiles (contract in sparse_gemv.h), over packed weight
// panels. (CPUs with AVX512-BF16 but no AMX run the vdpbf16ps GEMV panels instead:
// sparse_gemv_avx512bf16.cpp.)
//
// 1. Each row selects its k features; the kept list is the union over all M rows, ascending (for
//    M >= 8 at sparsity 0.5 that is nearly every feature, so this is per-token masking of a
//    dense product). A = [Mp][Kp] bf16: row m's value for each listed feature (0 where row m
//    dropped it), zero padded to Mp = 16 rows per tile and Kp = 32 features per tile step.
// 2. Output columns in panels of ~N / threads (Blocking), one or more per thread; each panel's
//    M x cols float32 sums live in a buffer while the listed features go by in blocks of
//    `depth`. Per block, the listed weight rows (contiguous in the column-major weight: a panel
//    is a run of up to 1 KB of each row) are packed
//    into the pair-interleaved ("VNNI") order tdpbf16ps reads: for 16 columns, features
//    2p and 2p + 1 of each column side by side. The packed block (~512 KB) stays in L2 while every row
//    block reads it; it is the only copy of weight data, per thread and transient.
// 3. Every output element sums its products in float32 over ascending tile steps of 32 listed
//    features (the hardware's order inside a step), then adds the bias in float32 and rounds to
//    bf16 once. That order depends on the listed features only: not on N, the column's position,
//    the panel, or the thread count.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "qsk/cpu_common.h"
#include "qsk/cpu_select.h"
#include "qsk/isa.h"
#include "sparse_gemv.h"

namespace qsk::cpu {
namespace {

constexpr int64_t kStep = 32;             // features per tile step (one A tile row: 64 bytes)
constexpr int64_t kPrefetchPairs = 4;     // how far ahead pack_block prefetches weight rows
constexpr int64_t kMaxPanel = 512;        // output columns per panel at most
constexpr int64_t kPackBytes = 512 << 10;  // packed block size the depth aims at (stays in L2)
constexpr int64_t kMaxDepth = 1024;       // listed features per packed block at most

// How the output columns and listed features are cut: panels of `cols` output columns (a
// multiple of 64, at most kMaxPanel: 1 KB runs of each weight row), blocks of
// `depth` listed features (a multiple of kStep) so that a packed block stays in L2, and `ps`
// elements per feature pair of a packed block (2 cols + 32: the padding line keeps a B tile's 16
// rows off a single L1 set).
struct Blocking {
  int64_t cols, depth, ps;
};
inline int64_t round_up(int64_t v, int64_t m) { return (v + m - 1) / m * m; }
inline Blocking blocking(int64_t N, int64_t threads) {
  const int64_t cols = std::min(kMaxPanel, round_up((N + threads - 1) / threads, 64));
  const int64_t depth = std::clamp<int64_t>(kPackBytes / (2 * cols) / kStep * kStep, kStep, kMaxDepth);
  return {cols, depth, 2 * cols + 32};
}

// packed[p][g][2 c + h] = weight row idx[u0 + 2 p + h], column j0 + 16 g + c (0 past n or N);
// for p < kc / 2, g < bk.cols / 16, c < 16, h < 2 (groups past the last 64 columns of N are left
// unwritten and never read). Reads no weight element outside [j0, N). Pair-major, so the stores
// are one sequential stream (group-major put 16 streams 8 KB apart into the same L1 sets).
QSK_TARGET_AVX512 void pack_block(const uint16_t* wt, int64_t ld, const int32_t* idx, int64_t n, int64_t u0,
                                  int64_t kc, int64_t j0, int64_t N, const Blocking& bk, uint16_t* packed) {
  const __m512i even = _mm512_setr_epi32(0x200000, 0x210001, 0x220002, 0x230003, 0x240004, 0x250005, 0x260006,
                                         0x270007, 0x280008, 0x290009, 0x2a000a, 0x2b000b, 0x2c000c, 0x2d000d,
                                         0x2e000e, 0x2f000f);  // a[c], b[c] for c < 16
  const __m512i odd = _mm512_add_epi16(even, _mm512_set1_epi16(16));  // a[16 + c], b[16 + c]
  const int64_t nchunks = std::min<int64_t>(bk.cols / 32, 2 * ((N - j0 + 63) / 64));
  for (int64_t p = 0; p < kc / 2; ++p) {
    const int64_t u = u0 + 2 * p;
    const uint16_t* r0 = u < n ? wt + static_cast<int64_t>(idx[u]) * ld + j0 : nullptr;
    const uint16_t* r1 = u + 1 < n ? wt + static_cast<int64_t>(idx[u + 1]) * ld + j0 : nullptr;
    uint16_t* dst = packed + p * bk.ps;
    // The rows kPrefetchPairs pairs ahead: their addresses are data dependent and each is a
    // separate 512-byte run, too short for the hardware prefetchers to get going.
    for (int h = 0; h < 2; ++h) {
      const int64_t v = u + 2 * kPrefetchPairs + h;
      if (v < n) {
        const char* r = reinterpret_cast<const char*>(wt + static_cast<int64_t>(idx[v]) * ld + j0);
        for (int64_t q = 0; q < nchunks; ++q) _mm_prefetch(r + 64 * q, _MM_HINT_T0);
      }
    }
    for (int64_t q = 0; q < nchunks; ++q) {
      const __mmask32 m = tail_mask32(N - j0 - 32 * q);
      const __m512i a = r0 ? _mm512_maskz_loadu_epi16(m, r0 + 32 * q) : _mm512_setzero_si512();
      const __m512i b = r1 ? _mm512_maskz_loadu_epi16(m, r1 + 32 * q) : _mm512_setzero_si512();
      _mm512_storeu_si512(dst + 64 * q, _mm512_permutex2var_epi16(a, even, b));
      _mm512_storeu_si512(dst + 64 * q + 32, _mm512_permutex2var_epi16(a, odd, b));
    }
  }
}

// acc[m][j] (+ bias) -> y[m][j0 + j] for m < rows, j < min(cols, N - j0).
inline void store_rows(const float* acc, int64_t rows, int64_t cols, const c10::BFloat16* bias, c10::BFloat16* y,
                       int64_t N, int64_t j0) {
  const int64_t nc = std::min(cols, N - j0);
  for (int64_t m = 0; m < rows; ++m) {
    c10::BFloat16* yr = y + m * N + j0;
    const float* o = acc + m * cols;
    for (int64_t j = 0; j < nc; ++j)
      yr[j] = static_cast<c10::BFloat16>(bias ? o[j] + static_cast<float>(bias[j0 + j]) : o[j]);
  }
}

// ---- AMX-BF16: 32 x 32 output blocks (tiles 0-3 accumulate, 4-5 hold A, 6-7 hold B) ----

// Palette 1, tiles 0-7 all 16 rows x 64 bytes. A constant in memory: GCC 12 does not treat
// _tile_loadconfig as reading its argument and drops the stores of a stack-built configuration.
struct alignas(64) TileConfig {
  uint8_t palette;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};
constexpr TileConfig kTileConfig = {1, 0, {}, {64, 64, 64, 64, 64, 64, 64, 64}, {16, 16, 16, 16, 16, 16, 16, 16}};
static_assert(sizeof(TileConfig) == 64, "AMX tile configuration is 64 bytes");

QSK_TARGET_AMX_BF16 void amx_configure() { _tile_loadconfig(&kTileConfig); }
QSK_TARGET_AMX_BF16 void amx_release() { _tile_release(); }

// acc[MH * 16][32] (row stride bk.cols) += a[MH * 16][kc] (row stride lda) times packed groups b0, b1.
template <int MH>
QSK_TARGET_AMX_BF16 void amx_block(const uint16_t* a, int64_t lda, int64_t kc, const uint16_t* b0, const uint16_t* b1,
                                   const Blocking& bk, float* acc) {
  const int64_t cs = bk.cols * 4, bs = bk.ps * 2;  // accumulator and packed row strides, bytes
  const int64_t ldc = bk.cols;
  _tile_loadd(0, acc, cs);
  _tile_loadd(1, acc + 16, cs);
  if constexpr (MH == 2) {
    _tile_loadd(2, acc + 16 * ldc, cs);
    _tile_loadd(3, acc + 16 * ldc + 16, cs);
  }
  for (int64_t s = 0; s < kc / kStep; ++s) {
    _tile_loadd(4, a + s * kStep, lda * 2);
    _tile_loadd(6, b0 + s * (kStep / 2) * bk.ps, bs);
    _tile_loadd(7, b1 + s * (kStep / 2) * bk.ps, bs);
    _tile_dpbf16ps(0, 4, 6);
    _tile_dpbf16ps(1, 4, 7);
    if constexpr (MH == 2) {
      _tile_loadd(5, a + 16 * lda + s * kStep, lda * 2);
      _tile_dpbf16ps(2, 5, 6);
      _tile_dpbf16ps(3, 5, 7);
    }
  }
  _tile_stored(0, acc, cs);
  _tile_stored(1, acc + 16, cs);
  if constexpr (MH == 2) {
    _tile_stored(2, acc + 16 * ldc, cs);
    _tile_stored(3, acc + 16 * ldc + 16, cs);
  }
}

// acc[Mp][bk.cols] += A[:, u0 .. u0 + kc) times the packed block (columns j0 .. N only).
QSK_TARGET_AMX_BF16 void amx_depth(const uint16_t* A, int64_t Mp, int64_t lda, int64_t u0, int64_t kc,
                                   const uint16_t* packed, int64_t N, int64_t j0, const Blocking& bk, float* acc) {
  const int64_t nsub = std::min<int64_t>(bk.cols / 32, (N - j0 + 31) / 32);
  for (int64_t m0 = 0; m0 < Mp; m0 += 32) {
    const uint16_t* a = A + m0 * lda + u0;
    for (int64_t sub = 0; sub < nsub; ++sub) {
      const uint16_t* b0 = packed + 64 * sub;
      float* c = acc + m0 * bk.cols + 32 * sub;
      if (Mp - m0 >= 32)
        amx_block<2>(a, lda, kc, b0, b0 + 32, bk, c);
      else
        amx_block<1>(a, lda, kc, b0, b0 + 32, bk, c);
    }
  }
}

}  // namespace
void sparse_linear_bf16_batch(const c10::BFloat16* x, int64_t M, int64_t d, int64_t k, const c10::BFloat16* wt,
                              int64_t ld, const c10::BFloat16* bias, c10::BFloat16* y, int64_t N,
                              const int32_t* kept) {
  // 1. The union of the rows' kept features and the A panel.
  std::vector<int32_t> idx;
  std::vector<int32_t> own;  // the selection, when the caller has none
  if (k == d) {
    idx.resize(d);
    for (int64_t i = 0; i < d; ++i) idx[i] = static_cast<int32_t>(i);
  } else {
    if (kept == nullptr) {
      own.resize(static_cast<size_t>(M * k));
      at::parallel_for(0, M, 1, [&](int64_t r0, int64_t r1) {
        std::vector<uint32_t> scratch(select_scratch_words(d));
        for (int64_t r = r0; r < r1; ++r) select_topk(x + r * d, d, k, own.data() + r * k, scratch.data());
      });
      kept = own.data();
    }
    std::vector<uint8_t> listed(d, 0);
    for (int64_t j = 0; j < M * k; ++j) listed[kept[j]] = 1;
    for (int64_t i = 0; i < d; ++i)
      if (listed[i]) idx.push_back(static_cast<int32_t>(i));
  }
  const int64_t n = static_cast<int64_t>(idx.size());
  const int64_t Kp = round_up(n, kStep), Mp = round_up(M, 16);
  const int64_t lda = Kp + 32;  // A's row stride: not a power of two, so a tile's 16 rows spread over the L1 sets
  std::vector<uint16_t> A(static_cast<size_t>(Mp * lda), 0);
  const uint16_t* xb = reinterpret_cast<const uint16_t*>(x);
  if (k == d) {
    for (int64_t m = 0; m < M; ++m) std::memcpy(A.data() + m * lda, xb + m * d, d * sizeof(uint16_t));
  } else {
    std::vector<int32_t> pos(d, -1);
    for (int64_t u = 0; u < n; ++u) pos[idx[u]] = static_cast<int32_t>(u);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t j = 0; j < k; ++j) {
        const int32_t i = kept[m * k + j];
        A[m * lda + pos[i]] = xb[m * d + i];
      }
  }
  // 2. Panels of output columns over the threads; the listed features in blocks of bk.depth.
  const uint16_t* w = reinterpret_cast<const uint16_t*>(wt);
  const Blocking bk = blocking(N, std::max(1, at::get_num_threads()));
  const int64_t npanels = (N + bk.cols - 1) / bk.cols;
  at::parallel_for(0, npanels, 1, [&](int64_t p0, int64_t p1) {
    std::vector<uint16_t> packed(static_cast<size_t>(bk.depth / 2 * bk.ps));
    std::vector<float> acc(static_cast<size_t>(Mp * bk.cols));
    amx_configure();
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t j0 = p * bk.cols;
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t u0 = 0; u0 < Kp; u0 += bk.depth) {
        const int64_t kc = std::min(bk.depth, Kp - u0);
        pack_block(w, ld, idx.data(), n, u0, kc, j0, N, bk, packed.data());
        amx_depth(A.data(), Mp, lda, u0, kc, packed.data(), N, j0, bk, acc.data());
      }
      store_rows(acc.data(), M, bk.cols, bias, y, N, j0);
    }
    amx_release();
  });
}

}  // namespace qsk::cpu
