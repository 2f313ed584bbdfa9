"""The ``reference`` backend: :mod:`qsparse_kernels.reference` on every device."""

from __future__ import annotations

from .. import reference

OPS = {
    name: getattr(reference, name)
    for name in (
        "topk_sparsify",
        "block_topk_sparsify",
        "sparse_linear",
        "quantize_act_int8",
        "quantize_weight_ternary",
        "pack_ternary",
        "unpack_ternary",
        "ternary_linear",
    )
}


def devices() -> tuple[str, ...]:
    return ("cpu", "cuda", "meta", "xpu", "mps")


def status() -> tuple[bool, bool, str]:
    return True, True, "pure PyTorch, always available"
