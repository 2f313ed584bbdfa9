// Per-row top-k by magnitude without a sort: see csrc/include/qsk/cpu_select.h for the contract.
#include "qsk/cpu_select.h"

#include "qsk/cpu_common.h"

#include <immintrin.h>

// GCC 12 reports its own 16-bit masked-load intrinsics (_mm*_maskz_loadu_epi16) as reading an
// uninitialised value (a known false positive in avx512bwintrin.h); silence it in this file only.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>

#include <c10/util/Exception.h>

namespace qsk::cpu {
namespace {

// At or below this many keys the radix rounds stop and std::nth_element finishes.
constexpr int64_t kSmall = 48;
// Radix digit: 8 bits, 256 counters (one L1-resident 1 KB table per sub-histogram).
constexpr int kDigitBits = 8;
constexpr int kBins = 1 << kDigitBits;

// ---- magnitude keys (cpu_select.h: integer order == magnitude order, NaN above +Inf) ----
// Half types use their own 15 magnitude bits (same order as the widened float, no conversion);
// uint32_t is an already-computed key (the band buffers of later rounds). Every NaN, whatever its
// payload, gets its format's quiet-NaN key, so NaNs tie and the lowest index wins among them.
template <typename T>
struct KeyBits;  // the +Inf key and the one NaN key of a format
template <>
struct KeyBits<float> {
  static constexpr uint32_t kInf = 0x7f800000u, kNan = 0x7fc00000u;
};
template <>
struct KeyBits<c10::BFloat16> {
  static constexpr uint32_t kInf = 0x7f80u, kNan = 0x7fc0u;
};
template <>
struct KeyBits<c10::Half> {
  static constexpr uint32_t kInf = 0x7c00u, kNan = 0x7e00u;
};
// Significant bits of a key: 31 for float32, 15 for the half types; uint32_t keys (band buffers)
// carry their source format's width, passed along by the driver.
template <typename T>
constexpr int kKeyBits = sizeof(T) == 4 ? 31 : 15;

template <typename T>
inline uint32_t canonical_nan(uint32_t k) {
  return k > KeyBits<T>::kInf ? KeyBits<T>::kNan : k;
}

inline uint32_t key_of(const float* p, int64_t i) {
  uint32_t u;
  std::memcpy(&u, p + i, sizeof u);
  return canonical_nan<float>(u & 0x7fffffffu);
}
inline uint32_t key_of(const c10::BFloat16* p, int64_t i) { return canonical_nan<c10::BFloat16>(p[i].x & 0x7fffu); }
inline uint32_t key_of(const c10::Half* p, int64_t i) { return canonical_nan<c10::Half>(p[i].x & 0x7fffu); }
inline uint32_t key_of(const uint32_t* p, int64_t i) { return p[i]; }

// ---- the two vectorisable passes, portable version (the scalar level, and the AVX2 passes' tails) ----

// Counts keys > hi into *gt and writes the keys in [lo, hi] to out (in order); returns their count.
template <typename T>
inline __attribute__((always_inline)) int64_t band_scalar(const T* src, int64_t n, uint32_t lo, uint32_t hi,
                                                          uint32_t* out, int64_t* gt) {
  int64_t above = 0, nb = 0;
  for (int64_t i = 0; i < n; ++i) {
    const uint32_t k = key_of(src, i);
    above += k > hi;
    out[nb] = k;  // branch-free compaction: the slot is only kept when k is in the band
    nb += (k >= lo) & (k <= hi);
  }
  *gt = above;
  return nb;
}

// Writes, in ascending order, the indices with key > thr and the first `ties` indices with key == thr.
// idx has room for exactly k entries: the loop stops once k are written.
template <typename T>
inline __attribute__((always_inline)) void emit_scalar(const T* x, int64_t d, int64_t k, uint32_t thr, int64_t ties,
                                                       int32_t* idx) {
  int64_t n = 0;
  for (int64_t i = 0; i < d && n < k; ++i) {
    const uint32_t k = key_of(x, i);
    const bool take_tie = (k == thr) & (ties > 0);
    ties -= take_tie;
    idx[n] = static_cast<int32_t>(i);
    n += (k > thr) | take_tie;
  }
}

// ---- AVX-512: 16 keys per step, compaction by vpcompressd ----

// Loads 16 keys (lanes outside `m` are 0), NaNs mapped to the format's one NaN key (key_of).
template <typename T>
QSK_TARGET_AVX512 inline __m512i canonical_nan16(__m512i k) {
  const __mmask16 nan = _mm512_cmpgt_epu32_mask(k, _mm512_set1_epi32(static_cast<int>(KeyBits<T>::kInf)));
  return _mm512_mask_mov_epi32(k, nan, _mm512_set1_epi32(static_cast<int>(KeyBits<T>::kNan)));
}
QSK_TARGET_AVX512 inline __m512i keys16(const float* p, __mmask16 m) {
  return canonical_nan16<float>(_mm512_and_si512(_mm512_maskz_loadu_epi32(m, p), _mm512_set1_epi32(0x7fffffff)));
}
QSK_TARGET_AVX512 inline __m512i keys16_u16(const void* p, __mmask16 m) {
  return _mm512_and_si512(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), _mm512_set1_epi32(0x7fff));
}
QSK_TARGET_AVX512 inline __m512i keys16(const c10::BFloat16* p, __mmask16 m) {
  return canonical_nan16<c10::BFloat16>(keys16_u16(p, m));
}
QSK_TARGET_AVX512 inline __m512i keys16(const c10::Half* p, __mmask16 m) {
  return canonical_nan16<c10::Half>(keys16_u16(p, m));
}
QSK_TARGET_AVX512 inline __m512i keys16(const uint32_t* p, __mmask16 m) { return _mm512_maskz_loadu_epi32(m, p); }

inline __mmask16 tail_mask(int64_t left) {
  return left >= 16 ? static_cast<__mmask16>(0xffff) : static_cast<__mmask16>((1u << left) - 1);
}

// Note: compress into a register, then a masked store. vpcompressd straight to memory is
// microcoded and very slow on AMD Zen 4.
template <typename T>
QSK_TARGET_AVX512 int64_t band_avx512(const T* src, int64_t n, uint32_t lo, uint32_t hi, uint32_t* out,
                                      int64_t* gt) {
  const __m512i vlo = _mm512_set1_epi32(static_cast<int>(lo)), vhi = _mm512_set1_epi32(static_cast<int>(hi));
  int64_t above = 0, nb = 0;
  for (int64_t i = 0; i < n; i += 16) {
    const __mmask16 m = tail_mask(n - i);
    const __m512i k = keys16(src + i, m);
    const __mmask16 g = _mm512_mask_cmpgt_epu32_mask(m, k, vhi);
    const __mmask16 b = _mm512_mask_cmpge_epu32_mask(m, k, vlo) & static_cast<__mmask16>(~g);
    const int nbits = __builtin_popcount(b);
    above += __builtin_popcount(g);
    _mm512_mask_storeu_epi32(out + nb, tail_mask(nbits), _mm512_maskz_compress_epi32(b, k));
    nb += nbits;
  }
  *gt = above;
  return nb;
}

// The lowest `n` set bits of `m` (n < popcount(m)).
inline __mmask16 lowest_bits(__mmask16 m, int64_t n) {
  uint32_t out = 0, rest = m;
  for (int64_t j = 0; j < n; ++j) {
    out |= rest & (0u - rest);
    rest &= rest - 1;
  }
  return static_cast<__mmask16>(out);
}

template <typename T>
QSK_TARGET_AVX512 void emit_avx512(const T* x, int64_t d, uint32_t thr, int64_t ties, int32_t* idx) {
  const __m512i vthr = _mm512_set1_epi32(static_cast<int>(thr));
  const __m512i iota = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  int64_t n = 0;
  for (int64_t i = 0; i < d; i += 16) {
    const __mmask16 m = tail_mask(d - i);
    const __m512i k = keys16(x + i, m);
    __mmask16 take = _mm512_mask_cmpgt_epu32_mask(m, k, vthr);
    if (ties > 0) {
      __mmask16 eq = _mm512_mask_cmpeq_epu32_mask(m, k, vthr);
      const int ne = __builtin_popcount(eq);
      if (ne > ties) eq = lowest_bits(eq, ties);
      ties -= __builtin_popcount(eq);
      take |= eq;
    }
    const int nt = __builtin_popcount(take);
    const __m512i ids = _mm512_add_epi32(iota, _mm512_set1_epi32(static_cast<int>(i)));
    _mm512_mask_storeu_epi32(idx + n, tail_mask(nt), _mm512_maskz_compress_epi32(take, ids));
    n += nt;
  }
}

// ---- AVX-512, half types: bisection on the key value ----

// Rows at least this long take the bisection (shorter ones the radix rounds below).
constexpr int64_t kBisectMin = 64;

// The k-th largest key (0 < k < d) and how many keys are above it, by bisection on the key value
// of 16-bit keys no larger than top (the NaN key); count_ge(t) counts the keys >= t (1 <= t <=
// top). Inlined into each ISA's caller, so that count_ge inlines there too (out of line it took
// ~2 us more per row).
template <typename CountGe>
inline __attribute__((always_inline)) void bisect_kth(int64_t k, uint32_t top, const CountGe& count_ge, uint32_t* thr,
                                                      int64_t* n_above) {
  uint32_t lo = 0, hi = top;  // count_ge(lo) >= k throughout; the answer is in [lo, hi]
  while (lo < hi) {
    const uint32_t mid = lo + (hi - lo + 1) / 2;
    if (count_ge(mid) >= k)
      lo = mid;
    else
      hi = mid - 1;
  }
  *thr = lo;
  *n_above = lo == top ? 0 : count_ge(lo + 1);
}

// How many of keys[0 .. 32 steps) are >= t.
QSK_TARGET_AVX512 inline int64_t count_keys_ge(const uint16_t* keys, int64_t steps, uint32_t t) {
  const __m512i vt = _mm512_set1_epi16(static_cast<int16_t>(t));
  int64_t c = 0;
  for (int64_t j = 0; j < steps; ++j)
    c += __builtin_popcount(_mm512_cmpge_epu16_mask(_mm512_loadu_si512(keys + 32 * j), vt));
  return c;
}

// The k-th largest key of the d >= kBisectMin half-type entries of x (0 < k < d) and how many
// keys are above it. The 15-bit keys (NaNs canonical, as key_of) go once into `keys` (uint16,
// zero padded to a multiple of 32: 2 * d + 62 bytes at most, inside the 8 * d bytes of scratch);
// then a bisection on the key value, each step one count of the keys >= t, 32 per compare over
// the L1-resident keys: ~16 passes of d / 32 vector steps, where the scalar radix histogram costs
// ~3 cycles per key and a band pass and a second round follow it.
template <typename T>
QSK_TARGET_AVX512 void kth_key_bisect(const T* x, int64_t d, int64_t k, uint16_t* keys, uint32_t* thr,
                                      int64_t* n_above) {
  const __m512i mag = _mm512_set1_epi16(0x7fff);
  const __m512i inf = _mm512_set1_epi16(static_cast<int16_t>(KeyBits<T>::kInf));
  const __m512i nan = _mm512_set1_epi16(static_cast<int16_t>(KeyBits<T>::kNan));
  const int64_t steps = (d + 31) / 32;
  for (int64_t j = 0; j < steps; ++j) {
    __m512i v = _mm512_and_si512(_mm512_maskz_loadu_epi16(tail_mask32(d - 32 * j), x + 32 * j), mag);
    v = _mm512_mask_mov_epi16(v, _mm512_cmpgt_epu16_mask(v, inf), nan);
    _mm512_storeu_si512(keys + 32 * j, v);  // the padding lanes are 0: never counted (t >= 1)
  }
  bisect_kth(k, KeyBits<T>::kNan, [&](uint32_t t) { return count_keys_ge(keys, steps, t); }, thr, n_above);
}

// ---- AVX2: the same bisection for half types, 16 keys per compare; emit 8 keys per step ----

// The 15-bit keys are below 0x8000, so signed 16-bit compares order them.
QSK_TARGET_AVX2 inline int64_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0x4e));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, 0xb1));
  return _mm_cvtsi128_si32(s);
}

