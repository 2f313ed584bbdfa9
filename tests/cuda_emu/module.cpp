// The emulated CUDA kernels' library: the same schemas as `qsparse`, in `qsparse_cuda_emu`, with the
// csrc/cuda implementations registered for CPU tensors (see csrc/cuda/runtime.cuh).
#include <torch/extension.h>

#include "qsk/schemas.h"
#include "simt_emulator.h"

TORCH_LIBRARY(qsparse_cuda_emu, m) { qsk::define_kernel_schemas(m); }

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "csrc/cuda kernels under a SIMT emulator (torch.ops.qsparse_cuda_emu), for tests";
  m.def("set_sm_count", [](int n) {
    TORCH_CHECK(n >= 1, "sm count must be >= 1");
    simt::sm_count_setting() = n;
  }, "The SM count the launch planner sees (132 by default, an H100/H200).");
  m.def("launch_count", [] { return simt::launch_count(); }, "Kernel launches so far (every grid run counts one).");
}
