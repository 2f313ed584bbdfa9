// The row-sparse batch path of sparse_linear on AVX2 (contract in sparse_gemv.h): every activation
// row multiplies only its own kept features, so a batch does (k / d) of a dense GEMM's FMAs.
//
// Above the GEMV blocks (sparse_max_rows) the rows of a batch keep different features, and the
// union of 16 rows' kept sets is nearly every feature: the block GEMV then does a dense GEMM's
// FMAs (zeros included) without a GEMM's register blocking, so fp32 batches went to MKL on the
// masked activations, which cannot beat dense either (0.89-0.99x at M >= 64 on Zen 3). Here the
// weight is taken in tiles of kTileFeatures features x kTileOutputs outputs, copied (as float32)
// into a contiguous L1-resident buffer once per call, and every row runs its kept features of the
// tile against it: per kept feature one broadcast and 8 FMAs into the row's 64 accumulators
// (8 ymm), which is FMA-bound, a GEMM's rate on (k / d) of its work.
//
// Loops: output panels of kTileOutputs (over the threads) > groups of kGroupTiles tiles, copied
// into an L2-resident buffer (the next group prefetched meanwhile) > blocks of kRowBlock rows >
// tiles > rows > the row's kept features in the tile, ascending. A tile and a block's
// accumulators fit L1 together: with all M rows' accumulators in the loop instead, the tile fell
// out of L1 and the FMAs waited on L2 (half the rate, 2048 x 2048, M = 256).
// Each output is the float32 sum over the row's kept features in ascending order, one FMA each,
// as the block GEMV computes it: the result does not depend on N, the panel, the thread count
// or the batch's other rows.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <vector>

#include "qsk/avx2_lanes.h"
#include "qsk/isa.h"
#include "sparse_gemv.h"

