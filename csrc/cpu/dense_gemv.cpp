// Dense GEMV over a row-major weight (nn.Linear's own layout): y[M, N] = x[M, d] W[N, d]^T + b
// for M <= row_gemv_max_rows (dense_gemv.h), the path sparse_linear takes at k = d on a row-major
// weight (the model's dense output head, qsparse_kernels.nn.DenseHead). torch's CPU GEMV streams
// such a weight at about half the machine's read bandwidth; this one reads every weight row once,
// as one contiguous run, for up to kMaxRowGemvRows rows of x (which stay in L1 / L2), split over
// the threads by output; more rows take further passes over each task's weight rows.
// A step reads a few weight rows side by side; for d = 2048 in bf16 each row is one 4 KB page,
// where the hardware prefetchers restart, so each step prefetches (into L2) the rows that
// kPrefetchSteps steps later will read, one line per line consumed.
//
// Sum order (the same on every ISA path, thread count, N and output position): 16 partial sums,
// lane l of chunk c (of 16 V values, V = 2 for bf16 and 1 for fp32 / fp16) taking the values
// i = 16 V c + V l + j for j = 0 .. V - 1 in turn: s[l] = fma(x[i], w[i], s[l]) (zero padded past
// d); then s[l] += s[l + h] for h = 8, 4, 2, 1, then + bias in float32, one rounding to the output
// dtype. Products are exact in float32 for bf16 / fp16 inputs; fp32 inputs are fused-multiply-added.
// bf16 takes two values per lane because a dword of bf16 data widens to two floats with one shift
// (the low half) and one AND (the high half), without a shuffle. With one value per lane (a
// widening shuffle per 16 values) the AVX-512 kernel was bound by those instructions: Zen 4,
// 2 threads, bf16 M = 1, 3 alternating processes, GB/s one value / two: a 4 MB weight (in cache)
// 48-49 / 69-72, 2048 -> 5632 (23 MB) 46-52 / 74-77, a TinyLlama head (131 MB, from DRAM) 33-37 /
// 52-57 while the host's amax read 49-51 GB/s, 29-32 / 28-34 (both at DRAM speed) while it read 33.
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

// GCC 12 reports its own masked-load / convert intrinsics as reading an uninitialised value (a
// known false positive in avx512fintrin.h); silence it in this file only.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include "dense_gemv.h"
#include "qsk/cpu_common.h"
#include "qsk/isa.h"

