"""The ``cpu`` backend: C++ kernels in ``csrc/cpu`` (OpenMP, ISA picked at run time)."""

from __future__ import annotations

import torch

from .. import _native
from . import _native_ops


def devices() -> tuple[str, ...]:
    return ("cpu",)


def status() -> tuple[bool, bool, str]:
    if not _native.loaded():
        return False, False, _native.LOAD_ERROR or "not built"
    return True, True, f"C++ CPU kernels, ISA {_native._C.cpu_isa()}, {torch.get_num_threads()} threads"


def topk_sparsify(x: torch.Tensor, k: int) -> torch.Tensor:
    return torch.ops.qsparse.topk_sparsify_kernel(_native_ops.rows(x), k).reshape(x.shape)


def block_topk_sparsify(x: torch.Tensor, n: int, m: int) -> torch.Tensor:
    return torch.ops.qsparse.block_topk_sparsify_kernel(_native_ops.rows(x), n, m).reshape(x.shape)


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Fast for a column-major ``weight`` (``weight.stride(0) == 1``) at small batch; any strides work."""
    y = torch.ops.qsparse.sparse_linear_kernel(_native_ops.rows(x), weight, k, bias)
    return y.reshape(*x.shape[:-1], weight.shape[0])


def ternary_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    out_features: int,
    k: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Fused top-K + int8 quantization + sparse ternary GEMV over the canonical packed layout."""
    flat = x.dim() == 2 and x.is_contiguous()  # the decode case: skip the reshapes (~2 us per call)
    y = torch.ops.qsparse.ternary_linear_kernel(
        x if flat else _native_ops.rows(x),
        packed if packed.is_contiguous() else packed.contiguous(),
        scale,
        out_features,
        k,
        bias if bias is None or bias.is_contiguous() else bias.contiguous(),
    )
    return y if flat else y.reshape(*x.shape[:-1], out_features)


OPS = {
    "quantize_act_int8": _native_ops.quantize_act_int8,
    "topk_sparsify": topk_sparsify,
    "block_topk_sparsify": block_topk_sparsify,
    "sparse_linear": sparse_linear,
    "ternary_linear": ternary_linear,
}
