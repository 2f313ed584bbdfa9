// Small helpers shared by the CPU kernels.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cmath>
#include <cstdint>
#include <cstring>

namespace qsk::cpu {

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

inline __attribute__((always_inline)) float key_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// SPEC 4: q = clamp(round_half_even(v), -128, 127), with a non-finite v giving 0.
inline __attribute__((always_inline)) int8_t quantize_i8(float v) {
  float r = std::nearbyint(v);
  if (!(std::fabs(r) <= 3.0e38f)) return 0;  // NaN or +-Inf
  r = r < -128.f ? -128.f : (r > 127.f ? 127.f : r);
  return static_cast<int8_t>(r);
}

}  // namespace qsk::cpu