namespace qsk::cpu {
namespace {

constexpr int kRowsPerStep = 4;  // weight rows whose dot products run side by side
// V of the sum order (the top): values per lane per chunk.
template <typename T>
constexpr int kPerLane = std::is_same_v<T, c10::BFloat16> ? 2 : 1;

// How many steps ahead the weight rows are prefetched. bf16 head 2048 -> 32000 (131 MB, M = 1, 2
// threads, AMD EPYC Zen 4, 2026-12-04, 4 alternating processes each, time without / with):
// 1 step ahead into L1 0.96-1.24, 2 steps 1.03-1.44, 4 steps 1.06-1.46, 4 steps into L2
// 1.11-1.35, 8 steps 0.94-1.28. With 4 into L2, 6 alternating processes (DRAM-resident): bf16
// M = 1 1.25 [1.14, 1.38], M = 4 0.98 [0.83, 1.03] (compute-bound there), fp32 1.20, fp16 1.40,
// 5632 -> 2048 bf16 1.30; the AVX2 path (forced, same CPU) bf16 M = 1 1.27, M = 2 1.35, fp32 1.08.
// bf16 in the two-value order (2026-12-05, a step twice as fast): 4 steps 51.7, 34.4, 52.3 GB/s,
// 8 steps 52.6, 56.1, 57.5, 16 steps 36.7, 50.2, 51.2 (3 alternating processes, same head).
template <typename T>
constexpr int64_t kPrefetchSteps = kPerLane<T> == 2 ? 8 : 4;

// Prefetches line `byte` (a multiple of 64) of the n rows from `first` on, ld bytes apart, into L2.
inline void prefetch_rows(const char* first, int64_t ld, int n, int64_t byte) {
  for (int r = 0; r < n; ++r) _mm_prefetch(first + r * ld + byte, _MM_HINT_T1);
}
// The rows the step of step_rows rows at weight row n (of rows [0, N)) prefetches: the first and
// how many (first is only formed when there is one: a pointer past the weight's end would be
// undefined behaviour).
struct RowPrefetch {
  const char* first;
  int n;
};
template <typename T>
inline RowPrefetch row_prefetch(const T* w, int64_t ldw, int64_t n, int64_t step_rows, int64_t N) {
  const int64_t r0 = n + kPrefetchSteps<T> * step_rows;
  const int count = static_cast<int>(std::clamp<int64_t>(N - r0, 0, step_rows));
  return {count > 0 ? reinterpret_cast<const char*>(w + r0 * ldw) : nullptr, count};
}

// ---- portable (baseline build; also the reference for the order above) ----

inline float widen16(const float* p, int64_t i) { return p[i]; }
inline float widen16(const c10::BFloat16* p, int64_t i) {
  const uint32_t u = static_cast<uint32_t>(p[i].x) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline float widen16(const c10::Half* p, int64_t i) { return static_cast<float>(p[i]); }

inline float tree16(float* s) {
  for (int h = 8; h >= 1; h /= 2)
    for (int l = 0; l < h; ++l) s[l] += s[l + h];
  return s[0];
}

template <typename T>
void rows_portable(const T* x, int64_t M, int64_t d, const T* w, int64_t ldw, int64_t n0, int64_t n1, float* out,
                   int64_t ldo) {
  constexpr int V = kPerLane<T>;
  for (int64_t n = n0; n < n1; ++n) {
    const T* wr = w + n * ldw;
    for (int64_t m = 0; m < M; ++m) {
      const T* xr = x + m * d;
      float s[16] = {};
      for (int64_t c = 0; c < d; c += 16 * V)
        for (int l = 0; l < 16; ++l)
          for (int j = 0; j < V; ++j) {
            const int64_t i = c + V * l + j;
            const float xv = i < d ? widen16(xr, i) : 0.0f, wv = i < d ? widen16(wr, i) : 0.0f;
            s[l] = std::fma(xv, wv, s[l]);
          }
      out[m * ldo + (n - n0)] = tree16(s);
    }
  }
}

// ---- AVX-512: 16 lanes = the 16 partial sums ----

QSK_TARGET_AVX512 inline float tree16_avx512(__m512 v) {
  const __m256 a = _mm256_add_ps(_mm512_castps512_ps256(v), _mm512_extractf32x8_ps(v, 1));  // l + 8
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));       // l + 4
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));                                        // l + 2
  const __m128 e = _mm_add_ss(c, _mm_movehdup_ps(c));                                         // l + 1
  return _mm_cvtss_f32(e);
}

// The 16 V values c .. c + 16 V - 1 of a row (mask k: those below d; the rest read as 0) as V
// float32 vectors in the order at the top: lane l of vector j = value c + V l + j. bf16 widens
// without a shuffle: the even values of a 64-byte load with one shift (the low half of each dword),
// the odd ones with one AND (the high half).
QSK_TARGET_AVX512 inline void load_step(const float* p, uint32_t k, __m512 (&v)[1]) {
  v[0] = _mm512_maskz_loadu_ps(static_cast<__mmask16>(k), p);
}
QSK_TARGET_AVX512 inline void load_step(const c10::Half* p, uint32_t k, __m512 (&v)[1]) {
  v[0] = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(static_cast<__mmask16>(k), p));
}
QSK_TARGET_AVX512 inline void load_step(const c10::BFloat16* p, uint32_t k, __m512 (&v)[2]) {
  const __m512i raw = _mm512_maskz_loadu_epi16(static_cast<__mmask32>(k), p);
  v[0] = _mm512_castsi512_ps(_mm512_slli_epi32(raw, 16));
  v[1] = _mm512_castsi512_ps(_mm512_and_si512(raw, _mm512_set1_epi32(static_cast<int>(0xffff0000u))));
}

