// sparse_linear on the GPU: per-row top-K selection, then a split-K gather-GEMV over the
// column-major weight that reads only the kept features' rows (16-byte vector loads, fp32
// accumulation), then a fixed-order reduction of the splits (deterministic, no atomics).
#include <torch/library.h>

#include "launch.cuh"
#include "qsk/checks.h"
#include "select.cuh"

namespace qsk::cuda {
namespace {

constexpr int kSelectThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kSelectThreads)
    select_kernel(const T* __restrict__ x, int64_t d, int64_t k, SelectOut out, T* __restrict__ dense) {
  __shared__ SelectSmem<kSelectThreads> sm;
  const int64_t row = blockIdx.x;
  select_row<T, kSelectThreads>(x + row * d, d, k, row, out, dense ? dense + row * d : nullptr, sm);
}

// Elements per 16-byte load.
template <typename T>
constexpr int vec_of() { return 16 / static_cast<int>(sizeof(T)); }

template <typename T>
__device__ __forceinline__ void load_vec(const T* p, float (&f)[vec_of<T>()]) {
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < vec_of<T>(); ++i) f[i] = static_cast<float>(e[i]);
}

// One block: VEC * 256 consecutive outputs of one row m, over one split of its kept features.
// weight element (o, i) sits at w[o * s_out + i * s_in]; the fast layout has s_out == 1.
template <typename T, bool VECTOR>
__global__ void __launch_bounds__(kGemvThreads)
    gather_gemv_kernel(const T* __restrict__ w, int64_t s_out, int64_t s_in, const int32_t* __restrict__ idx,
                       const float* __restrict__ val, int64_t k, int64_t rows_per_split, float* __restrict__ partial,
                       int64_t out, int64_t M) {
  constexpr int VEC = vec_of<T>();
  __shared__ int32_t s_idx[kMaxSplitRows];
  __shared__ float s_val[kMaxSplitRows];
  const int64_t m = blockIdx.z, split = blockIdx.y;
  const int64_t j0 = split * rows_per_split, j1 = min(k, j0 + rows_per_split);
  for (int64_t j = j0 + threadIdx.x; j < j1; j += blockDim.x) {
    s_idx[j - j0] = idx[m * k + j];
    s_val[j - j0] = val[m * k + j];
  }
  __syncthreads();
  const int64_t o0 = (static_cast<int64_t>(blockIdx.x) * kGemvThreads + threadIdx.x) * VEC;
  if (o0 >= out) return;
  float acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
  const int64_t n = j1 - j0;
  if (VECTOR && o0 + VEC <= out) {
#pragma unroll 4
    for (int64_t j = 0; j < n; ++j) {
      float f[VEC];
      load_vec<T>(w + o0 + static_cast<int64_t>(s_idx[j]) * s_in, f);
      const float v = s_val[j];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = fmaf(v, f[e], acc[e]);
    }
  } else {
    for (int64_t j = 0; j < n; ++j) {
      const T* row = w + static_cast<int64_t>(s_idx[j]) * s_in;
      const float v = s_val[j];
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        if (o0 + e < out) acc[e] = fmaf(v, static_cast<float>(row[(o0 + e) * s_out]), acc[e]);
    }
  }
  float* dst = partial + (split * M + m) * out + o0;
#pragma unroll
  for (int e = 0; e < VEC; ++e)
    if (o0 + e < out) dst[e] = acc[e];
}

// y[m, o] = sum over splits (in order) + bias, cast to T.
template <typename T>
__global__ void reduce_splits_kernel(const float* __restrict__ partial, int64_t splits, int64_t M, int64_t out,
                                     const T* __restrict__ bias, T* __restrict__ y) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= M * out) return;
  float s = 0.f;
  for (int64_t sp = 0; sp < splits; ++sp) s += partial[sp * M * out + t];
  if (bias) s += static_cast<float>(bias[t % out]);
  y[t] = static_cast<T>(s);
}

void check_float_rows(const at::Tensor& x) {
  QSK_CHECK_DEVICE(x, kDevice);
  QSK_CHECK_FLOAT(x);
  QSK_CHECK_DIM(x, 2);
  QSK_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.size(0) <= 2147483647LL, "x has too many rows for one launch: ", x.size(0));
}

}  // namespace

// x [M, d] contiguous; returns the kept indices [M, k] (ascending) and values [M, k] (float32),
// and fills `dense` ([M, d], may be undefined) with the sparsified rows.
std::tuple<at::Tensor, at::Tensor> select_topk_cuda(const at::Tensor& x, int64_t k, const at::Tensor& dense) {
  check_float_rows(x);
  const int64_t M = x.size(0), d = x.size(1);
  TORCH_CHECK(k >= 0 && k <= d, "k must be in [0, ", d, "], got ", k);
  auto idx = at::empty({M, k}, x.options().dtype(at::kInt));
  auto val = at::empty({M, k}, x.options().dtype(at::kFloat));
  if (M == 0 || d == 0) return {idx, val};
  auto stream = current_stream();
  QSK_DISPATCH_FLOAT(x.scalar_type(), "select_topk_cuda", [&] {
    SelectOut out{idx.data_ptr<int32_t>(), val.data_ptr<float>(), nullptr, nullptr, nullptr};
    launch(select_kernel<scalar_t>, static_cast<unsigned int>(M), kSelectThreads, stream, x.data_ptr<scalar_t>(), d, k,
           out, dense.defined() ? dense.data_ptr<scalar_t>() : nullptr);
  });
  QSK_LAUNCH_CHECK();
  return {idx, val};
}

