// Argument checks for native kernels: every kernel validates before it touches memory, so a
// direct torch.ops call with bad input raises instead of crashing. (The Python layer gives the
// friendlier messages first; these are the last line of defence.)
#pragma once

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#define QSK_CHECK_DEVICE(t, dev) \
  TORCH_CHECK((t).device().type() == (dev), #t " must be on ", (dev), ", got ", (t).device())
#define QSK_CHECK_DTYPE(t, dt) TORCH_CHECK((t).scalar_type() == (dt), #t " must be ", (dt), ", got ", (t).scalar_type())
#define QSK_CHECK_FLOAT(t)                                                                       \
  TORCH_CHECK((t).scalar_type() == at::kFloat || (t).scalar_type() == at::kBFloat16 ||          \
                  (t).scalar_type() == at::kHalf,                                                \
              #t " must be float32, bfloat16 or float16, got ", (t).scalar_type())
#define QSK_CHECK_DIM(t, n) TORCH_CHECK((t).dim() == (n), #t " must be ", (n), "-D, got ", (t).dim(), "-D")
#define QSK_CHECK_CONTIGUOUS(t) TORCH_CHECK((t).is_contiguous(), #t " must be contiguous")

// Dispatch over the three activation dtypes the ops accept (no double instantiations).
#define QSK_DISPATCH_FLOAT(TYPE, NAME, ...)                               \
  AT_DISPATCH_SWITCH(TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__) AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__))

namespace qsk {

// ternary_linear: the int32 accumulator x_q @ t^T is bounded by 127 * d (|x_q| <= 127, |t| <= 1), so
// d <= (2^31 - 1) / 127 = 16,909,320 can never overflow (qsparse_kernels/_validate.py: MAX_TERNARY_D).
constexpr int64_t kMaxTernaryD = 2147483647LL / 127;

// The linear kernels take x as [..., d] (any leading dims, any strides) and return [..., out]:
// the flattening happens here, in C++, instead of two Python view calls (~2.5 us) per layer call.
// as_rows: x as a contiguous [M, d] matrix (x itself when it already is one; M = 0 works).
inline at::Tensor as_rows(const at::Tensor& x, const char* op) {
  TORCH_CHECK(x.dim() >= 1, op, ": x must have at least 1 dimension, got a 0-D tensor");
  if (x.dim() == 2 && x.is_contiguous()) return x;
  int64_t M = 1;
  for (int64_t i = 0; i + 1 < x.dim(); ++i) M *= x.size(i);
  return x.contiguous().view({M, x.size(-1)});
}

// A [M, n] result of as_rows(x) back to x's leading dims: [..., n].
inline at::Tensor unrows(const at::Tensor& y, const at::Tensor& x) {
  if (x.dim() == 2) return y;
  auto shape = x.sizes().vec();
  shape.back() = y.size(1);
  return y.view(shape);
}

}  // namespace qsk