// Outputs n .. n + nr (nr <= kRowsPerStep) of MR rows into out[m * ldo + r].
// The rows of pf are prefetched meanwhile (row_prefetch).
template <typename T, int MR>
QSK_TARGET_AVX512 void step_avx512(const T* x, int64_t d, const T* w, int64_t ldw, int64_t n, int nr, float* out,
                                   int64_t ldo, RowPrefetch pf) {
  constexpr int V = kPerLane<T>;
  __m512 acc[kRowsPerStep][MR];
  for (int r = 0; r < kRowsPerStep; ++r)
    for (int m = 0; m < MR; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t c = 0; c < d; c += 16 * V) {
    if (c * static_cast<int64_t>(sizeof(T)) % 64 == 0) prefetch_rows(pf.first, ldw * sizeof(T), pf.n, c * sizeof(T));
    const uint32_t k = d - c >= 16 * V ? (V == 2 ? 0xffffffffu : 0xffffu) : (1u << (d - c)) - 1;
    __m512 xv[MR][V];
    for (int m = 0; m < MR; ++m) load_step(x + m * d + c, k, xv[m]);
    for (int r = 0; r < kRowsPerStep; ++r) {
      if (r >= nr) break;
      __m512 wv[V];
      load_step(w + (n + r) * ldw + c, k, wv);
      for (int m = 0; m < MR; ++m)
        for (int j = 0; j < V; ++j) acc[r][m] = _mm512_fmadd_ps(xv[m][j], wv[j], acc[r][m]);
    }
  }
  for (int r = 0; r < nr; ++r)
    for (int m = 0; m < MR; ++m) out[m * ldo + r] = tree16_avx512(acc[r][m]);
}

template <typename T>
QSK_TARGET_AVX512 void rows_avx512(const T* x, int64_t M, int64_t d, const T* w, int64_t ldw, int64_t n0, int64_t n1,
                                   int64_t N, float* out, int64_t ldo) {
  for (int64_t n = n0; n < n1; n += kRowsPerStep) {
    const int nr = static_cast<int>(std::min<int64_t>(kRowsPerStep, n1 - n));
    float* o = out + (n - n0);
    const RowPrefetch pf = row_prefetch(w, ldw, n, kRowsPerStep, N);
    switch (M) {
      case 1: step_avx512<T, 1>(x, d, w, ldw, n, nr, o, ldo, pf); break;
      case 2: step_avx512<T, 2>(x, d, w, ldw, n, nr, o, ldo, pf); break;
      case 3: step_avx512<T, 3>(x, d, w, ldw, n, nr, o, ldo, pf); break;
      default: step_avx512<T, 4>(x, d, w, ldw, n, nr, o, ldo, pf); break;
    }
  }
}

// ---- AVX2: two 8-lane halves = partial sums 0..7 and 8..15 ----
// out[m * ldo + (n - n0)] for n in [n0, n1), as every path below.

// The last left < 16 entries, zero padded.
template <typename T>
QSK_TARGET_AVX2 inline void load_tail_avx2(const T* p, int64_t left, __m256& lo, __m256& hi) {
  alignas(32) float buf[16];
  for (int l = 0; l < 16; ++l) buf[l] = l < left ? widen16(p, l) : 0.0f;
  lo = _mm256_load_ps(buf);
  hi = _mm256_load_ps(buf + 8);
}

QSK_TARGET_AVX2 inline void load16_avx2(const c10::Half* p, int64_t left, __m256& lo, __m256& hi) {
  if (left < 16) return load_tail_avx2(p, left, lo, hi);
  lo = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  hi = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + 8)));
}
QSK_TARGET_AVX2 inline void load16_avx2(const float* p, int64_t left, __m256& lo, __m256& hi) {
  if (left < 16) return load_tail_avx2(p, left, lo, hi);
  lo = _mm256_loadu_ps(p);
  hi = _mm256_loadu_ps(p + 8);
}

QSK_TARGET_AVX2 inline float tree16_avx2(__m256 lo, __m256 hi) {
  const __m256 a = _mm256_add_ps(lo, hi);                                                // l + 8
  const __m128 b = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));  // l + 4
  const __m128 c = _mm_add_ps(b, _mm_movehl_ps(b, b));                                   // l + 2
  const __m128 e = _mm_add_ss(c, _mm_movehdup_ps(c));                                    // l + 1
  return _mm_cvtss_f32(e);
}

// bf16 values c .. c + 15 of a row (zero past d): the even ones widened (lanes 0..7), the odd ones.
QSK_TARGET_AVX2 inline void split16_avx2(const c10::BFloat16* row, int64_t c, int64_t d, __m256& even, __m256& odd) {
  __m256i v;
  if (d - c >= 16) {
    v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(row + c));
  } else {
    alignas(32) uint16_t buf[16] = {};
    if (d > c) std::memcpy(buf, row + c, static_cast<size_t>(d - c) * sizeof(uint16_t));
    v = _mm256_load_si256(reinterpret_cast<const __m256i*>(buf));
  }
  even = _mm256_castsi256_ps(_mm256_slli_epi32(v, 16));
  odd = _mm256_castsi256_ps(_mm256_and_si256(v, _mm256_set1_epi32(static_cast<int>(0xffff0000u))));
}

