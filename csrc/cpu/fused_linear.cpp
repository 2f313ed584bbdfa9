// Sibling projections on the CPU: sparse_linear_multi_kernel and ternary_linear_multi_kernel.
// Several weights (q/k/v, gate/up) read the same x; out[s] equals the single op on weight s bit
// for bit (out[s] = sparse_linear_kernel(x, weights[s], k, biases[s]), likewise for ternary).
//
// One activation row (M == 1, decode) with arguments the fast path takes: the top-K (and the int8
// quantization) runs once, then one parallel region runs the single op's M == 1 core over every
// segment (sparse: the kept rows' panels of each column-major weight, tasks over all segments'
// output columns; ternary: the row-split pass, fused_linear.h). A column's float sum runs over the
// same kept rows in the same ascending order as in the single op, whatever the other segments or
// the split, so the outputs are identical. Several rows (prefill, batches) with 0 < k < d: the
// rows' top-K runs once and each segment takes the single op's own path over that selection
// (sparse_linear_rows, ternary_linear_multi_rows), with the single op's checks; so does one
// ternary row on an ISA without the fused row-split pass (scalar). Anything else (a
// row-major weight at M = 1, arguments the single op would reject) calls the single op per
// segment, which also raises its errors.
#include <ATen/Parallel.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "fused_linear.h"
#include "qsk/checks.h"
#include "qsk/cpu_common.h"
#include "qsk/cpu_select.h"
#include "qsk/isa.h"
#include "sparse_gemv.h"

namespace qsk::cpu {
namespace {

const at::Tensor* bias_at(const c10::List<std::optional<at::Tensor>>& biases, size_t s, std::optional<at::Tensor>& hold) {
  hold = biases.get(s);
  return hold.has_value() ? &*hold : nullptr;
}

// ---- sparse_linear ----

at::Tensor sparse_single(const at::Tensor& x, const at::Tensor& w, int64_t k, const std::optional<at::Tensor>& b) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qsparse::sparse_linear_kernel", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t,
                                               const std::optional<at::Tensor>&)>();
  return op.call(x, w, k, b);
}

// Whether segment w (with bias b) takes the fused M == 1 path: what the single op's sparse path
// takes and accepts (column-major, x's dtype, [N, d], a contiguous [N] bias of x's dtype).
bool sparse_fusable(const at::Tensor& x, const at::Tensor& w, const std::optional<at::Tensor>& b) {
  if (w.device().type() != at::kCPU || w.scalar_type() != x.scalar_type() || w.dim() != 2 || w.size(1) != x.size(1))
    return false;
  if (!(w.stride(0) == 1 || w.size(0) == 1) || w.stride(0) < 0 || w.stride(1) < 0) return false;
  if (b.has_value() && (b->device().type() != at::kCPU || b->scalar_type() != x.scalar_type() || b->dim() != 1 ||
                        b->size(0) != w.size(0) || !b->is_contiguous()))
    return false;
  return true;
}

