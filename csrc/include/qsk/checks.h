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