// NR weight rows x MR batch rows of outputs n .. n + NR - 1: xf is x in float32, zero padded to
// dp (a multiple of 16 V) columns (widen_x_avx2), so each FMA takes its x operand from memory (L1)
// and the registers hold the 2 x NR x MR accumulators (lanes 0..7 and 8..15) and one weight row's
// values of the step.
template <typename T, int MR, int NR>
QSK_TARGET_AVX2 inline void step_avx2(const float* xf, int64_t dp, int64_t d, const T* w, int64_t ldw, int64_t n,
                                      float* out, int64_t ldo, RowPrefetch pf) {
  constexpr int V = kPerLane<T>;
  __m256 lo[NR][MR], hi[NR][MR];
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) lo[r][m] = hi[r][m] = _mm256_setzero_ps();
  for (int64_t c = 0; c < d; c += 16 * V) {
    if (c * static_cast<int64_t>(sizeof(T)) % 64 == 0) prefetch_rows(pf.first, ldw * sizeof(T), pf.n, c * sizeof(T));
#pragma GCC unroll 4
    for (int r = 0; r < NR; ++r) {
      if constexpr (V == 2) {  // widen_x_avx2's chunk: lanes 0..7 even, odd, lanes 8..15 even, odd
        const T* row = w + (n + r) * ldw;
        __m256 we, wo;
        split16_avx2(row, c, d, we, wo);
#pragma GCC unroll 4
        for (int m = 0; m < MR; ++m) {
          const float* xc = xf + m * dp + c;
          lo[r][m] = _mm256_fmadd_ps(_mm256_loadu_ps(xc + 8), wo, _mm256_fmadd_ps(_mm256_loadu_ps(xc), we, lo[r][m]));
        }
        split16_avx2(row, c + 16, d, we, wo);
#pragma GCC unroll 4
        for (int m = 0; m < MR; ++m) {
          const float* xc = xf + m * dp + c + 16;
          hi[r][m] = _mm256_fmadd_ps(_mm256_loadu_ps(xc + 8), wo, _mm256_fmadd_ps(_mm256_loadu_ps(xc), we, hi[r][m]));
        }
      } else {
        __m256 wl, wh;
        load16_avx2(w + (n + r) * ldw + c, d - c, wl, wh);
#pragma GCC unroll 4
        for (int m = 0; m < MR; ++m) {
          lo[r][m] = _mm256_fmadd_ps(_mm256_loadu_ps(xf + m * dp + c), wl, lo[r][m]);
          hi[r][m] = _mm256_fmadd_ps(_mm256_loadu_ps(xf + m * dp + c + 8), wh, hi[r][m]);
        }
      }
    }
  }
  for (int r = 0; r < NR; ++r)
    for (int m = 0; m < MR; ++m) out[m * ldo + r] = tree16_avx2(lo[r][m], hi[r][m]);
}

// x [M, d] widened to float32 (exact for every T), zero padded to dp columns, in the order
// step_avx2 reads it: as is for V = 1; for bf16 each chunk of 32 as its values 2 l (l < 8),
// 2 l + 1, 16 + 2 l, 16 + 2 l + 1.
template <typename T>
std::vector<float> widen_x_avx2(const T* x, int64_t M, int64_t d, int64_t dp) {
  std::vector<float> xf(M * dp, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < d; ++i) {
      int64_t at = i;
      if constexpr (kPerLane<T> == 2) {
        const int64_t o = i % 32, q = o % 16;
        at = i - o + 16 * (o / 16) + 8 * (q % 2) + q / 2;
      }
      xf[m * dp + at] = widen16(x + m * d, i);
    }
  return xf;
}