// How many of keys[0 .. 16 steps) are >= t (1 <= t <= 0x7fff). Each int16 lane counts at most one
// key per step, so it is widened before 32767 steps.
QSK_TARGET_AVX2 inline int64_t count_keys_ge_avx2(const uint16_t* keys, int64_t steps, uint32_t t) {
  constexpr int64_t kLaneMax = 32767;
  const __m256i below = _mm256_set1_epi16(static_cast<int16_t>(t - 1));  // key >= t <=> key > t - 1
  int64_t c = 0;
  for (int64_t j0 = 0; j0 < steps; j0 += kLaneMax) {
    const int64_t j1 = std::min(steps, j0 + kLaneMax);
    __m256i acc = _mm256_setzero_si256();
    for (int64_t j = j0; j < j1; ++j) {
      const __m256i k = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(keys + 16 * j));
      acc = _mm256_sub_epi16(acc, _mm256_cmpgt_epi16(k, below));  // true lanes are -1
    }
    c += hsum_epi32(_mm256_madd_epi16(acc, _mm256_set1_epi16(1)));
  }
  return c;
}

// kth_key_bisect for AVX2: the keys go to `keys` (uint16, zero padded to a multiple of 16, inside
// the scratch), then the same bisection on the key value.
template <typename T>
QSK_TARGET_AVX2 void kth_key_bisect_avx2(const T* x, int64_t d, int64_t k, uint16_t* keys, uint32_t* thr,
                                         int64_t* n_above) {
  const __m256i mag = _mm256_set1_epi16(0x7fff);
  const __m256i inf = _mm256_set1_epi16(static_cast<int16_t>(KeyBits<T>::kInf));
  const __m256i nan = _mm256_set1_epi16(static_cast<int16_t>(KeyBits<T>::kNan));
  const int64_t steps = (d + 15) / 16;
  for (int64_t j = 0; j < steps; ++j) {
    __m256i v;
    if (16 * j + 16 <= d) {
      v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16 * j));
    } else {  // the last partial step through a zeroed copy: nothing read past x[d - 1]
      alignas(32) uint16_t tail[16] = {};
      std::memcpy(tail, x + 16 * j, static_cast<size_t>(d - 16 * j) * sizeof(uint16_t));
      v = _mm256_load_si256(reinterpret_cast<const __m256i*>(tail));
    }
    v = _mm256_and_si256(v, mag);
    v = _mm256_blendv_epi8(v, nan, _mm256_cmpgt_epi16(v, inf));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + 16 * j), v);  // padding lanes are 0: never counted
  }
  bisect_kth(k, KeyBits<T>::kNan, [&](uint32_t t) { return count_keys_ge_avx2(keys, steps, t); }, thr, n_above);
}

