// ternary_linear on the GPU (SPEC 7) in one launch. Every block re-derives its row's kept set (top-K
// radix select in its prologue over the row staged in shared memory, select.cuh; none for k = None
// or k = d) and the int8 quantization of the kept entries (SPEC 4: the scale is the row's absmax,
// which is always kept), then runs a split-K W2A8 GEMV over the canonical packed layout (SPEC 6)
// that reads only the kept rows of its split and accumulates exactly in int32 with dp4a, the
// block's kRowGroups thread groups over interleaved quads of rows, summed in shared memory. Splits are summed exactly with int32 atomics
// into a zeroed accumulator; the last block of each output tile applies the float epilogue and
// zeroes the accumulator again. One split: the block applies the epilogue itself.
//
// dp4a trick: for 4 kept rows r0..r3, the same 4 packed bytes (16 outputs) of each row are
// interleaved with __byte_perm so that one 32-bit word holds byte p of every row; its 2-bit field
// j (mask 0x03030303 after a shift by 2j) is then the code c = t + 1 of output 4p + j in each row,
// and dp4a(codes, x_q[r0..r3]) adds sum_r c_r * x_q_r. Since c = t + 1, each block accumulates
// sum(x_q * t) + sum(x_q) over its split and subtracts its split's sum(x_q) once.
#include <torch/library.h>

#include "launch.cuh"
#include "qsk/checks.h"
#include "select.cuh"

