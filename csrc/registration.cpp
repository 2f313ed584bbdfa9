// The `qsparse` library's native kernel schemas (qsk/schemas.h) and the `_C` module. The public
// ops (qsparse::topk_sparsify, ...) are declared in Python (qsparse_kernels/_ops.py) and call these kernels through the backends.
#include <torch/extension.h>
#include <torch/library.h>

#include "qsk/cache_flush.h"
#include "qsk/isa.h"
#include "qsk/schemas.h"

#include "cpu/dense_gemv.h"
#include "cpu/fused_linear.h"

namespace qsk::cpu {
int64_t sparse_kernel_max_rows(at::ScalarType dtype);  // csrc/cpu/sparse_linear.cpp
int64_t sparse_max_rows(at::ScalarType dtype);         // csrc/cpu/sparse_linear.cpp
bool row_gemm_wins(at::ScalarType dtype, int64_t M, int64_t d, int64_t k);  // csrc/cpu/sparse_linear.cpp
}

namespace qsk {
void define_kernel_calls(pybind11::module_& m);  // csrc/kernel_calls.cpp
}

namespace {
// A float dtype from its torch name without the "torch." prefix.
at::ScalarType float_dtype(const std::string& name) {
  if (name == "float32") return at::kFloat;
  if (name == "float16") return at::kHalf;
  TORCH_CHECK(name == "bfloat16", "expected 'float32', 'bfloat16' or 'float16', got '", name, "'");
  return at::kBFloat16;
}
}  // namespace

TORCH_LIBRARY_FRAGMENT(qsparse, m) { qsk::define_kernel_schemas(m); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  qsk::define_kernel_calls(m);
  m.doc() = "qsparse_kernels native kernels (ops are registered in torch.ops.qsparse)";
  m.def("cpu_isa", [] { return std::string(qsk::cpu::isa_name(qsk::cpu::isa())); },
        "The CPU ISA level the kernels use: scalar, avx2 or avx512");
  m.def("cpu_isa_env_error", [] { return qsk::cpu::isa_env_error(); },
        "Why QSPARSE_CPU_ISA was ignored ('' when it was unset or valid)");
  m.def("cpu_has_avx512_vnni", &qsk::cpu::has_avx512_vnni);
  m.def("cpu_bf16_gemm", [] { return std::string(qsk::cpu::bf16_gemm_name()); },
        "The bf16 batch kernel sparse_linear uses: amx (AMX tiles), avx512bf16 (vdpbf16ps GEMV panels) or none (under the ISA cap)");
  m.def("cpu_has_amx_int8", &qsk::cpu::has_amx_int8);
  m.def("cpu_sparse_kernel_max_rows",
        [](const std::string& dt) { return qsk::cpu::sparse_kernel_max_rows(float_dtype(dt)); },
        "The largest batch for which CPU sparse_linear on a column-major weight runs the library's kernels "
        "('float32', 'bfloat16' or 'float16'; above it torch's GEMM on the masked activations)");
  m.def("cpu_sparse_max_rows",
        [](const std::string& dt) { return qsk::cpu::sparse_max_rows(float_dtype(dt)); },
        "The largest batch for which CPU sparse_linear on a column-major weight streams the kept rows "
        "(blocks of up to 8 rows sharing their union); bf16 above it takes the batched kernel up to "
        "cpu_sparse_kernel_max_rows");
  m.def("cpu_sparse_row_gemm",
        [](const std::string& dt, int64_t M, int64_t d, int64_t k) {
          return qsk::cpu::row_gemm_wins(float_dtype(dt), M, d, k);
        },
        "Whether CPU sparse_linear on a column-major weight runs the row-sparse GEMM for a batch of M rows "
        "keeping k of d features (under the ISA cap), rather than the GEMV blocks or torch's GEMM");
  m.def("cpu_row_gemv_max_rows",
        [](const std::string& dt) { return qsk::cpu::row_gemv_max_rows(float_dtype(dt)); },
        "The largest batch for which CPU sparse_linear at k = d on a row-major weight runs the library's "
        "dense GEMV ('float32', 'bfloat16' or 'float16'; above it torch's GEMM)");
  m.def("cpu_ternary_merge_max_bytes", &qsk::cpu::ternary::merge_max_bytes,
        "The widest packed row (bytes) of ternary siblings stored side by side that the CPU M = 1 pass reads "
        "as one weight (wider groups are not stored side by side)");
  m.def("set_cpu_isa_cap", &qsk::cpu::set_isa_cap,
        "Caps the CPU ISA ('scalar', 'avx2', 'avx512', 'avx512bf16', 'amx'; '' restores the detected one). "
        "For tests.");
  m.def("flush_cache", &qsk::cpu::flush_cache,
        "Flushes a CPU tensor's storage from every cache level (benchmarks: DRAM-resident weights)");
  m.def("built_with_cuda", [] {
#ifdef QSK_WITH_CUDA
    return true;
#else
    return false;
#endif
  });
  m.def("cuda_archs", [] {
#ifdef QSK_CUDA_ARCHS
    return std::string(QSK_CUDA_ARCHS);
#else
    return std::string();
#endif
  });
}