// 8 keys of x from entry i (key_of), as int32 lanes (every key is below 2^31).
QSK_TARGET_AVX2 inline __m256i keys8(const float* p) {
  const __m256i k = _mm256_and_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)),
                                     _mm256_set1_epi32(0x7fffffff));
  return _mm256_blendv_epi8(k, _mm256_set1_epi32(static_cast<int>(KeyBits<float>::kNan)),
                            _mm256_cmpgt_epi32(k, _mm256_set1_epi32(static_cast<int>(KeyBits<float>::kInf))));
}
template <typename T>
QSK_TARGET_AVX2 inline __m256i keys8_half(const T* p) {
  const __m256i k = _mm256_and_si256(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))),
                                     _mm256_set1_epi32(0x7fff));
  return _mm256_blendv_epi8(k, _mm256_set1_epi32(static_cast<int>(KeyBits<T>::kNan)),
                            _mm256_cmpgt_epi32(k, _mm256_set1_epi32(static_cast<int>(KeyBits<T>::kInf))));
}
QSK_TARGET_AVX2 inline __m256i keys8(const c10::BFloat16* p) { return keys8_half(p); }
QSK_TARGET_AVX2 inline __m256i keys8(const c10::Half* p) { return keys8_half(p); }

// For each 8-bit mask m: perm[m], the positions of its set bits, ascending, one per byte; count[m],
// how many there are.
struct Compact8 {
  uint64_t perm[256];
  uint8_t count[256];
  constexpr Compact8() : perm(), count() {
    for (int m = 0; m < 256; ++m) {
      uint64_t v = 0;
      int n = 0;
      for (int b = 0; b < 8; ++b)
        if (m & (1 << b)) v |= static_cast<uint64_t>(b) << (8 * n++);
      perm[m] = v;
      count[m] = static_cast<uint8_t>(n);
    }
  }
};
constexpr Compact8 kCompact8{};

