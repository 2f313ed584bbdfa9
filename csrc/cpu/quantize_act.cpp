// SPEC 4: per-row absmax int8 activation quantization (BitNet b1.58 ActQuant), bit-exact.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "qsk/avx2_lanes.h"
#include "qsk/checks.h"
#include "qsk/cpu_common.h"
#include "qsk/isa.h"

namespace qsk::cpu {
namespace {

template <typename T>
inline __attribute__((always_inline)) void quant_rows(const T* x, int8_t* q, float* scale, int64_t r0, int64_t r1,
                                                      int64_t d) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * d;
    float a = key_to_float(absmax_key(xr, d));
    a = a < 1e-5f ? 1e-5f : a;  // NaN stays NaN
    const float s = (1.0f / a) * 127.0f;  // as torch evaluates `127.0 / a` (reciprocal, then scale)
    for (int64_t i = 0; i < d; ++i) q[r * d + i] = quantize_i8(to_f32(xr[i]) * s);
    scale[r] = a / 127.0f;
  }
}

template <typename T>
QSK_TARGET_AVX512 void quant_rows_avx512(const T* x, int8_t* q, float* s, int64_t r0, int64_t r1, int64_t d) {
  quant_rows(x, q, s, r0, r1, d);
}
// quant_rows for AVX2: the quantization 8 entries per step (quantize8, the same bytes); GCC leaves
// the scalar loop scalar there.
template <typename T>
QSK_TARGET_AVX2 void quant_rows_avx2(const T* x, int8_t* q, float* scale, int64_t r0, int64_t r1, int64_t d) {
  for (int64_t r = r0; r < r1; ++r) {
    const T* xr = x + r * d;
    float a = key_to_float(absmax_key(xr, d));
    a = a < 1e-5f ? 1e-5f : a;  // NaN stays NaN
    const float s = (1.0f / a) * 127.0f;
    quantize_row8(xr, d, s, q + r * d, nullptr);
    scale[r] = a / 127.0f;
  }
}

std::tuple<at::Tensor, at::Tensor> quantize_act_int8_cpu(const at::Tensor& x) {
  QSK_CHECK_DEVICE(x, at::kCPU);
  QSK_CHECK_FLOAT(x);
  QSK_CHECK_DIM(x, 2);
  QSK_CHECK_CONTIGUOUS(x);
  const int64_t M = x.size(0), d = x.size(1);
  auto q = at::empty({M, d}, x.options().dtype(at::kChar));
  auto scale = at::empty({M, 1}, x.options().dtype(at::kFloat));
  const Isa level = isa();
  QSK_DISPATCH_FLOAT(x.scalar_type(), "quantize_act_int8_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    int8_t* qp = q.data_ptr<int8_t>();
    float* sp = scale.data_ptr<float>();
    const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(d, 1));
    at::parallel_for(0, M, grain, [&](int64_t r0, int64_t r1) {
      if (level == Isa::Avx512)
        quant_rows_avx512(xp, qp, sp, r0, r1, d);
      else if (level == Isa::Avx2)
        quant_rows_avx2(xp, qp, sp, r0, r1, d);
      else
        quant_rows(xp, qp, sp, r0, r1, d);
    });
  });
  return {q, scale};
}

}  // namespace
}  // namespace qsk::cpu

TORCH_LIBRARY_IMPL(qsparse, CPU, m) { m.impl("quantize_act_int8_kernel", &qsk::cpu::quantize_act_int8_cpu); }
