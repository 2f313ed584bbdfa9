// SPEC 1 and 2: topk_sparsify and block (N:M) top-k on the CPU, one row (or block) per
// select_topk call (csrc/include/qsk/cpu_select.h).
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cstring>
#include <vector>

#include "qsk/checks.h"
#include "qsk/cpu_select.h"
#include "qsk/isa.h"
#include "sparse_gemv.h"

// Dispatches over the three float dtypes the ops accept (the checks already rejected the rest).
#define QSK_DISPATCH_HALF_FLOAT(type, name, ...)                                   \
  AT_DISPATCH_SWITCH(type, name, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__)         \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) \
                                         AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace qsk::cpu {
namespace {

// Zeroes out[0..d) (+0) and copies the kept entries of x into it.
template <typename T>
inline void scatter_kept(const T* x, T* out, int64_t d, const int32_t* idx, int64_t k) {
  if (k == d) {
    std::memcpy(static_cast<void*>(out), x, d * sizeof(T));
    return;
  }
  std::memset(static_cast<void*>(out), 0, d * sizeof(T));
  for (int64_t j = 0; j < k; ++j) out[idx[j]] = x[idx[j]];
}

// Splits `rows` rows of `d` entries over the threads, ~64K entries per task.
inline int64_t row_grain(int64_t d) { return std::max<int64_t>(1, 65536 / std::max<int64_t>(d, 1)); }

}  // namespace

std::vector<int32_t> select_rows(const at::Tensor& x, int64_t k) {
  const int64_t M = x.size(0), d = x.size(1);
  std::vector<int32_t> kept(static_cast<size_t>(M * k));
  if (M == 0 || k == 0) return kept;
  const Isa level = isa();
  QSK_DISPATCH_HALF_FLOAT(x.scalar_type(), "select_rows", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    at::parallel_for(0, M, row_grain(d), [&](int64_t r0, int64_t r1) {
      std::vector<uint32_t> scratch(select_scratch_words(d));
      for (int64_t r = r0; r < r1; ++r) select_topk(xp + r * d, d, k, kept.data() + r * k, scratch.data(), level);
    });
  });
  return kept;
}

at::Tensor sparsify_kept(const at::Tensor& x, const int32_t* kept, int64_t k) {
  const int64_t M = x.size(0), d = x.size(1);
  auto out = at::empty_like(x);
  if (M == 0 || d == 0) return out;
  QSK_DISPATCH_HALF_FLOAT(x.scalar_type(), "sparsify_kept", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, M, row_grain(d), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) scatter_kept(xp + r * d, op + r * d, d, kept + r * k, k);
    });
  });
  return out;
}

at::Tensor topk_sparsify_cpu(const at::Tensor& x, int64_t k) {
  QSK_CHECK_DEVICE(x, at::kCPU);
  QSK_CHECK_FLOAT(x);
  QSK_CHECK_DIM(x, 2);
  QSK_CHECK_CONTIGUOUS(x);
  const int64_t d = x.size(1);
  TORCH_CHECK(d <= INT32_MAX, "topk_sparsify_kernel: d = ", d, " exceeds INT32_MAX");
  TORCH_CHECK(0 <= k && k <= d, "topk_sparsify_kernel: k must be in [0, d = ", d, "], got ", k);
  return sparsify_kept(x, select_rows(x, k).data(), k);
}

namespace {

at::Tensor block_topk_sparsify_cpu(const at::Tensor& x, int64_t n, int64_t m) {
  QSK_CHECK_DEVICE(x, at::kCPU);
  QSK_CHECK_FLOAT(x);
  QSK_CHECK_DIM(x, 2);
  QSK_CHECK_CONTIGUOUS(x);
  const int64_t M = x.size(0), d = x.size(1);
  TORCH_CHECK(m >= 1 && m <= INT32_MAX, "block_topk_sparsify_kernel: m must be in [1, INT32_MAX], got ", m);
  TORCH_CHECK(0 <= n && n <= m, "block_topk_sparsify_kernel: n must be in [0, m = ", m, "], got ", n);
  TORCH_CHECK(d % m == 0, "block_topk_sparsify_kernel: d = ", d, " must be divisible by m = ", m);
  auto out = at::empty_like(x);
  const int64_t blocks = M * (d / m);  // rows of length m, contiguous
  if (blocks == 0) return out;
  const Isa level = isa();
  QSK_DISPATCH_HALF_FLOAT(x.scalar_type(), "block_topk_sparsify_cpu", [&] {
    const scalar_t* xp = x.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, blocks, row_grain(m), [&](int64_t b0, int64_t b1) {
      std::vector<uint32_t> scratch(select_scratch_words(m));
      std::vector<int32_t> idx(std::max<int64_t>(n, 1));
      for (int64_t b = b0; b < b1; ++b) {
        select_topk(xp + b * m, m, n, idx.data(), scratch.data(), level);
        scatter_kept(xp + b * m, op + b * m, m, idx.data(), n);
      }
    });
  });
  return out;
}

}  // namespace
}  // namespace qsk::cpu

TORCH_LIBRARY_IMPL(qsparse, CPU, m) {
  m.impl("topk_sparsify_kernel", &qsk::cpu::topk_sparsify_cpu);
  m.impl("block_topk_sparsify_kernel", &qsk::cpu::block_topk_sparsify_cpu);
}