namespace qsk::cuda {
namespace {

constexpr int kBytesPerThread = 4;  // 16 outputs per thread

__device__ __forceinline__ unsigned int load4(const uint8_t* p, int64_t avail, bool aligned) {
  if (aligned && avail >= 4) return *reinterpret_cast<const unsigned int*>(p);
  unsigned int w = 0x55555555u;  // padding: code 1 (t = 0) in every field
  for (int b = 0; b < 4; ++b)
    if (b < avail) w = (w & ~(0xffu << (8 * b))) | (static_cast<unsigned int>(p[b]) << (8 * b));
  return w;
}

// y = (acc * x_scale) * scale (+ bias), the reference's operation order without FMA contraction;
// NaN for rows with a non-finite x_scale (non-finite kept entries).
template <typename T>
__device__ __forceinline__ T ternary_epilogue(int acc, float xs, float scale, const T* bias, int64_t o) {
  float v = __fmul_rn(__fmul_rn(static_cast<float>(acc), xs), scale);
  if (bias) v = __fadd_rn(v, static_cast<float>(bias[o]));
  if (!(fabsf(xs) <= 3.0e38f)) v = __int_as_float(0x7fc00000);
  return static_cast<T>(v);
}

// grid (tiles of kGroupThreads * 4 packed bytes, splits, M). Block (tile, split, m): outputs of the tile for
// row m over the kept features of rank [split * rows_per_split, ...). acc_ws [M, out] and counters
// [M, tiles] (zero on entry, zero on exit) only when splits > 1.
template <typename T>
__global__ void __launch_bounds__(kGemvThreads, kBlocksPerSm)
    ternary_linear_kernel(const T* __restrict__ x, int64_t d, int64_t k, const uint8_t* __restrict__ packed,
                          int64_t row_bytes, bool aligned, const float* __restrict__ scale,
                          const T* __restrict__ bias, T* __restrict__ y, int32_t* __restrict__ acc_ws,
                          int* __restrict__ counters, int64_t rows_per_split, int64_t out) {
  static_assert(kGemvThreads == kSelectThreads, "the prologue selects with the GEMV's block");
  static_assert((kRowGroups - 1) * kGroupThreads * 16 * sizeof(int) <= sizeof(StageBuf),
                "the groups' sums reuse the staging buffer");
  __shared__ SelectSmem sm;
  __shared__ StageBuf stage;
  __shared__ typename cub::BlockReduce<int, kGemvThreads>::TempStorage s_red;
  __shared__ int32_t s_idx[kMaxSplitRows];
  __shared__ int8_t s_xq[kMaxSplitRows];
  __shared__ int s_sum, s_last;
  const int64_t m = blockIdx.z, split = blockIdx.y, splits = gridDim.y;
  const T* xr = stage_row<T>(x + m * d, d, stage);
  const int64_t j0 = split * rows_per_split, j1 = min(k, j0 + rows_per_split), n = j1 > j0 ? j1 - j0 : 0;
  const int64_t n4 = (n + 3) / 4 * 4;

  // Prologue: the threshold (k < d) and the row's absmax in one pass over x, the int8 scale.
  const Threshold th = select_threshold<T>(xr, d, k, sm);
  float a = k > 0 ? KeyTraits<T>::value(th.maxkey) : 0.f;
  a = a < 1e-5f ? 1e-5f : a;                        // NaN stays NaN
  const float qs = __fmul_rn(__frcp_rn(a), 127.0f);  // torch's `127.0 / a`: reciprocal, then scale
  const float xs = __fdiv_rn(a, 127.0f);
  int qsum = 0;
  const auto keep = [&](int64_t r, int64_t i, T v) {
    const int8_t q = quantize_i8(__fmul_rn(static_cast<float>(v), qs));
    s_idx[r - j0] = static_cast<int32_t>(i);
    s_xq[r - j0] = q;
    qsum += q;
  };
  if (k == d) {
    for (int64_t j = j0 + threadIdx.x; j < j1; j += kGemvThreads) keep(j, j, xr[j]);
  } else if (k > 0) {
    for_each_kept<T>(xr, d, th, j0, j1, sm, nullptr, keep);
  }
  // Rows past the split's end: row 0 with x_q = 0, so groups of 4 need no tail.
  for (int64_t j = n + threadIdx.x; j < n4; j += kGemvThreads) {
    s_idx[j] = 0;
    s_xq[j] = 0;
  }
  const int split_sum = cub::BlockReduce<int, kGemvThreads>(s_red).Sum(qsum);
  if (threadIdx.x == 0) s_sum = split_sum;
  __syncthreads();

  const int g = threadIdx.x / kGroupThreads, lane = threadIdx.x % kGroupThreads;
  const int64_t b0 = (static_cast<int64_t>(blockIdx.x) * kGroupThreads + lane) * kBytesPerThread;
  const int64_t avail = row_bytes - b0;
  int acc[16];
#pragma unroll
  for (int i = 0; i < 16; ++i) acc[i] = g == 0 ? -s_sum : 0;
  if (b0 < row_bytes) {  // group g: the quads of rows 4 g, 4 (g + kRowGroups), ...
#pragma unroll 2
    for (int64_t j = 4 * g; j < n4; j += 4 * kRowGroups) {
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
  }
  // Group 0 adds the groups' sums (exact) and owns the block's outputs. The barrier after the
  // BlockReduce above ordered the last read of the staged row before the sums overwrite it.
  const bool owner = sum_row_groups(acc, reinterpret_cast<int*>(stage.bytes));
  const int64_t o0 = b0 * 4;  // byte b holds outputs 4b .. 4b + 3
  if (splits > 1) {
    int32_t* dst = acc_ws + m * out;
    if (owner) {
#pragma unroll
      for (int i = 0; i < 16; ++i)
        if (o0 + i < out) atomicAdd(dst + o0 + i, acc[i]);
    }
    if (!arrive_last(counters + m * gridDim.x + blockIdx.x, static_cast<int>(splits), &s_last)) return;
    if (owner) {
#pragma unroll
      for (int i = 0; i < 16; ++i)
        if (o0 + i < out) acc[i] = atomicExch(dst + o0 + i, 0);  // the total, and the zero for the next call
    }
  }
  if (!owner) return;
  const float sc = *scale;
#pragma unroll
  for (int i = 0; i < 16; ++i)
    if (o0 + i < out) y[m * out + o0 + i] = ternary_epilogue<T>(acc[i], xs, sc, bias, o0 + i);
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
  const int64_t tiles = ceil_div(row_bytes, kGroupThreads * kBytesPerThread);
  const SplitPlan plan = plan_splits(k, tiles, M);
  TORCH_CHECK(plan.splits <= 65535, "ternary_linear_cuda: k = ", k, " is too large for one launch");
  int32_t* scratch = plan.splits > 1 ? zeroed_scratch(M * out + M * tiles, x) : nullptr;
  const bool aligned = row_bytes % 4 == 0 && reinterpret_cast<uintptr_t>(packed.data_ptr()) % 4 == 0;
  const auto bias_c = bias ? bias->contiguous() : at::Tensor();
  const auto scale_c = scale.reshape({1}).contiguous();
  const dim3 grid(static_cast<unsigned int>(tiles), static_cast<unsigned int>(plan.splits),
                  static_cast<unsigned int>(M));
  QSK_DISPATCH_FLOAT(x.scalar_type(), "ternary_linear_cuda", [&] {
    launch(ternary_linear_kernel<scalar_t>, grid, kGemvThreads, stream, x.data_ptr<scalar_t>(), d, k,
           packed.data_ptr<uint8_t>(), row_bytes, aligned, scale_c.data_ptr<float>(),
           bias ? bias_c.data_ptr<scalar_t>() : nullptr, y.data_ptr<scalar_t>(), scratch,
           scratch ? scratch + M * out : nullptr, plan.rows_per_split, out);
  });
  QSK_LAUNCH_CHECK();
  return y;
}

}  // namespace qsk::cuda

TORCH_LIBRARY_IMPL(QSK_CUDA_LIB, QSK_CUDA_KEY, m) { m.impl("ternary_linear_kernel", &qsk::cuda::ternary_linear_cuda); }