// Weight rows 4 (1 batch row), 2 (2-3 rows) or 1 (4 rows) at a time: at most 12 accumulators.
template <typename T, int MR>
QSK_TARGET_AVX2 void rows_mr_avx2(const float* xf, int64_t dp, int64_t d, const T* w, int64_t ldw, int64_t n0,
                                  int64_t n1, int64_t N, float* out, int64_t ldo) {
  constexpr int NR = MR == 1 ? 4 : MR < 4 ? 2 : 1;
  int64_t n = n0;
  for (; n + NR <= n1; n += NR)
    step_avx2<T, MR, NR>(xf, dp, d, w, ldw, n, out + (n - n0), ldo, row_prefetch(w, ldw, n, NR, N));
  for (; n < n1; ++n) step_avx2<T, MR, 1>(xf, dp, d, w, ldw, n, out + (n - n0), ldo, RowPrefetch{nullptr, 0});
}

template <typename T>
QSK_TARGET_AVX2 void rows_avx2(const T* x, int64_t M, int64_t d, const T* w, int64_t ldw, int64_t n0, int64_t n1,
                               int64_t N, float* out, int64_t ldo) {
  constexpr int64_t chunk = 16 * kPerLane<T>;
  const int64_t dp = (d + chunk - 1) / chunk * chunk;
  const std::vector<float> xf = widen_x_avx2(x, M, d, dp);
  switch (M) {
    case 1: return rows_mr_avx2<T, 1>(xf.data(), dp, d, w, ldw, n0, n1, N, out, ldo);
    case 2: return rows_mr_avx2<T, 2>(xf.data(), dp, d, w, ldw, n0, n1, N, out, ldo);
    case 3: return rows_mr_avx2<T, 3>(xf.data(), dp, d, w, ldw, n0, n1, N, out, ldo);
    default: return rows_mr_avx2<T, 4>(xf.data(), dp, d, w, ldw, n0, n1, N, out, ldo);
  }
}

// Outputs [n0, n1) of the N.
template <typename T>
void rows(Isa level, const T* x, int64_t M, int64_t d, const T* w, int64_t ldw, int64_t n0, int64_t n1, int64_t N,
          float* out, int64_t ldo) {
  if (level == Isa::Avx512) return rows_avx512(x, M, d, w, ldw, n0, n1, N, out, ldo);
  if (level == Isa::Avx2) return rows_avx2(x, M, d, w, ldw, n0, n1, N, out, ldo);
  rows_portable(x, M, d, w, ldw, n0, n1, out, ldo);
}

}  // namespace

template <typename T>
void dense_gemv_rowmajor(const T* x, int64_t M, int64_t d, const T* w, int64_t ldw, const T* bias, T* y, int64_t N) {
  TORCH_INTERNAL_ASSERT(M >= 1 && d >= 0 && N >= 0);
  const Isa level = isa();
  constexpr int64_t kOuts = 256;  // outputs per task (a multiple of kRowsPerStep)
  const int64_t tasks = (N + kOuts - 1) / kOuts;
  const int64_t grain = std::max<int64_t>(1, kMinTaskBytes / std::max<int64_t>(1, kOuts * d * sizeof(T)));
  at::parallel_for(0, tasks, grain, [&](int64_t t0, int64_t t1) {
    float acc[kMaxRowGemvRows * kOuts];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * kOuts, n1 = std::min(N, n0 + kOuts);
      // kMaxRowGemvRows batch rows per pass over the task's weight rows (later passes from cache).
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRowGemvRows) {
        const int64_t mg = std::min(kMaxRowGemvRows, M - m0);
        rows(level, x + m0 * d, mg, d, w, ldw, n0, n1, N, acc, kOuts);
        for (int64_t m = 0; m < mg; ++m)
          for (int64_t n = n0; n < n1; ++n) {
            const float s = acc[m * kOuts + n - n0];
            y[(m0 + m) * N + n] = static_cast<T>(bias ? s + static_cast<float>(bias[n]) : s);
          }
      }
    }
  });
}

template void dense_gemv_rowmajor<float>(const float*, int64_t, int64_t, const float*, int64_t, const float*, float*,
                                         int64_t);
template void dense_gemv_rowmajor<c10::BFloat16>(const c10::BFloat16*, int64_t, int64_t, const c10::BFloat16*, int64_t,
                                                 const c10::BFloat16*, c10::BFloat16*, int64_t);
template void dense_gemv_rowmajor<c10::Half>(const c10::Half*, int64_t, int64_t, const c10::Half*, int64_t,
                                             const c10::Half*, c10::Half*, int64_t);

}  // namespace qsk::cpu