QSK_TARGET_AVX2 inline __m256i keys8(const uint32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}

// band for AVX2: 8 keys per step, the keys in [lo, hi] compacted through kCompact8. Every key is
// below 2^31, so signed compares order them. A step's 8-lane store at out + nb stays inside out's
// n slots (nb <= i); the lanes past the kept ones are rewritten by the next step.
template <typename T>
QSK_TARGET_AVX2 int64_t band_avx2(const T* src, int64_t n, uint32_t lo, uint32_t hi, uint32_t* out, int64_t* gt) {
  const __m256i below = _mm256_set1_epi32(static_cast<int>(lo) - 1);  // key >= lo <=> key > lo - 1 (lo = 0: -1)
  const __m256i top = _mm256_set1_epi32(static_cast<int>(hi));
  int64_t above = 0, nb = 0, i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256i key = keys8(src + i);
    const __m256i over = _mm256_cmpgt_epi32(key, top);
    const unsigned m_over = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(over)));
    const unsigned m_in = static_cast<unsigned>(
        _mm256_movemask_ps(_mm256_castsi256_ps(_mm256_andnot_si256(over, _mm256_cmpgt_epi32(key, below)))));
    above += kCompact8.count[m_over];
    const __m256i perm = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(kCompact8.perm[m_in])));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + nb), _mm256_permutevar8x32_epi32(key, perm));
    nb += kCompact8.count[m_in];
  }
  int64_t tail_gt;
  nb += band_scalar(src + i, n - i, lo, hi, out + nb, &tail_gt);
  *gt = above + tail_gt;
  return nb;
}