template <typename T>
void sparse_multi_m1(const T* x, int64_t d, int64_t k, const std::vector<at::Tensor>& w,
                     const std::vector<const at::Tensor*>& bias, std::vector<at::Tensor>& y, Isa level) {
  // One selection, exactly as sparse_linear's build_blocks does for a lone row.
  std::vector<int32_t> idx(std::max<int64_t>(k, 1));
  {
    std::vector<uint32_t> scratch(select_scratch_words(d));
    select_topk(x, d, k, idx.data(), scratch.data(), level);
  }
  std::vector<float> vals(k);
  for (int64_t j = 0; j < k; ++j) vals[j] = static_cast<float>(x[idx[j]]);
  const SparseRows rows{idx.data(), vals.data(), k, 1};
  // Tasks: spans of output columns of every segment, sized over all segments together (as the
  // single op's span_cols does for one weight) so that every thread streams the same share.
  const int64_t nseg = static_cast<int64_t>(w.size());
  int64_t total = 0;
  for (const auto& t : w) total += t.size(0);
  const int64_t pc = panel_cols(1);
  const int64_t threads = std::max(1, at::get_num_threads());
  const int64_t rounds = std::max<int64_t>(1, (total + threads * pc - 1) / (threads * pc));
  const int64_t span = std::max<int64_t>(32, ((total + threads * rounds - 1) / (threads * rounds) + 31) / 32 * 32);
  std::vector<std::pair<int64_t, int64_t>> tasks;  // (segment, first column)
  for (int64_t s = 0; s < nseg; ++s)
    for (int64_t j0 = 0; j0 < w[s].size(0); j0 += span) tasks.emplace_back(s, j0);
  const int64_t grain = std::max<int64_t>(1, kMinTaskBytes / std::max<int64_t>(1, k * span * sizeof(T)));
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), grain, [&](int64_t t0, int64_t t1) {
    std::vector<float> acc(kPanelFloats);
    for (int64_t t = t0; t < t1; ++t) {
      const auto [s, first] = tasks[t];
      const int64_t N = w[s].size(0), end = std::min(N, first + span);
      const T* wt = w[s].data_ptr<T>();
      const int64_t ld = w[s].stride(1);
      const T* b = bias[s] ? bias[s]->data_ptr<T>() : nullptr;
      T* ys = y[s].data_ptr<T>();
      for (int64_t j0 = first; j0 < end; j0 += pc) {
        const int64_t nc = std::min(pc, end - j0);
        sparse_gemv_panel(level, wt, ld, rows, j0, nc, acc.data(), pc);
        T* yr = ys + j0;
        const float* ar = acc.data();
        for (int64_t j = 0; j < nc; ++j) yr[j] = static_cast<T>(b ? ar[j] + static_cast<float>(b[j0 + j]) : ar[j]);
      }
    }
  });
}

std::vector<at::Tensor> sparse_linear_multi_cpu(const at::Tensor& x, at::TensorList weights, int64_t k,
                                                const c10::List<std::optional<at::Tensor>>& biases) {
  QSK_CHECK_DEVICE(x, at::kCPU);
  QSK_CHECK_FLOAT(x);
  TORCH_CHECK(biases.size() == weights.size(), "sparse_linear_multi_kernel: got ", weights.size(), " weights but ",
              biases.size(), " biases");
  const at::Tensor xr = as_rows(x, "sparse_linear_multi_kernel");
  const int64_t M = xr.size(0), d = xr.size(1);
  std::vector<at::Tensor> out;
  if (M > 1 && d <= INT32_MAX && 0 < k && k < d) {  // every segment over one selection of the rows
    const std::vector<int32_t> kept = select_rows(xr, k);
    for (size_t s = 0; s < weights.size(); ++s)
      out.push_back(unrows(sparse_linear_rows(xr, weights[s], k, biases.get(s), kept.data()), x));
    return out;
  }
  bool fused = M == 1 && d <= INT32_MAX && 0 <= k && k <= d;
  for (size_t s = 0; fused && s < weights.size(); ++s) fused = sparse_fusable(xr, weights[s], biases.get(s));
  if (!fused) {
    for (size_t s = 0; s < weights.size(); ++s) out.push_back(sparse_single(x, weights[s], k, biases.get(s)));
    return out;
  }
  std::vector<at::Tensor> w(weights.begin(), weights.end());
  std::vector<std::optional<at::Tensor>> hold(w.size());
  std::vector<const at::Tensor*> bias(w.size());
  for (size_t s = 0; s < w.size(); ++s) {
    bias[s] = bias_at(biases, s, hold[s]);
    out.push_back(at::empty({1, w[s].size(0)}, xr.options()));
  }
  const Isa level = isa();
  QSK_DISPATCH_FLOAT(xr.scalar_type(), "sparse_linear_multi_cpu", [&] {
    sparse_multi_m1<scalar_t>(xr.data_ptr<scalar_t>(), d, k, w, bias, out, level);
  });
  for (auto& t : out) t = unrows(t, x);
  return out;
}

