// sparse_linear on the GPU in one launch: every block re-derives the kept set of its row (top-K
// radix select in its prologue over the row staged in shared memory, select.cuh), keeps the kept
// features of its split-K range in shared memory, runs a gather-GEMV over the column-major weight
// that reads only those features' rows (16-byte vector loads, fp32 accumulation, the block's
// kRowGroups thread groups over interleaved rows, summed in shared memory), and the last block of
// each output tile sums the splits' partials in split order (deterministic, no float atomics) and
// adds the bias. One split: no partials, the block writes y itself.
#include <torch/library.h>

#include "launch.cuh"
#include "qsk/checks.h"
#include "select.cuh"

namespace qsk::cuda {
namespace {

template <typename T>
__global__ void __launch_bounds__(kSelectThreads, 1)
    topk_sparsify_kernel(const T* __restrict__ x, int64_t d, int64_t k, T* __restrict__ dense) {
  __shared__ SelectSmem sm;
  __shared__ StageBuf stage;
  const int64_t row = blockIdx.x;
  const T* xr = stage_row<T>(x + row * d, d, stage);
  const Threshold th = select_threshold<T>(xr, d, k, sm);
  for_each_kept<T>(xr, d, th, 0, 0, sm, dense + row * d, [](int64_t, int64_t, T) {});
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

// grid (output tiles of VEC * kGroupThreads, splits, M). Block (tile, split, m): outputs
// [tile * VEC * kGroupThreads, ...) of row m over the kept features of rank [split * rows_per_split, ...).
// weight element (o, i) sits at w[o * s_out + i * s_in]; the fast layout has s_out == 1.
// partial [splits, M, out] and counters [M, tiles] (zero on entry, zero on exit) only when splits > 1.
template <typename T, bool VECTOR>
__global__ void __launch_bounds__(kGemvThreads, kBlocksPerSm)
    sparse_linear_kernel(const T* __restrict__ x, int64_t d, int64_t k, const T* __restrict__ w, int64_t s_out,
                         int64_t s_in, const T* __restrict__ bias, T* __restrict__ y, float* __restrict__ partial,
                         int* __restrict__ counters, int64_t rows_per_split, int64_t out) {
  static_assert(kGemvThreads == kSelectThreads, "the prologue selects with the GEMV's block");
  constexpr int VEC = vec_of<T>();
  static_assert((kRowGroups - 1) * kGroupThreads * VEC * sizeof(float) <= sizeof(StageBuf),
                "the groups' sums reuse the staging buffer");
  __shared__ SelectSmem sm;
  __shared__ StageBuf stage;
  __shared__ int32_t s_idx[kMaxSplitRows];
  __shared__ float s_val[kMaxSplitRows];
  __shared__ int s_last;
  const int64_t m = blockIdx.z, split = blockIdx.y, splits = gridDim.y, M = gridDim.z;
  const int64_t j0 = split * rows_per_split, j1 = min(k, j0 + rows_per_split), n = j1 > j0 ? j1 - j0 : 0;
  if (k == d) {  // every feature kept: rank == index, no selection
    const T* xr = x + m * d;
    for (int64_t j = j0 + threadIdx.x; j < j1; j += kGemvThreads) {
      s_idx[j - j0] = static_cast<int32_t>(j);
      s_val[j - j0] = static_cast<float>(xr[j]);
    }
  } else if (k > 0) {
    const T* xr = stage_row<T>(x + m * d, d, stage);
    const Threshold th = select_threshold<T>(xr, d, k, sm);
    for_each_kept<T>(xr, d, th, j0, j1, sm, nullptr, [&](int64_t r, int64_t i, T v) {
      s_idx[r - j0] = static_cast<int32_t>(i);
      s_val[r - j0] = static_cast<float>(v);
    });
  }
  __syncthreads();  // s_idx / s_val written; the staged row is no longer read
  const int g = threadIdx.x / kGroupThreads, lane = threadIdx.x % kGroupThreads;
  const int64_t o0 = (static_cast<int64_t>(blockIdx.x) * kGroupThreads + lane) * VEC;
  float acc[VEC];
#pragma unroll
  for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
  if (VECTOR && o0 + VEC <= out) {
#pragma unroll 8
    for (int64_t j = g; j < n; j += kRowGroups) {
      float f[VEC];
      load_vec<T>(w + o0 + static_cast<int64_t>(s_idx[j]) * s_in, f);
      const float v = s_val[j];
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = fmaf(v, f[e], acc[e]);
    }
  } else if (o0 < out) {
    for (int64_t j = g; j < n; j += kRowGroups) {
      const T* row = w + static_cast<int64_t>(s_idx[j]) * s_in;
      const float v = s_val[j];
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        if (o0 + e < out) acc[e] = fmaf(v, static_cast<float>(row[(o0 + e) * s_out]), acc[e]);
    }
  }
  // Group 0 adds the groups' sums (in group order) and owns the block's outputs.
  const bool owner = sum_row_groups(acc, reinterpret_cast<float*>(stage.bytes));
  if (splits > 1) {
    if (owner) {
      float* dst = partial + (split * M + m) * out;
#pragma unroll
      for (int e = 0; e < VEC; ++e)
        if (o0 + e < out) dst[o0 + e] = acc[e];
    }
    if (!arrive_last(counters + m * gridDim.x + blockIdx.x, static_cast<int>(splits), &s_last)) return;
    if (owner) {  // 0 + p_0 + p_1 + ... for each output: split order, whatever the arrival order
#pragma unroll
      for (int e = 0; e < VEC; ++e) acc[e] = 0.f;
#pragma unroll 4
      for (int64_t sp = 0; sp < splits; ++sp) {
        const float* src = partial + (sp * M + m) * out + o0;
#pragma unroll
        for (int e = 0; e < VEC; ++e)
          if (o0 + e < out) acc[e] += __ldcg(src + e);
      }
    }
  }
  if (!owner) return;
#pragma unroll
  for (int e = 0; e < VEC; ++e) {
    if (o0 + e >= out) continue;
    float s = acc[e];
    if (bias) s += static_cast<float>(bias[o0 + e]);
    y[m * out + o0 + e] = static_cast<T>(s);
  }
}

void check_float_rows(const at::Tensor& x) {
  QSK_CHECK_DEVICE(x, kDevice);
  QSK_CHECK_FLOAT(x);
  QSK_CHECK_DIM(x, 2);
  QSK_CHECK_CONTIGUOUS(x);
  TORCH_CHECK(x.size(0) <= 2147483647LL, "x has too many rows for one launch: ", x.size(0));
}

}  // namespace

// x [M, d] contiguous; fills `dense` ([M, d]) with the rows sparsified to their top k.
void topk_into_cuda(const at::Tensor& x, int64_t k, const at::Tensor& dense) {
  check_float_rows(x);
  const int64_t M = x.size(0), d = x.size(1);
  TORCH_CHECK(k >= 0 && k <= d, "k must be in [0, ", d, "], got ", k);
  if (M == 0 || d == 0) return;
  auto stream = current_stream();
  QSK_DISPATCH_FLOAT(x.scalar_type(), "topk_sparsify_cuda", [&] {
    launch(topk_sparsify_kernel<scalar_t>, static_cast<unsigned int>(M), kSelectThreads, stream,
           x.data_ptr<scalar_t>(), d, k, dense.data_ptr<scalar_t>());
  });
  QSK_LAUNCH_CHECK();
}

at::Tensor topk_sparsify_cuda(const at::Tensor& x, int64_t k) {
  check_float_rows(x);
  QSK_DEVICE_GUARD(x);
  auto y = at::empty_like(x);
  topk_into_cuda(x, k, y);
  return y;
}

at::Tensor block_topk_sparsify_cuda(const at::Tensor& x, int64_t n, int64_t m) {
  check_float_rows(x);
  TORCH_CHECK(m >= 1 && x.size(1) % m == 0, "x.size(1) = ", x.size(1), " must be divisible by m = ", m);
  TORCH_CHECK(n >= 0 && n <= m, "n must be in [0, m = ", m, "], got ", n);
  QSK_DEVICE_GUARD(x);
  auto blocks = x.reshape({-1, m});
  auto y = at::empty_like(blocks);
  topk_into_cuda(blocks, n, y);
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
  auto stream = current_stream();
  const auto bias_c = bias ? bias->contiguous() : at::Tensor();
  QSK_DISPATCH_FLOAT(x.scalar_type(), "sparse_linear_cuda", [&] {
    constexpr int VEC = vec_of<scalar_t>();
    const int64_t tiles = ceil_div(out, kGroupThreads * VEC);
    const SplitPlan plan = plan_splits(k, tiles, M);
    TORCH_CHECK(plan.splits <= 65535, "sparse_linear_cuda: k = ", k, " is too large for one launch");
    at::Tensor partial;
    int* counters = nullptr;
    if (plan.splits > 1) {
      partial = at::empty({plan.splits, M, out}, x.options().dtype(at::kFloat));
      counters = zeroed_scratch(M * tiles, x);
    }
    const scalar_t* w = weight.data_ptr<scalar_t>();
    const int64_t s_out = weight.stride(0), s_in = weight.stride(1);
    const bool vector = s_out == 1 && (s_in * static_cast<int64_t>(sizeof(scalar_t))) % 16 == 0 &&
                        reinterpret_cast<uintptr_t>(w) % 16 == 0;
    const dim3 grid(static_cast<unsigned int>(tiles), static_cast<unsigned int>(plan.splits),
                    static_cast<unsigned int>(M));
    launch(vector ? sparse_linear_kernel<scalar_t, true> : sparse_linear_kernel<scalar_t, false>, grid, kGemvThreads,
           stream, x.data_ptr<scalar_t>(), d, k, w, s_out, s_in, bias ? bias_c.data_ptr<scalar_t>() : nullptr,
           y.data_ptr<scalar_t>(), plan.splits > 1 ? partial.data_ptr<float>() : nullptr, counters,
           plan.rows_per_split, out);
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