// emit for AVX2: 8 keys per step, the taken indices compacted through kCompact8. idx has room for
// exactly k entries: a step whose 8-lane store would pass idx + k goes through a local copy.
template <typename T>
QSK_TARGET_AVX2 void emit_avx2(const T* x, int64_t d, int64_t k, uint32_t thr, int64_t ties, int32_t* idx) {
  const __m256i vthr = _mm256_set1_epi32(static_cast<int>(thr));
  int64_t n = 0, i = 0;
  for (; i + 8 <= d && n < k; i += 8) {
    const __m256i key = keys8(x + i);
    unsigned take = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpgt_epi32(key, vthr))));
    if (ties > 0) {
      unsigned eq = static_cast<unsigned>(_mm256_movemask_ps(_mm256_castsi256_ps(_mm256_cmpeq_epi32(key, vthr))));
      if (kCompact8.count[eq] > ties) eq = lowest_bits(static_cast<__mmask16>(eq), ties);
      ties -= kCompact8.count[eq];
      take |= eq;
    }
    const int nt = kCompact8.count[take];
    const __m256i perm = _mm256_cvtepu8_epi32(_mm_cvtsi64_si128(static_cast<long long>(kCompact8.perm[take])));
    const __m256i ids = _mm256_add_epi32(_mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), _mm256_set1_epi32(static_cast<int>(i)));
    const __m256i out = _mm256_permutevar8x32_epi32(ids, perm);
    if (n + 8 <= k) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(idx + n), out);  // lanes past nt are rewritten later
    } else {
      alignas(32) int32_t buf[8];
      _mm256_store_si256(reinterpret_cast<__m256i*>(buf), out);
      std::memcpy(idx + n, buf, static_cast<size_t>(std::min<int64_t>(nt, k - n)) * sizeof(int32_t));
    }
    n += nt;
  }
  for (; i < d && n < k; ++i) {  // the tail, as emit_scalar
    const uint32_t key = key_of(x, i);
    const bool take_tie = (key == thr) & (ties > 0);
    ties -= take_tie;
    if ((key > thr) | take_tie) idx[n++] = static_cast<int32_t>(i);
  }
}

// ---- the driver: bracketing rounds, then nth_element ----

