// Small helpers shared by the CPU kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <immintrin.h>

#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>

namespace qsk::cpu {

// Fewest weight bytes one parallel task should read: below it a second thread costs more (an
// OpenMP fork / join, several us) than it saves, so tiny layers run on the calling thread.
constexpr int64_t kMinTaskBytes = 64 * 1024;

// The first `left` of 32 lanes (all for left >= 32, none for left <= 0): a 16-bit-element tail mask.
inline __mmask32 tail_mask32(int64_t left) {
  return left >= 32 ? static_cast<__mmask32>(0xffffffffu) : left <= 0 ? 0u : static_cast<__mmask32>((1u << left) - 1);
}

template <typename T>
inline __attribute__((always_inline)) float to_f32(T v) {
  return static_cast<float>(v);
}

// |v| as an unsigned key whose integer order is the magnitude order, NaN above +Inf
// (SPEC: NaN counts as the largest magnitude).
inline __attribute__((always_inline)) uint32_t mag_key(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  return u & 0x7fffffffu;
}

// The largest mag_key of x[0..d): the row's absmax as a key (an integer max: it vectorises, and
// NaN wins over Inf). 0 for an empty row.
template <typename T>
inline __attribute__((always_inline)) uint32_t absmax_key(const T* x, int64_t d) {
  uint32_t m = 0;
  for (int64_t i = 0; i < d; ++i) {
    const uint32_t k = mag_key(to_f32(x[i]));
    m = k > m ? k : m;
  }
  return m;
}

inline __attribute__((always_inline)) float key_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// SPEC 4: q = clamp(round_half_even(v), -128, 127), with a non-finite v giving 0.
// Clamping first gives the same q (the bounds are integers and rounding is monotonic), and on
// [-128, 127] adding and subtracting 1.5 * 2^23 rounds half to even in the default rounding mode
// (the sum's ulp is 1). Unlike std::nearbyint, which GCC leaves as a libm call per element
// without -fno-trapping-math, this inlines and vectorizes.
inline __attribute__((always_inline)) int8_t quantize_i8(float v) {
  if (!(std::fabs(v) <= std::numeric_limits<float>::max())) return 0;  // NaN or +-Inf
  const float c = v < -128.f ? -128.f : (v > 127.f ? 127.f : v);
  constexpr float kRound = 12582912.0f;  // 1.5 * 2^23
  return static_cast<int8_t>((c + kRound) - kRound);
}

}  // namespace qsk::cpu
