"""The ``cuda`` backend: C++/CUDA kernels in ``csrc/cuda``, registered for the CUDA dispatch key.

The native ops dispatch by device, so this backend shares the ``cpu`` backend's wrappers
(:mod:`._native_ops`) and adds the GPU's dense crossover and launch-size limits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import _native
from . import _native_ops as native

# Above this many rows the sparse GEMV stops paying against cuBLAS on the masked activations;
# up to it every call is one launch (the kernel selects in its prologue). Measured on the
# H200, 4096 -> 14336 bf16, s = 0.5 (benchmarks/README.md, 'GPU: the first H200 run'): at M = 16 the fused
# GEMV took 213 us (cuda) / 346 us (triton) against 14 us of selection + 32 us of cuBLAS measured in the same
# run; at M = 1 the two are about even (67 vs 46 us in a CUDA graph, 56 vs 66 us eager) and the fused
# kernel reads less the sparser x is (s = 0.9: 23 us). M = 2..15 was not measured: one row is the
# safe side until a GPU session sweeps it (benchmarks/gpu_check.sh).
DENSE_CROSSOVER_M = 1
MAX_ROWS_PER_LAUNCH = 65535  # grid.z of the GEMV kernels


def devices() -> tuple[str, ...]:
    return ("cuda",)


def status() -> tuple[bool, bool, str]:
    if not _native.loaded():
        return False, False, _native.LOAD_ERROR or "not built"
    if not _native.built_with_cuda():
        return False, False, (
            "qsparse_kernels._C was built without CUDA kernels (no CUDA device visible at build time, or no nvcc "
            "or a CPU build of torch; QSPARSE_BUILD_CUDA=1 forces them)"
        )
    archs = _native._C.cuda_archs()
    if not torch.cuda.is_available():
        return True, False, f"built for {archs}, but no CUDA device is visible (torch.cuda.is_available() is False)"
    return True, True, f"built for {archs}; device {torch.cuda.get_device_name()}"


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    rows = native.rows(x)
    if rows.shape[0] > DENSE_CROSSOVER_M:
        return F.linear(native.topk_sparsify(x, k), weight, bias)
    return native.unrows(torch.ops.qsparse.sparse_linear_kernel(rows, weight, k, bias), x)


def ternary_linear(x, packed, scale, out_features, k=None, bias=None) -> torch.Tensor:
    rows = native.rows(x)
    b = None if bias is None else bias.contiguous()
    chunks = [
        torch.ops.qsparse.ternary_linear_kernel(rows[i : i + MAX_ROWS_PER_LAUNCH], packed.contiguous(), scale,
                                                out_features, k, b)
        for i in range(0, max(1, rows.shape[0]), MAX_ROWS_PER_LAUNCH)
    ]
    return native.unrows(chunks[0] if len(chunks) == 1 else torch.cat(chunks), x)


OPS = {
    "quantize_act_int8": native.quantize_act_int8,
    "topk_sparsify": native.topk_sparsify,
    "block_topk_sparsify": native.block_topk_sparsify,
    "sparse_linear": sparse_linear,
    "ternary_linear": ternary_linear,
}