namespace qsk::cpu {
namespace {

constexpr int64_t kTileOutputs = 64;   // one row's accumulators: 8 ymm
constexpr int64_t kTileFeatures = 64;  // 64 x 64 float32 = 16 KB of weights, L1-resident
constexpr int64_t kGroupTiles = 8;     // tiles copied at once: 128 KB of float32, L2-resident
constexpr int64_t kRowBlock = 32;      // rows whose accumulators (8 KB) stay in L1 next to a tile

// Features [i0, i0 + ni) x outputs [j0, j0 + nc) of the weight as float32 [ni][kTileOutputs], zero
// padded past nc: the tiles of a group, one after the other. Reads nothing outside those rows and
// columns.
template <typename T>
QSK_TARGET_AVX2 void load_group(const T* wt, int64_t ld, int64_t i0, int64_t ni, int64_t j0, int64_t nc, float* dst) {
  for (int64_t r = 0; r < ni; ++r) {
    const T* src = wt + (i0 + r) * ld + j0;
    float* row = dst + r * kTileOutputs;
    int64_t c = 0;
    for (; c + 8 <= nc; c += 8) _mm256_storeu_ps(row + c, load8(src + c));
    for (; c < nc; ++c) row[c] = static_cast<float>(src[c]);
    for (; c < kTileOutputs; ++c) row[c] = 0.0f;
  }
}

// Brings the lines of weight rows [i0, i0 + ni), columns [j0, j0 + nc) into L2.
template <typename T>
inline void prefetch_rows(const T* wt, int64_t ld, int64_t i0, int64_t ni, int64_t j0, int64_t nc) {
  const int64_t bytes = nc * static_cast<int64_t>(sizeof(T));
  for (int64_t r = 0; r < ni; ++r) {
    const char* src = reinterpret_cast<const char*>(wt + (i0 + r) * ld + j0);
    for (int64_t b = 0; b < bytes; b += 64) _mm_prefetch(src + b, _MM_HINT_T1);
    _mm_prefetch(src + bytes - 1, _MM_HINT_T1);  // the last line when the row is not line aligned
  }
}

// acc[0 .. 64) += sum over u in [u0, u1) of xv[u] * tile[feat[u] - i0][0 .. 64), in u order.
QSK_TARGET_AVX2 inline void row_tile(const int32_t* feat, const float* xv, int64_t u0, int64_t u1, int64_t i0,
                                     const float* tile, float* acc) {
  __m256 a[8];
#pragma GCC unroll 8
  for (int c = 0; c < 8; ++c) a[c] = _mm256_loadu_ps(acc + 8 * c);
  for (int64_t u = u0; u < u1; ++u) {
    const float* w = tile + (feat[u] - i0) * kTileOutputs;
    const __m256 x = _mm256_broadcast_ss(xv + u);
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) a[c] = _mm256_fmadd_ps(x, _mm256_load_ps(w + 8 * c), a[c]);
  }
#pragma GCC unroll 8
  for (int c = 0; c < 8; ++c) _mm256_storeu_ps(acc + 8 * c, a[c]);
}

template <typename T>
QSK_TARGET_AVX2 void run(const T* x, int64_t M, int64_t d, int64_t k, const int32_t* kept, const T* wt, int64_t ld,
                         const T* bias, T* y, int64_t N) {
  const int64_t tiles = (d + kTileFeatures - 1) / kTileFeatures;
  // Per row: its kept activations in float32, and where each feature tile starts in its list.
  std::vector<float> xv(M * k);
  std::vector<int64_t> start(M * (tiles + 1));
  at::parallel_for(0, M, 16, [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      const int32_t* km = kept + m * k;
      int64_t u = 0;
      for (int64_t t = 0; t <= tiles; ++t) {
        while (u < k && km[u] < t * kTileFeatures) ++u;
        start[m * (tiles + 1) + t] = u;
      }
      for (int64_t j = 0; j < k; ++j) xv[m * k + j] = static_cast<float>(x[m * d + km[j]]);
    }
  });
  const int64_t panels = (N + kTileOutputs - 1) / kTileOutputs;
  const int64_t group = kGroupTiles * kTileFeatures;
  const int64_t groups = (d + group - 1) / group;
  const int64_t blocks = (M + kRowBlock - 1) / kRowBlock;
  at::parallel_for(0, panels, 1, [&](int64_t p0, int64_t p1) {
    // 32-byte aligned: the FMAs take the tiles as aligned memory operands.
    std::unique_ptr<float[]> mem(new float[group * kTileOutputs + 8]);
    float* tiles_f = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(mem.get()) + 31) & ~uintptr_t{31});
    std::vector<float> acc(M * kTileOutputs);
    for (int64_t p = p0; p < p1; ++p) {
      const int64_t j0 = p * kTileOutputs, nc = std::min(kTileOutputs, N - j0);
      std::fill(acc.begin(), acc.end(), 0.0f);
      for (int64_t g = 0; g < groups; ++g) {
        const int64_t gi0 = g * group, gn = std::min(group, d - gi0);
        load_group(wt, ld, gi0, gn, j0, nc, tiles_f);
        // The next group's rows (or the next panel's first), a share per row block.
        const int64_t ni0 = g + 1 < groups ? gi0 + gn : 0;
        const int64_t nn = g + 1 < groups ? std::min(group, d - ni0) : (p + 1 < p1 ? std::min(group, d) : 0);
        const int64_t nj0 = g + 1 < groups ? j0 : j0 + kTileOutputs;
        const int64_t nnc = g + 1 < groups ? nc : std::min(kTileOutputs, N - nj0);
        for (int64_t b = 0; b < blocks; ++b) {
          const int64_t f0 = nn * b / blocks, f1 = nn * (b + 1) / blocks;
          prefetch_rows(wt, ld, ni0 + f0, f1 - f0, nj0, nnc);
          const int64_t m0 = b * kRowBlock, m1 = std::min(M, m0 + kRowBlock);
          for (int64_t t = g * kGroupTiles; t < std::min(tiles, (g + 1) * kGroupTiles); ++t) {
            const float* tile = tiles_f + (t * kTileFeatures - gi0) * kTileOutputs;
            for (int64_t m = m0; m < m1; ++m) {
              const int64_t* sm = start.data() + m * (tiles + 1) + t;
              if (sm[1] > sm[0])
                row_tile(kept + m * k, xv.data() + m * k, sm[0], sm[1], t * kTileFeatures, tile,
                         acc.data() + m * kTileOutputs);
            }
          }
        }
      }
      for (int64_t m = 0; m < M; ++m) {
        const float* a = acc.data() + m * kTileOutputs;
        T* ym = y + m * N + j0;
        for (int64_t c = 0; c < nc; ++c) ym[c] = static_cast<T>(bias ? a[c] + static_cast<float>(bias[j0 + c]) : a[c]);
      }
    }
  });
}

}  // namespace

template <typename T>
void sparse_gemm_rows_avx2(const T* x, int64_t M, int64_t d, int64_t k, const int32_t* kept, const T* wt, int64_t ld,
                           const T* bias, T* y, int64_t N) {
  run(x, M, d, k, kept, wt, ld, bias, y, N);
}

template void sparse_gemm_rows_avx2<float>(const float*, int64_t, int64_t, int64_t, const int32_t*, const float*,
                                           int64_t, const float*, float*, int64_t);
template void sparse_gemm_rows_avx2<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, int64_t, const int32_t*,
                                                   const c10::BFloat16*, int64_t, const c10::BFloat16*,
                                                   c10::BFloat16*, int64_t);
template void sparse_gemm_rows_avx2<c10::Half>(const c10::Half*, int64_t, int64_t, int64_t, const int32_t*,
                                               const c10::Half*, int64_t, const c10::Half*, c10::Half*, int64_t);

}  // namespace qsk::cpu