template <typename T>
int64_t band(Isa isa, const T* src, int64_t n, uint32_t lo, uint32_t hi, uint32_t* out, int64_t* gt) {
  if (isa == Isa::Avx512) return band_avx512(src, n, lo, hi, out, gt);
  if (isa == Isa::Avx2) return band_avx2(src, n, lo, hi, out, gt);
  return band_scalar(src, n, lo, hi, out, gt);
}

template <typename T>
void emit(Isa isa, const T* x, int64_t d, int64_t k, uint32_t thr, int64_t ties, int32_t* idx) {
  if (isa == Isa::Avx512) return emit_avx512(x, d, thr, ties, idx);
  if (isa == Isa::Avx2) return emit_avx2(x, d, k, thr, ties, idx);
  emit_scalar(x, d, k, thr, ties, idx);
}

// The digit (key >> shift) & 0xff of entry i.
template <typename T>
inline uint32_t digit_of(const T* p, int64_t i, int shift) {
  return (key_of(p, i) >> shift) & (kBins - 1);
}
// The top digit of a source row's entry. For float and bf16 it is the exponent field, where the
// NaN canonicalisation of key_of changes nothing (every NaN and +-Inf has the top digit 0xff), so
// it is skipped; fp16's top 8 key bits hold 3 mantissa bits too (NaNs span several digits), so
// fp16 keeps it.
inline uint32_t top_digit_of(const float* p, int64_t i) {
  uint32_t u;
  std::memcpy(&u, p + i, sizeof u);
  return (u & 0x7fffffffu) >> (kKeyBits<float> - kDigitBits);
}
inline uint32_t top_digit_of(const c10::BFloat16* p, int64_t i) {
  return (p[i].x & 0x7fffu) >> (kKeyBits<c10::BFloat16> - kDigitBits);
}
inline uint32_t top_digit_of(const c10::Half* p, int64_t i) {
  return key_of(p, i) >> (kKeyBits<c10::Half> - kDigitBits);
}

// Counts the digits of src[0..n) into hist[0..256), with digit(i) one of the two above. Eight
// interleaved tables, so that runs of equal digits (common: the top digit is the exponent) do not
// serialise on one counter's store-to-load latency.
template <typename Digit>
void count_digits(int64_t n, const Digit& digit, uint32_t* hist) {
  constexpr int kTables = 8;
  uint32_t h[kTables][kBins] = {};
  int64_t i = 0;
  for (; i + kTables <= n; i += kTables)
    for (int j = 0; j < kTables; ++j) ++h[j][digit(i + j)];
  for (; i < n; ++i) ++h[0][digit(i)];
  for (int b = 0; b < kBins; ++b) {
    uint32_t c = 0;
    for (int j = 0; j < kTables; ++j) c += h[j][b];
    hist[b] = c;
  }
}

template <typename T>
void digit_histogram(const T* src, int64_t n, int shift, uint32_t* hist) {
  if constexpr (!std::is_same_v<T, uint32_t>) {
    if (shift == kKeyBits<T> - kDigitBits) return count_digits(n, [&](int64_t i) { return top_digit_of(src, i); }, hist);
  }
  count_digits(n, [&](int64_t i) { return digit_of(src, i, shift); }, hist);
}

// One radix round on the current set src[0..n) whose keys share every bit above shift + 8:
// finds the digit bin holding the t-th largest key (1-based), adds the count of keys in higher
// bins to *above and takes it off *t, and returns the bin's key range [*lo, *hi] (the next set).
template <typename T>
uint32_t radix_round(const T* src, int64_t n, int shift, uint32_t prefix, int64_t* t, int64_t* above, uint32_t* lo,
                     uint32_t* hi) {
  uint32_t hist[kBins];
  digit_histogram(src, n, shift, hist);
  int64_t higher = 0;
  int b = kBins - 1;
  while (higher + hist[b] < *t) higher += hist[b--];  // sum(hist) = n >= t: stops at b >= 0
  *above += higher;
  *t -= higher;
  const uint32_t low_mask = (shift > 0 ? (1u << shift) - 1 : 0u);
  *lo = (prefix & ~((static_cast<uint32_t>(kBins - 1) << shift) | low_mask)) | (static_cast<uint32_t>(b) << shift);
  *hi = *lo | low_mask;
  return hist[b];
}

