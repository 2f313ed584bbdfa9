// SPEC 4 on the GPU: per-row absmax int8 activation quantization, bit-exact with the reference.
// One block per row; the absmax is an integer max over |x| bits (NaN above Inf, as on the CPU).
#include <torch/library.h>

#include "qsk/checks.h"
#include "runtime.cuh"

namespace qsk::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void quantize_act_int8_kernel(const T* __restrict__ x, int8_t* __restrict__ q, float* __restrict__ scale,
                                         int64_t d) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * d;
  unsigned int m = 0;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    const unsigned int k = __float_as_uint(static_cast<float>(xr[i])) & 0x7fffffffu;
    m = max(m, k);
  }
  __shared__ unsigned int red[kThreads / 32];
  for (int off = 16; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
  if ((threadIdx.x & 31) == 0) red[threadIdx.x >> 5] = m;
  __syncthreads();
  if (threadIdx.x < 32) {
    m = threadIdx.x < (blockDim.x >> 5) ? red[threadIdx.x] : 0u;
    for (int off = 16; off > 0; off >>= 1) m = max(m, __shfl_xor_sync(0xffffffffu, m, off));
    if (threadIdx.x == 0) red[0] = m;
  }
  __syncthreads();
  float a = __uint_as_float(red[0]);
  a = a < 1e-5f ? 1e-5f : a;            // NaN stays NaN
  const float s = __fmul_rn(__frcp_rn(a), 127.0f);  // as torch evaluates `127.0 / a`: reciprocal, then scale
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) {
    float r = rintf(__fmul_rn(static_cast<float>(xr[i]), s));  // round half to even
    r = (fabsf(r) <= 3.0e38f) ? fminf(fmaxf(r, -128.f), 127.f) : 0.f;
    q[row * d + i] = static_cast<int8_t>(r);
  }
  if (threadIdx.x == 0) scale[row] = __fdiv_rn(a, 127.0f);
}

std::tuple<at::Tensor, at::Tensor> quantize_act_int8_cuda(const at::Tensor& x) {
  QSK_CHECK_DEVICE(x, kDevice);
  QSK_CHECK_FLOAT(x);
  QSK_CHECK_DIM(x, 2);
  QSK_CHECK_CONTIGUOUS(x);
  QSK_DEVICE_GUARD(x);
  const int64_t M = x.size(0), d = x.size(1);
  TORCH_CHECK(M <= 2147483647LL, "x has too many rows for one launch: ", M);
  auto q = at::empty({M, d}, x.options().dtype(at::kChar));
  auto scale = at::empty({M, 1}, x.options().dtype(at::kFloat));
  if (M == 0) return {q, scale};
  auto stream = current_stream();
  QSK_DISPATCH_FLOAT(x.scalar_type(), "quantize_act_int8_cuda", [&] {
    launch(quantize_act_int8_kernel<scalar_t>, static_cast<unsigned int>(M), kThreads, stream, x.data_ptr<scalar_t>(),
           q.data_ptr<int8_t>(), scale.data_ptr<float>(), d);
  });
  QSK_LAUNCH_CHECK();
  return {q, scale};
}

}  // namespace
}  // namespace qsk::cuda

TORCH_LIBRARY_IMPL(QSK_CUDA_LIB, QSK_CUDA_KEY, m) { m.impl("quantize_act_int8_kernel", &qsk::cuda::quantize_act_int8_cuda); }
