// Every native kernel op schema, written once: csrc/registration.cpp declares them in the
// `qsparse` library; tests/cuda_emu declares the same ones in `qsparse_cuda_emu`, where the CUDA
// kernels run under the SIMT emulator. Device files register implementations with
// TORCH_LIBRARY_IMPL(<library>, CPU | CUDA, m).
#pragma once

#include <torch/library.h>

namespace qsk {

inline void define_kernel_schemas(torch::Library& m) {
  // x [M, d] contiguous float -> (x_q int8 [M, d], x_scale float32 [M, 1]); SPEC 4.
  m.def("quantize_act_int8_kernel(Tensor x) -> (Tensor, Tensor)");
  // x [M, d] contiguous float, 0 <= k <= d -> [M, d], the k largest |x| kept per row; SPEC 1.
  m.def("topk_sparsify_kernel(Tensor x, int k) -> Tensor");
  // x [M, d] contiguous float, d % m == 0, 0 <= n <= m -> [M, d], N:M top-k per block; SPEC 2.
  m.def("block_topk_sparsify_kernel(Tensor x, int n, int m) -> Tensor");
  // x [M, d] contiguous float (the CPU kernel: [..., d], any strides), weight [out, d] (any strides;
  // fast when weight.stride(0) == 1), bias [out] or None, all one dtype -> [M, out] (CPU: [..., out])
  // = linear(topk_sparsify(x, k), weight, bias); SPEC 3. The cpu backend calls it with the public
  // op's arguments as they are (no Python wrapper); the cuda backend flattens x first.
  m.def("sparse_linear_kernel(Tensor x, Tensor weight, int k, Tensor? bias) -> Tensor");
  // x [M, d] contiguous float (CPU: [..., d], any strides), packed uint8 [d, ceil(out_features / 4)]
  // contiguous (SPEC 6; CPU: any strides), scale float32 scalar, 0 <= k <= d or None (dense), bias
  // [out_features] of x's dtype or None -> [M, out_features] (CPU: [..., out_features])
  // = ternary_linear(x, packed, scale, out_features, k, bias); SPEC 7. Called like sparse_linear_kernel.
  m.def("ternary_linear_kernel(Tensor x, Tensor packed, Tensor scale, int out_features, int? k, Tensor? bias) -> Tensor");
  // Sibling projections (csrc/cpu/fused_linear.cpp): one x, several weights; out[s] equals the
  // single op on segment s bit for bit (one top-K / quantization for all of them when M == 1).
  m.def("sparse_linear_multi_kernel(Tensor x, Tensor[] weights, int k, Tensor?[] biases) -> Tensor[]");
  m.def(
      "ternary_linear_multi_kernel(Tensor x, Tensor[] packed, Tensor[] scales, int[] out_features, int? k, "
      "Tensor?[] biases) -> Tensor[]");
  // x [..., d] float (any strides), weight [d] of x's dtype, eps >= 0 -> [..., d] contiguous: Hugging
  // Face Llama's RMSNorm (csrc/cpu/rms_norm.cpp; qsparse_kernels/nn/rms_norm.py). CPU only.
  m.def("rms_norm_kernel(Tensor x, Tensor weight, float eps) -> Tensor");
  // q [B, H, T, E], k [B, Hkv, L, E], v [B, Hkv, L, Ev] (H % Hkv == 0; one float dtype; any strides),
  // mask None or broadcastable to [B, H, T, L] (bool: true attends; or additive, float32 or q's
  // dtype), is_causal (no mask; query t attends keys l <= t, as torch's SDPA) -> [B, H, T, Ev]:
  // attention in float32 (csrc/cpu/attention.cpp; qsparse_kernels/attention.py). CPU only.
  m.def("attention_kernel(Tensor q, Tensor k, Tensor v, Tensor? mask, float scale, bool is_causal) -> Tensor");
}

}  // namespace qsk