// Where a radix select stands: the current set is x itself (a == nullptr) or a[0..n); t is the
// target's rank in it (1-based, from the top), `above` counts the keys above the set; every key of
// the set shares `prefix`'s bits above shift + 8, and the next round histograms the digit at
// `shift`; the next compaction goes to buf[cur].
struct RadixState {
  const uint32_t* a;
  int64_t n, t, above;
  int shift;
  uint32_t prefix;
  int cur;
};

// The radix rounds from state s to the k-th largest key and how many keys are above it. Each
// round histograms one 8-bit digit of the current set, keeps the bin that holds the target rank
// and compacts it (one vectorised band pass) into the other scratch buffer; the rounds end when
// every bit is fixed or the set is small, and std::nth_element finishes.
template <typename T>
void radix_rounds(Isa isa, const T* x, RadixState s, uint32_t* const buf[2], uint32_t* thr, int64_t* n_above) {
  for (; s.n > kSmall; s.shift = std::max(0, s.shift - kDigitBits)) {
    uint32_t lo, hi;
    const int64_t in_bin = s.a == nullptr ? radix_round(x, s.n, s.shift, s.prefix, &s.t, &s.above, &lo, &hi)
                                          : radix_round(s.a, s.n, s.shift, s.prefix, &s.t, &s.above, &lo, &hi);
    s.prefix = lo;
    if (in_bin < s.n) {  // compact the bin; a set already inside it stays where it is
      int64_t gt;
      s.n = s.a == nullptr ? band(isa, x, s.n, lo, hi, buf[s.cur], &gt) : band(isa, s.a, s.n, lo, hi, buf[s.cur], &gt);
      // The histogram and the band pass must agree on the keys (else the writes below overrun).
      TORCH_INTERNAL_ASSERT(s.n == in_bin && s.t >= 1 && s.t <= s.n, "select_topk: radix round disagrees with its band");
      s.a = buf[s.cur];
      s.cur ^= 1;
    }
    if (s.shift == 0) {  // every bit fixed: the whole set equals the k-th key
      *thr = lo;
      *n_above = s.above;
      return;
    }
  }
  // Finish on a mutable copy of the (small) current set.
  uint32_t* v = buf[s.cur];
  if (s.a == nullptr) {
    for (int64_t i = 0; i < s.n; ++i) v[i] = key_of(x, i);
  } else {
    std::memcpy(v, s.a, s.n * sizeof(uint32_t));
  }
  std::nth_element(v, v + (s.n - s.t), v + s.n);
  const uint32_t kth = v[s.n - s.t];
  int64_t above = s.above;
  for (int64_t i = s.n - s.t + 1; i < s.n; ++i) above += v[i] > kth;  // nth_element: these are all >= kth
  *thr = kth;
  *n_above = above;
}

// Finds the k-th largest key of x and how many keys are strictly above it (0 < k < d): radix
// select, most significant digit first, from the whole row.
template <typename T>
void kth_key(Isa isa, const T* x, int64_t d, int64_t k, uint32_t* scratch, uint32_t* thr, int64_t* n_above) {
  uint32_t* const buf[2] = {scratch, scratch + d};
  radix_rounds(isa, x, RadixState{nullptr, d, k, 0, kKeyBits<T> - kDigitBits, 0u, 0}, buf, thr, n_above);
}

// ---- AVX2, float32: a bisection on the keys' top 16 bits, then radix rounds on the low 16 ----

// The top bits of every float32 key (key >> 16: 15 bits, NaNs canonical, so every NaN has
// KeyBits<float>::kNan >> 16) into keys (uint16, zero padded to a multiple of 16; 16 per step,
// in the lane order of _mm256_packus_epi32, which only counting sees); returns the step count.
QSK_TARGET_AVX2 int64_t coarse_keys_avx2(const float* x, int64_t d, uint16_t* keys) {
  const int64_t steps = (d + 15) / 16;
  for (int64_t j = 0; j < steps; ++j) {
    __m256i a, b;
    if (16 * j + 16 <= d) {
      a = keys8(x + 16 * j);
      b = keys8(x + 16 * j + 8);
    } else {  // the last partial step through a zeroed copy: nothing read past x[d - 1]; key 0 is never counted
      alignas(32) float tail[16] = {};
      std::memcpy(tail, x + 16 * j, static_cast<size_t>(d - 16 * j) * sizeof(float));
      a = keys8(tail);
      b = keys8(tail + 8);
    }
    const __m256i v = _mm256_packus_epi32(_mm256_srli_epi32(a, 16), _mm256_srli_epi32(b, 16));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(keys + 16 * j), v);
  }
  return steps;
}

