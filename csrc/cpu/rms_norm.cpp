// RMSNorm as Hugging Face's Llama computes it, in one pass over each row (qsparse_kernels/nn/rms_norm.py):
//   n = round_T(x * (1 / sqrt(sum(x^2) / d + eps)))   in float32, then rounded to x's dtype T
//   y = round_T(w * n)                                 w of dtype T, the product in float32
// torch runs this as ~9 small ops (to, pow, mean, add, rsqrt, mul, to, mul): ~18 us a call on a
// 2048-wide bf16 row on Zen 4, ~45 calls a decoded TinyLlama token. Here: one call.
//
// The sum of squares has a fixed order on every ISA path: lane l of 64 sums x[i]^2 for i = l mod 64
// in increasing i with a fused multiply-add (s[l] = fma(x[i], x[i], s[l])); then s[l] += s[l + h]
// for h = 32, 16, 8, 4, 2, 1. (64 lanes: four independent 16-wide FMA chains on AVX-512; one chain
// was bound by the FMA latency.) Rounding to bf16 / fp16 is c10's (round to nearest even).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>

#include "qsk/avx512_lanes.h"
#include "qsk/checks.h"
#include "qsk/cpu_common.h"
#include "qsk/isa.h"

namespace qsk::cpu {
namespace {

constexpr int kLanes = 64;  // partial sums
constexpr int kVec = 16;    // floats in an AVX-512 register

inline float tree_sum(float (&s)[kLanes]) {
  for (int h = kLanes / 2; h >= 1; h /= 2)
    for (int l = 0; l < h; ++l) s[l] += s[l + h];
  return s[0];
}

inline float inv_rms(float sum_sq, int64_t d, float eps) {
  return 1.0f / std::sqrt(sum_sq / static_cast<float>(d) + eps);
}

template <typename T>
inline __attribute__((always_inline)) void norm_rows(const T* x, const T* w, T* y, int64_t r0, int64_t r1, int64_t d,
                                                     float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * d;
    T* yr = y + r * d;
    float s[kLanes] = {};
    for (int64_t i = 0; i < d; ++i) {
      const float v = to_f32(xr[i]);
      s[i % kLanes] = std::fma(v, v, s[i % kLanes]);
    }
    const float inv = inv_rms(tree_sum(s), d, eps);
    for (int64_t i = 0; i < d; ++i) yr[i] = static_cast<T>(to_f32(w[i]) * to_f32(static_cast<T>(to_f32(xr[i]) * inv)));
  }
}

template <typename T>
QSK_TARGET_AVX2 void norm_rows_avx2(const T* x, const T* w, T* y, int64_t r0, int64_t r1, int64_t d, float eps) {
  norm_rows(x, w, y, r0, r1, d, eps);
}

// ---- AVX-512: 16 values a step (qsk/avx512_lanes.h), the tail masked ----
// y = round_T(w * round_T(x * inv)) for the lanes of m.
template <typename T>
QSK_TARGET_AVX512 inline __attribute__((always_inline)) void scale16(const T* x, const T* w, T* y, __m512 inv,
                                                                      __mmask16 m) {
  const __m512 n = round16(_mm512_mul_ps(load16(x, m), inv), static_cast<T*>(nullptr));
  store16(y, _mm512_mul_ps(load16(w, m), n), m);
}

template <typename T>
QSK_TARGET_AVX512 void norm_rows_avx512(const T* x, const T* w, T* y, int64_t r0, int64_t r1, int64_t d, float eps) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * d;
    T* yr = y + r * d;
    constexpr int kAcc = kLanes / kVec;
    __m512 acc[kAcc];
    for (int j = 0; j < kAcc; ++j) acc[j] = _mm512_setzero_ps();
    int64_t i = 0;
    for (; i + kLanes <= d; i += kLanes) {
#pragma GCC unroll 4
      for (int j = 0; j < kAcc; ++j) {
        const __m512 v = load16(xr + i + j * kVec, kAll16);
        acc[j] = _mm512_fmadd_ps(v, v, acc[j]);
      }
    }
    for (int j = 0; j < kAcc; ++j) {  // the tail: only the lanes below d (no address past the row)
      const int64_t at = i + j * kVec;
      if (at < d) {
        const __m512 v = load16(xr + at, mask16(d - at));
        acc[j] = _mm512_fmadd_ps(v, v, acc[j]);
      }
    }
    float s[kLanes];
    for (int j = 0; j < kAcc; ++j) _mm512_storeu_ps(s + j * kVec, acc[j]);
    const __m512 inv = _mm512_set1_ps(inv_rms(tree_sum(s), d, eps));
    for (i = 0; i + kVec <= d; i += kVec) scale16(xr + i, w + i, yr + i, inv, kAll16);
    if (i < d) scale16(xr + i, w + i, yr + i, inv, mask16(d - i));
  }
}

at::Tensor rms_norm_cpu(const at::Tensor& x, const at::Tensor& weight, double eps) {
  QSK_CHECK_DEVICE(x, at::kCPU);
  QSK_CHECK_DEVICE(weight, at::kCPU);
  QSK_CHECK_FLOAT(x);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "rms_norm: weight must have x's dtype ", x.scalar_type(),
              ", got ", weight.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "rms_norm: x must have at least 1 dimension, got a 0-D tensor");
  QSK_CHECK_DIM(weight, 1);
  TORCH_CHECK(weight.size(0) == x.size(-1), "rms_norm: weight must have x.size(-1) = ", x.size(-1),
              " entries, got ", weight.size(0));
  TORCH_CHECK(std::isfinite(eps) && eps >= 0, "rms_norm: eps must be finite and >= 0, got ", eps);
  const at::Tensor xc = x.contiguous(), wc = weight.contiguous();
  auto y = at::empty(x.sizes(), x.options().memory_format(at::MemoryFormat::Contiguous));
  const int64_t d = x.size(-1), M = d == 0 ? 0 : x.numel() / d;
  if (M == 0) return y;
  const float e = static_cast<float>(eps);
  const Isa level = isa();
  QSK_DISPATCH_FLOAT(x.scalar_type(), "rms_norm_cpu", [&] {
    const scalar_t* xp = xc.data_ptr<scalar_t>();
    const scalar_t* wp = wc.data_ptr<scalar_t>();
    scalar_t* yp = y.data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, kMinTaskBytes / std::max<int64_t>(1, d * xc.element_size()));
    at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
      if (level == Isa::Avx512)
        norm_rows_avx512(xp, wp, yp, r0, r1, d, e);
      else if (level == Isa::Avx2)
        norm_rows_avx2(xp, wp, yp, r0, r1, d, e);
      else
        norm_rows(xp, wp, yp, r0, r1, d, e);
    });
  });
  return y;
}

}  // namespace
}  // namespace qsk::cpu

TORCH_LIBRARY_IMPL(qsparse, CPU, m) { m.impl("rms_norm_kernel", &qsk::cpu::rms_norm_cpu); }
