// ternary_linear on the GPU (SPEC 7): per-row top-K + int8 quantization of the kept entries, then
// a split-K W2A8 GEMV over the canonical packed layout (SPEC 6) that reads only the kept rows and
// accumulates exactly in int32 with dp4a, then the float epilogue.
//
// dp4a trick: for 4 kept rows r0..r3, the same 4 packed bytes (16 outputs) of each row are
// interleaved with __byte_perm so that one 32-bit word holds byte p of every row; its 2-bit field
// j (mask 0x03030303 after a shift by 2j) is then the code c = t + 1 of output 4p + j in each row,
// and dp4a(codes, x_q[r0..r3]) adds sum_r c_r * x_q_r. Since c = t + 1, the kernel accumulates
// sum(x_q * t) + sum(x_q); the epilogue subtracts sum(x_q) over the kept entries once.
#include <torch/library.h>

#include "launch.cuh"
#include "qsk/checks.h"
#include "select.cuh"

namespace qsk::cuda {
namespace {

constexpr int kSelectThreads = 256;
constexpr int kBytesPerThread = 4;  // 16 outputs per thread

template <typename T>
__global__ void __launch_bounds__(kSelectThreads)
    select_quant_kernel(const T* __restrict__ x, int64_t d, int64_t k, SelectOut out) {
  __shared__ SelectSmem<kSelectThreads> sm;
  const int64_t row = blockIdx.x;
  select_row<T, kSelectThreads>(x + row * d, d, k, row, out, nullptr, sm);
}

__device__ __forceinline__ unsigned int load4(const uint8_t* p, int64_t avail, bool aligned) {
  if (aligned && avail >= 4) return *reinterpret_cast<const unsigned int*>(p);
  unsigned int w = 0x55555555u;  // padding: code 1 (t = 0) in every field
  for (int b = 0; b < 4; ++b)
    if (b < avail) w = (w & ~(0xffu << (8 * b))) | (static_cast<unsigned int>(p[b]) << (8 * b));
  return w;
}

// grid (tiles of 256*4 bytes, splits, M): partial[split, m, o] = sum over the split's kept rows of
// code(row, o) * x_q(row).
__global__ void __launch_bounds__(kGemvThreads)
    ternary_gemv_kernel(const uint8_t* __restrict__ packed, int64_t row_bytes, bool aligned,
                        const int32_t* __restrict__ idx, const int8_t* __restrict__ xq, int64_t k,
                        int64_t rows_per_split, int32_t* __restrict__ partial, int64_t out, int64_t M) {
  __shared__ int32_t s_idx[kMaxSplitRows];
  __shared__ int8_t s_xq[kMaxSplitRows];
  const int64_t m = blockIdx.z, split = blockIdx.y;
  const int64_t j0 = split * rows_per_split, j1 = min(k, j0 + rows_per_split);
  const int64_t n = j1 - j0, n4 = (n + 3) / 4 * 4;
  for (int64_t j = threadIdx.x; j < n4; j += blockDim.x) {
    // Rows past the split's end repeat a valid row with x_q = 0, so groups of 4 need no tail.
    s_idx[j] = idx[m * k + (j < n ? j0 + j : j0)];
    s_xq[j] = j < n ? xq[m * k + j0 + j] : int8_t(0);
  }
  __syncthreads();
  const int64_t b0 = (static_cast<int64_t>(blockIdx.x) * kGemvThreads + threadIdx.x) * kBytesPerThread;
  if (b0 >= row_bytes) return;
  const int64_t avail = row_bytes - b0;
  int acc[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) acc[i] = 0;
#pragma unroll 2
  for (int64_t j = 0; j < n4; j += 4) {
    const unsigned int w0 = load4(packed + static_cast<int64_t>(s_idx[j]) * row_bytes + b0, avail, aligned);
    const unsigned int w1 = load4(packed + static_cast<int64_t>(s_idx[j + 1]) * row_bytes + b0, avail, aligned);
    const unsigned int w2 = load4(packed + static_cast<int64_t>(s_idx[j + 2]) * row_bytes + b0, avail, aligned);
    const unsigned int w3 = load4(packed + static_cast<int64_t>(s_idx[j + 3]) * row_bytes + b0, avail, aligned);
    const int x4 = static_cast<int>(static_cast<uint8_t>(s_xq[j])) |
                   (static_cast<int>(static_cast<uint8_t>(s_xq[j + 1])) << 8) |
                   (static_cast<int>(static_cast<uint8_t>(s_xq[j + 2])) << 16) |
                   (static_cast<int>(static_cast<uint8_t>(s_xq[j + 3])) << 24);
#pragma unroll
    for (int p = 0; p < 4; ++p) {
      // byte p of w0 and w1 -> low half; of w2 and w3 -> high half: (w0.p, w1.p, w2.p, w3.p)
      const unsigned int sel = static_cast<unsigned int>(p) | (static_cast<unsigned int>(p + 4) << 4);
      const unsigned int lo = __byte_perm(w0, w1, sel), hi = __byte_perm(w2, w3, sel);
      const unsigned int v = __byte_perm(lo, hi, 0x5410);
#pragma unroll
      for (int jj = 0; jj < 4; ++jj) {
        const int codes = static_cast<int>((v >> (2 * jj)) & 0x03030303u);  // bytes in {0, 1, 2}
        acc[p * 4 + jj] = __dp4a(codes, x4, acc[p * 4 + jj]);
      }
    }
  }
  int32_t* dst = partial + (split * M + m) * out;
  const int64_t o0 = b0 * 4;  // byte b holds outputs 4b .. 4b + 3
#pragma unroll
  for (int i = 0; i < 16; ++i)
    if (o0 + i < out) dst[o0 + i] = acc[i];
}

// y = (sum_splits - sum x_q) * x_scale * scale (+ bias), NaN for rows with a non-finite x_scale.
template <typename T>
__global__ void ternary_epilogue_kernel(const int32_t* __restrict__ partial, int64_t splits, int64_t M, int64_t out,
                                        const int32_t* __restrict__ xq_sum, const float* __restrict__ x_scale,
                                        const float* __restrict__ scale, const T* __restrict__ bias,
                                        T* __restrict__ y) {
  const int64_t t = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (t >= M * out) return;
  const int64_t m = t / out;
  int acc = -xq_sum[m];
  for (int64_t sp = 0; sp < splits; ++sp) acc += partial[sp * M * out + t];
  const float xs = x_scale[m];
  // Same operation order as the reference, without FMA contraction: (acc * x_scale) * scale + bias.
  float v = __fmul_rn(__fmul_rn(static_cast<float>(acc), xs), *scale);
  if (bias) v = __fadd_rn(v, static_cast<float>(bias[t % out]));
  if (!(fabsf(xs) <= 3.0e38f)) v = __int_as_float(0x7fc00000);  // non-finite kept entries
  y[t] = static_cast<T>(v);
}

}  // namespace

// x [M, d] contiguous float; packed uint8 [d, ceil(out/4)] contiguous; scale float32 (1 element);
// k = -1 for dense activations. Returns y [M, out] in x's dtype.
at::Tensor ternary_linear_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                               int64_t out_features, std::optional<int64_t> k_opt,
                               const std::optional<at::Tensor>& bias) {
  QSK_CHECK_DEVICE(x, kDevice);
  QSK_CHECK_FLOAT(x);
  QSK_CHECK_DIM(x, 2);
  QSK_CHECK_CONTIGUOUS(x);
  QSK_CHECK_DEVICE(packed, kDevice);
  QSK_CHECK_DTYPE(packed, at::kByte);
  QSK_CHECK_DIM(packed, 2);
  QSK_CHECK_CONTIGUOUS(packed);
  QSK_CHECK_DEVICE(scale, kDevice);
  QSK_CHECK_DTYPE(scale, at::kFloat);
  TORCH_CHECK(scale.numel() == 1, "scale must have one element");
  const int64_t M = x.size(0), d = x.size(1), out = out_features;
  TORCH_CHECK(out >= 0, "out_features must be >= 0");
  TORCH_CHECK(d <= kMaxTernaryD, "ternary_linear_cuda: d = ", d, " is above ", kMaxTernaryD,
              ", the largest in_features whose int32 accumulator cannot overflow");
  const int64_t row_bytes = (out + 3) / 4;
  TORCH_CHECK(packed.size(0) == d && packed.size(1) == row_bytes, "packed must be [", d, ", ", row_bytes, "], got ",
              packed.sizes());
  const int64_t k = k_opt ? *k_opt : d;
  TORCH_CHECK(k >= 0 && k <= d, "k must be in [0, ", d, "], got ", k);
  TORCH_CHECK(M <= 65535, "ternary_linear_cuda: at most 65535 rows per call, got ", M);
  if (bias) {
    QSK_CHECK_DEVICE(*bias, kDevice);
    TORCH_CHECK(bias->scalar_type() == x.scalar_type() && bias->dim() == 1 && bias->size(0) == out,
                "bias must be [out_features] in the dtype of x");
  }
  QSK_DEVICE_GUARD(x);
  auto y = at::empty({M, out}, x.options());
  if (M == 0 || out == 0) return y;
  auto stream = current_stream();
  auto idx = at::empty({M, k}, x.options().dtype(at::kInt));
  auto xq = at::empty({M, k}, x.options().dtype(at::kChar));
  auto x_scale = at::empty({M}, x.options().dtype(at::kFloat));
  auto xq_sum = at::empty({M}, x.options().dtype(at::kInt));
  if (d > 0) {
    QSK_DISPATCH_FLOAT(x.scalar_type(), "ternary_select_cuda", [&] {
      SelectOut so{idx.data_ptr<int32_t>(), nullptr, xq.data_ptr<int8_t>(), x_scale.data_ptr<float>(),
                   xq_sum.data_ptr<int32_t>()};
      launch(select_quant_kernel<scalar_t>, static_cast<unsigned int>(M), kSelectThreads, stream,
             x.data_ptr<scalar_t>(), d, k, so);
    });
    QSK_LAUNCH_CHECK();
  } else {
    x_scale.fill_(1e-5f / 127.0f);
    xq_sum.zero_();
  }
  const int64_t tiles = ceil_div(row_bytes, kGemvThreads * kBytesPerThread);
  const SplitPlan plan = plan_splits(k, tiles, M);
  TORCH_CHECK(plan.splits <= 65535, "ternary_linear_cuda: k = ", k, " is too large for one launch");
  auto partial = at::empty({plan.splits, M, out}, x.options().dtype(at::kInt));
  if (k > 0) {
    const bool aligned = row_bytes % 4 == 0 && reinterpret_cast<uintptr_t>(packed.data_ptr()) % 4 == 0;
    const dim3 grid(static_cast<unsigned int>(tiles), static_cast<unsigned int>(plan.splits),
                    static_cast<unsigned int>(M));
    launch(ternary_gemv_kernel, grid, kGemvThreads, stream, packed.data_ptr<uint8_t>(), row_bytes, aligned,
           idx.data_ptr<int32_t>(), xq.data_ptr<int8_t>(), k, plan.rows_per_split, partial.data_ptr<int32_t>(), out,
           M);
    QSK_LAUNCH_CHECK();
  } else {
    partial.zero_();
  }
  const auto bias_c = bias ? bias->contiguous() : at::Tensor();
  const auto scale_c = scale.reshape({1}).contiguous();
  QSK_DISPATCH_FLOAT(x.scalar_type(), "ternary_epilogue_cuda", [&] {
    const int64_t n = M * out;
    launch(ternary_epilogue_kernel<scalar_t>, static_cast<unsigned int>(ceil_div(n, 256)), 256, stream,
        partial.data_ptr<int32_t>(), plan.splits, M, out, xq_sum.data_ptr<int32_t>(), x_scale.data_ptr<float>(),
        scale_c.data_ptr<float>(), bias ? bias_c.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>());
  });
  QSK_LAUNCH_CHECK();
  return y;
}

}  // namespace qsk::cuda

TORCH_LIBRARY_IMPL(QSK_CUDA_LIB, QSK_CUDA_KEY, m) { m.impl("ternary_linear_kernel", &qsk::cuda::ternary_linear_cuda); }
