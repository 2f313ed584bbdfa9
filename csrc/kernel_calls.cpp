// The linear kernel ops called from Python through the dispatcher without torch.ops' argument
// parsing. `torch.ops.qsparse.ternary_linear_kernel.default(...)` converts each argument by walking
// the schema (~3 us a call, a decode step's kernel at a tiny shape takes ~1 us); these bindings take
// typed arguments (pybind11, ~0.5 us) and call the same operator handle, so the dispatch is the
// same: device kernels, autograd and Python modes, the profiler's record. qsparse_kernels'
// cpu backend uses them for its eager calls (qsparse_kernels/backends/cpu.py).
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/extension.h>

#include <optional>
#include <vector>

namespace qsk {
namespace {

template <typename Sig>
c10::TypedOperatorHandle<Sig> kernel_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

using OptTensor = std::optional<at::Tensor>;

at::Tensor sparse_linear(const at::Tensor& x, const at::Tensor& weight, int64_t k, const OptTensor& bias) {
  static const auto op = kernel_op<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const OptTensor&)>(
      "qsparse::sparse_linear_kernel");
  return op.call(x, weight, k, bias);
}

at::Tensor ternary_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scale, int64_t out_features,
                          std::optional<int64_t> k, const OptTensor& bias) {
  static const auto op =
      kernel_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, int64_t, std::optional<int64_t>,
                           const OptTensor&)>("qsparse::ternary_linear_kernel");
  return op.call(x, packed, scale, out_features, k, bias);
}

c10::List<OptTensor> as_list(const std::vector<OptTensor>& v) {
  c10::List<OptTensor> out;
  out.reserve(v.size());
  for (const auto& t : v) out.push_back(t);
  return out;
}

std::vector<at::Tensor> sparse_linear_multi(const at::Tensor& x, const std::vector<at::Tensor>& weights, int64_t k,
                                            const std::vector<OptTensor>& biases) {
  static const auto op =
      kernel_op<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, int64_t, const c10::List<OptTensor>&)>(
          "qsparse::sparse_linear_multi_kernel");
  return op.call(x, weights, k, as_list(biases));
}

std::vector<at::Tensor> ternary_linear_multi(const at::Tensor& x, const std::vector<at::Tensor>& packed,
                                             const std::vector<at::Tensor>& scales,
                                             const std::vector<int64_t>& out_features, std::optional<int64_t> k,
                                             const std::vector<OptTensor>& biases) {
  static const auto op =
      kernel_op<std::vector<at::Tensor>(const at::Tensor&, at::TensorList, at::TensorList, at::IntArrayRef,
                                        std::optional<int64_t>, const c10::List<OptTensor>&)>(
          "qsparse::ternary_linear_multi_kernel");
  return op.call(x, packed, scales, out_features, k, as_list(biases));
}

at::Tensor rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps) {
  static const auto op =
      kernel_op<at::Tensor(const at::Tensor&, const at::Tensor&, double)>("qsparse::rms_norm_kernel");
  return op.call(x, weight, eps);
}

at::Tensor attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const OptTensor& mask,
                     double scale, bool is_causal) {
  static const auto op =
      kernel_op<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const OptTensor&, double, bool)>(
          "qsparse::attention_kernel");
  return op.call(q, k, v, mask, scale, is_causal);
}

}  // namespace

void define_kernel_calls(pybind11::module_& m) {
  using release = pybind11::call_guard<pybind11::gil_scoped_release>;
  m.def("call_sparse_linear", &sparse_linear, release(), "qsparse::sparse_linear_kernel(x, weight, k, bias)");
  m.def("call_ternary_linear", &ternary_linear, release(),
        "qsparse::ternary_linear_kernel(x, packed, scale, out_features, k, bias)");
  m.def("call_sparse_linear_multi", &sparse_linear_multi, release(),
        "qsparse::sparse_linear_multi_kernel(x, weights, k, biases)");
  m.def("call_ternary_linear_multi", &ternary_linear_multi, release(),
        "qsparse::ternary_linear_multi_kernel(x, packed, scales, out_features, k, biases)");
  m.def("call_rms_norm", &rms_norm, release(), "qsparse::rms_norm_kernel(x, weight, eps)");
  m.def("call_attention", &attention, release(), "qsparse::attention_kernel(q, k, v, mask, scale, is_causal)");
}

}  // namespace qsk