// kth_key for a float32 row of d >= kBisectMin entries on AVX2. The top 16 key bits of the k-th
// largest key come from a bisection over 16-bit keys (as the half types', 16 per compare), the keys
// with those top bits are compacted into buf[0] (one band pass), and the radix rounds finish on
// their low 16 bits: ~16 passes over 2 d bytes and 2 small rounds, where the 4 rounds from the
// whole row histogram 31-bit keys at ~3 cycles each.
QSK_TARGET_AVX2 void kth_key_coarse_avx2(const float* x, int64_t d, int64_t k, uint32_t* scratch, uint32_t* thr,
                                         int64_t* n_above) {
  uint32_t* const buf[2] = {scratch, scratch + d};
  uint16_t* keys = reinterpret_cast<uint16_t*>(buf[1]);  // 2 d + 30 bytes, inside buf[1]'s 4 d
  const int64_t steps = coarse_keys_avx2(x, d, keys);
  uint32_t top;
  int64_t above;
  bisect_kth(k, KeyBits<float>::kNan >> 16, [&](uint32_t t) { return count_keys_ge_avx2(keys, steps, t); }, &top,
             &above);
  const uint32_t lo = top << 16, hi = lo | 0xffffu;
  int64_t gt;
  const int64_t n = band(Isa::Avx2, x, d, lo, hi, buf[0], &gt);
  TORCH_INTERNAL_ASSERT(gt == above && k - above >= 1 && k - above <= n, "select_topk: bisection disagrees with its band");
  radix_rounds(Isa::Avx2, x, RadixState{buf[0], n, k - above, above, 16 - kDigitBits, lo, 1}, buf, thr, n_above);
}

template <typename T>
void select_impl(const T* x, int64_t d, int64_t k, int32_t* idx, uint32_t* scratch, Isa isa) {
  TORCH_INTERNAL_ASSERT(d >= 0 && d <= INT32_MAX && k >= 0 && k <= d);
  if (k == 0) return;
  if (k == d) {
    for (int64_t i = 0; i < d; ++i) idx[i] = static_cast<int32_t>(i);
    return;
  }
  uint32_t thr;
  int64_t above;
  if constexpr (std::is_same_v<T, float>) {
    if (isa == Isa::Avx2 && d >= kBisectMin) {
      kth_key_coarse_avx2(x, d, k, scratch, &thr, &above);
      return emit(isa, x, d, k, thr, k - above, idx);
    }
  } else {
    if (isa == Isa::Avx512 && d >= kBisectMin) {
      kth_key_bisect(x, d, k, reinterpret_cast<uint16_t*>(scratch), &thr, &above);
      return emit(isa, x, d, k, thr, k - above, idx);
    }
    if (isa == Isa::Avx2 && d >= kBisectMin) {
      kth_key_bisect_avx2(x, d, k, reinterpret_cast<uint16_t*>(scratch), &thr, &above);
      return emit(isa, x, d, k, thr, k - above, idx);
    }
  }
  kth_key(isa, x, d, k, scratch, &thr, &above);
  emit(isa, x, d, k, thr, k - above, idx);
}

}  // namespace

void select_topk(const float* x, int64_t d, int64_t k, int32_t* kept_idx, uint32_t* scratch, Isa isa) {
  select_impl(x, d, k, kept_idx, scratch, isa);
}
void select_topk(const c10::BFloat16* x, int64_t d, int64_t k, int32_t* kept_idx, uint32_t* scratch, Isa isa) {
  select_impl(x, d, k, kept_idx, scratch, isa);
}
void select_topk(const c10::Half* x, int64_t d, int64_t k, int32_t* kept_idx, uint32_t* scratch, Isa isa) {
  select_impl(x, d, k, kept_idx, scratch, isa);
}

}  // namespace qsk::cpu