// ---- ternary_linear ----

at::Tensor ternary_single(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t out_features,
                          std::optional<int64_t> k, const std::optional<at::Tensor>& b) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qsparse::ternary_linear_kernel", "")
                             .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t,
                                               std::optional<int64_t>, const std::optional<at::Tensor>&)>();
  return op.call(x, packed, scale, out_features, k, b);
}

// Whether segment (packed, scale, out_features, bias) takes the fused path: arguments the single
// op accepts (ternary::weight_problem), already in a layout it reads in place (the single op would
// copy them).
bool ternary_fusable(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t out_features,
                     const std::optional<at::Tensor>& b) {
  return ternary::weight_problem(x, packed, scale, out_features, std::nullopt, b).empty() &&
         ternary::packed_stride(packed) >= 0 && (!b || b->is_contiguous());
}

std::vector<at::Tensor> ternary_linear_multi_cpu(const at::Tensor& x, at::TensorList packed, at::TensorList scales,
                                                 at::IntArrayRef out_features, std::optional<int64_t> k_opt,
                                                 const c10::List<std::optional<at::Tensor>>& biases) {
  QSK_CHECK_DEVICE(x, at::kCPU);
  QSK_CHECK_FLOAT(x);
  const size_t n = packed.size();
  TORCH_CHECK(scales.size() == n && out_features.size() == n && biases.size() == n,
              "ternary_linear_multi_kernel: packed, scales, out_features and biases must have one entry per "
              "segment, got ",
              n, ", ", scales.size(), ", ", out_features.size(), " and ", biases.size());
  const at::Tensor xr = as_rows(x, "ternary_linear_multi_kernel");
  const int64_t d = xr.size(1);
  const bool valid = d <= kMaxTernaryD && (!k_opt || (0 <= *k_opt && *k_opt <= d));
  // Several rows, or one row without a vector row-split pass: one top-K + quantization, then
  // each segment's own pass over it.
  if (valid && (xr.size(0) > 1 || isa() == Isa::Scalar))
    return ternary::ternary_linear_multi_rows(x, packed, scales, out_features, k_opt, biases);
  bool fused = xr.size(0) == 1 && valid;
  for (size_t s = 0; fused && s < n; ++s)
    fused = ternary_fusable(xr, packed[s], scales[s], out_features[s], biases.get(s));
  std::vector<at::Tensor> out;
  if (!fused) {
    for (size_t s = 0; s < n; ++s)
      out.push_back(ternary_single(x, packed[s], scales[s], out_features[s], k_opt, biases.get(s)));
    return out;
  }
  std::vector<at::Tensor> pk(packed.begin(), packed.end());
  std::vector<float> ws(n);
  std::vector<int64_t> outs(out_features.begin(), out_features.end());
  std::vector<std::optional<at::Tensor>> hold(n);
  std::vector<const at::Tensor*> bias(n);
  for (size_t s = 0; s < n; ++s) {
    ws[s] = *scales[s].data_ptr<float>();  // a CPU float32 scalar (checked): the value item() reads
    bias[s] = bias_at(biases, s, hold[s]);
  }
  out = ternary::ternary_linear_multi_m1(xr, pk, ws, outs, k_opt ? *k_opt : -1, bias);
  for (auto& t : out) t = unrows(t, x);
  return out;
}

}  // namespace
}  // namespace qsk::cpu

TORCH_LIBRARY_IMPL(qsparse, CPU, m) {
  m.impl("sparse_linear_multi_kernel", &qsk::cpu::sparse_linear_multi_cpu);
  m.impl("ternary_linear_multi_kernel", &qsk::cpu::ternary_linear_multi_cpu);
}
