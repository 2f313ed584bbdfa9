// The one place where csrc/cuda touches the CUDA runtime and torch's CUDA API: includes, the
// device the ops check for, device guard, stream, SM count, kernel launch and the library the
// ops register in. Built by nvcc it is the real thing. Built by a host compiler with
// QSK_CUDA_EMULATION defined (tests/cuda_emu), the same kernels run on CPU tensors under a SIMT
// emulator and register in `qsparse_cuda_emu` for the CPU key, so their logic is tested against
// the reference on machines without a GPU.
#pragma once

#include <cstdint>
#include <utility>

#ifdef QSK_CUDA_EMULATION
#include <c10/core/DeviceType.h>

#include "simt_emulator.h"  // tests/cuda_emu: dim3, threadIdx, __syncthreads, cub stand-ins, ...
#define QSK_CUDA_LIB qsparse_cuda_emu
#define QSK_CUDA_KEY CPU
#define QSK_DEVICE_GUARD(t) (void)0
#define QSK_LAUNCH_CHECK() (void)0
namespace qsk::cuda {
constexpr auto kDevice = at::kCPU;
using Stream = int;
inline Stream current_stream() { return 0; }
inline uintptr_t stream_id(Stream s) { return static_cast<uintptr_t>(s); }
inline int sm_count() { return simt::sm_count(); }
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, Stream, A&&... args) {
  simt::run_grid(kernel, grid, block, std::forward<A>(args)...);
}
}  // namespace qsk::cuda
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>
#define QSK_CUDA_LIB qsparse
#define QSK_CUDA_KEY CUDA
#define QSK_DEVICE_GUARD(t) const at::cuda::OptionalCUDAGuard qsk_device_guard_((t).device())
#define QSK_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
namespace qsk::cuda {
constexpr auto kDevice = at::kCUDA;
using Stream = cudaStream_t;
inline Stream current_stream() { return at::cuda::getCurrentCUDAStream(); }
inline uintptr_t stream_id(Stream s) { return reinterpret_cast<uintptr_t>(s); }
inline int sm_count() { return at::cuda::getCurrentDeviceProperties()->multiProcessorCount; }
// kernel<<<grid, block, 0, stream>>>(args...), written once so the emulator can take its place.
template <class... P, class... A>
void launch(void (*kernel)(P...), dim3 grid, dim3 block, Stream stream, A&&... args) {
  kernel<<<grid, block, 0, stream>>>(std::forward<A>(args)...);
}
}  // namespace qsk::cuda
#endif