at::Tensor topk_sparsify_cuda(const at::Tensor& x, int64_t k) {
  check_float_rows(x);
  QSK_DEVICE_GUARD(x);
  auto y = at::empty_like(x);
  select_topk_cuda(x, k, y);
  return y;
}

at::Tensor block_topk_sparsify_cuda(const at::Tensor& x, int64_t n, int64_t m) {
  check_float_rows(x);
  TORCH_CHECK(m >= 1 && x.size(1) % m == 0, "x.size(1) = ", x.size(1), " must be divisible by m = ", m);
  TORCH_CHECK(n >= 0 && n <= m, "n must be in [0, m = ", m, "], got ", n);
  QSK_DEVICE_GUARD(x);
  auto blocks = x.reshape({-1, m});
  auto y = at::empty_like(blocks);
  select_topk_cuda(blocks, n, y);
  return y.reshape(x.sizes());
}

at::Tensor sparse_linear_cuda(const at::Tensor& x, const at::Tensor& weight, int64_t k,
                              const std::optional<at::Tensor>& bias) {
  check_float_rows(x);
  QSK_CHECK_DEVICE(weight, kDevice);
  QSK_CHECK_DIM(weight, 2);
  TORCH_CHECK(weight.scalar_type() == x.scalar_type(), "weight must have the dtype of x");
  TORCH_CHECK(weight.size(1) == x.size(1), "weight.size(1) must equal x.size(1)");
  const int64_t M = x.size(0), d = x.size(1), out = weight.size(0);
  TORCH_CHECK(k >= 0 && k <= d, "k must be in [0, ", d, "], got ", k);
  if (bias) {
    QSK_CHECK_DEVICE(*bias, kDevice);
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->dim() == 1 && bias->size(0) == out,
                "bias must be [out_features] in the dtype of x");
  }
  TORCH_CHECK(M <= 65535, "sparse_linear_cuda: at most 65535 rows per call (the grid's z), got ", M,
              "; larger batches take the dense path");
  QSK_DEVICE_GUARD(x);
  auto y = at::empty({M, out}, x.options());
  if (M == 0 || out == 0) return y;
  auto [idx, val] = select_topk_cuda(x, k, at::Tensor());
  auto stream = current_stream();
  const auto bias_c = bias ? bias->contiguous() : at::Tensor();
  QSK_DISPATCH_FLOAT(x.scalar_type(), "sparse_linear_cuda", [&] {
    constexpr int VEC = vec_of<scalar_t>();
    const int64_t tiles = ceil_div(out, kGemvThreads * VEC);
    const SplitPlan plan = plan_splits(k, tiles, M);
    TORCH_CHECK(plan.splits <= 65535, "sparse_linear_cuda: k = ", k, " is too large for one launch");
    auto partial = at::empty({plan.splits, M, out}, x.options().dtype(at::kFloat));
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const int64_t s_out = weight.stride(0), s_in = weight.stride(1);
    const bool vector = s_out == 1 && (s_in * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0 &&
                        reinterpret_cast<uintptr_t>(w) % 16 == 0;
    const dim3 grid(static_cast<unsigned int>(tiles), static_cast<unsigned int>(plan.splits),
                    static_cast<unsigned int>(M));
    if (k > 0) {
      launch(vector ? gather_gemv_kernel<scalar_t, true> : gather_gemv_kernel<scalar_t, false>, grid, kGemvThreads,
             stream, w, s_out, s_in, idx.data_ptr<int32_t>(), val.data_ptr<float>(), k, plan.rows_per_split,
             partial.data_ptr<float>(), out, M);
      QSK_LAUNCH_CHECK();
    } else {
      partial.zero_();
    }
    const int64_t n = M * out;
    launch(reduce_splits_kernel<scalar_t>, static_cast<unsigned int>(ceil_div(n, 256)), 256, stream,
           partial.data_ptr<float>(), plan.splits, M, out, bias ? bias_c.data_ptr<scalar_t>() : nullptr,
           y.data_ptr<scalar_t>());
    QSK_LAUNCH_CHECK();
  });
  return y;
}

}  // namespace qsk::cuda

TORCH_LIBRARY_IMPL(QSK_CUDA_LIB, QSK_CUDA_KEY, m) {
  m.impl("topk_sparsify_kernel", &qsk::cuda::topk_sparsify_cuda);
  m.impl("block_topk_sparsify_kernel", &qsk::cuda::block_topk_sparsify_cuda);
  m.impl("sparse_linear_kernel", &qsk::cuda::sparse_linear_cuda);
}
