// The multi-segment ("sibling projections") CPU kernels: the interface between their ops
// (csrc/cpu/fused_linear.cpp) and the single-op files whose M == 1 cores they share
// (sparse_linear.cpp, ternary_linear.cpp). A segment is one projection's weight; every segment
// reads the same activation row, so the top-K (and, for ternary, the int8 quantization) runs once.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "qsk/isa.h"
#include "sparse_gemv.h"

namespace qsk::cpu {

// sparse_linear's panel for the run-time ISA `level` (the AVX-512 or AVX2 kernel, or the portable
// one): the contract of sparse_gemv_panel_avx512 (sparse_gemv.h). A
// column's result depends only on its own weights and `rows`, never on j0, ncols or the panel.
template <typename T>
void sparse_gemv_panel(Isa level, const T* wt, int64_t ld, const SparseRows& rows, int64_t j0, int64_t ncols,
                       float* out, int64_t out_stride);

// sparse_linear_kernel on x as a contiguous [M, d] float matrix (as_rows), with every check of the
// single op; returns [M, N]. kept: the rows' kept features from select_rows(x, k), or nullptr to
// select them here (sparse_linear.cpp).
at::Tensor sparse_linear_rows(const at::Tensor& x, const at::Tensor& weight, int64_t k,
                              const std::optional<at::Tensor>& bias, const int32_t* kept);

namespace ternary {

// One packed weight [d, cols] (canonical layout, rows `stride` >= cols bytes apart: see
// packed_stride) over a shared row plan.
struct Segment {
  const uint8_t* packed;
  int64_t cols;
  int64_t stride;
};

// The bytes from one row of packed (uint8 2-D [d, cols]) to the next when each row's cols bytes
// are contiguous (a contiguous weight, or a column range of a wider one), else -1 (the kernels
// need a copy).
int64_t packed_stride(const at::Tensor& packed);

// Packed bytes per row of a weight with out_features outputs: ceil(out_features / 4) (SPEC 6).
inline int64_t packed_cols(int64_t out_features) { return out_features / 4 + (out_features % 4 != 0); }

// Why (packed, scale, out_features, k, bias) is not a weight the single op accepts for the rows x
// [M, d], in the words of its error, or "" when it is: every argument check of ternary_linear_kernel
// on a weight, in one place (check_weight throws it; the multi op's M == 1 path takes a segment
// with a problem as not fusable and lets the single op raise). k = nullopt skips the k check.
// Layout is not a problem here: a packed weight whose rows are not contiguous bytes is copied.
std::string weight_problem(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale,
                           int64_t out_features, std::optional<int64_t> k, const std::optional<at::Tensor>& bias);

// The widest row of siblings side by side that the M == 1 pass reads as one weight, whole, on this
// CPU (under the ISA cap). Wider, each block of the row-split pass would read every other run of
// bytes, which DRAM serves worse than separate buffers (AVX2 path forced on AMD EPYC Zen 4,
// 2816-byte merged gate/up rows in 2048-byte blocks, M = 1, dense: separate / merged time
// 0.91-0.93); so SiblingGroup stores no wider group side by side (_C.cpu_ternary_merge_max_bytes).
int64_t merge_max_bytes();

// out[s] = ternary_linear(x, packed[s], scale[s], out_features[s], k, bias[s]) bit for bit, for
// one row x [1, d] (contiguous float), with one top-K + quantization and one row-split pass
// over every segment (the M == 1 row-split path of ternary_linear.cpp). Needs isa() Avx512 or Avx2 and
// arguments the single op accepts (the caller, fused_linear.cpp, checks them): packed[s] uint8
// [d, ceil(out_features[s] / 4)] with rows of contiguous bytes (packed_stride >= 0), bias[s] nullptr or [out_features[s]] contiguous of
// x's dtype, k < 0 for dense. Returns [1, out_features[s]] tensors. Segments stored side by side
// (column ranges of one buffer, in order: sibling weights concatenated by SiblingGroup) are read
// as one wider weight, so each kept row is one run of bytes instead of one per segment.
std::vector<at::Tensor> ternary_linear_multi_m1(const at::Tensor& x, const std::vector<at::Tensor>& packed,
                                                const std::vector<float>& scale, const std::vector<int64_t>& out_features,
                                                int64_t k, const std::vector<const at::Tensor*>& bias);

// out[s] = ternary_linear_kernel(x, packed[s], scales[s], out_features[s], k, biases[s]) bit for
// bit, for x [..., d] float with d <= kMaxTernaryD and k (if any) in [0, d]: every row's top-K and
// int8 quantization run once, then each segment takes the single op's path over them (with its
// checks). The several-rows path of ternary_linear_multi_kernel.
std::vector<at::Tensor> ternary_linear_multi_rows(const at::Tensor& x, at::TensorList packed, at::TensorList scales,
                                                  at::IntArrayRef out_features, std::optional<int64_t> k,
                                                  const c10::List<std::optional<at::Tensor>>& biases);

}  // namespace ternary
}  // namespace qsk::cpu
