"""What the bench measures: SPEC headline shapes and one builder per kernel.

A builder returns ``(call, n_variants, weight_bytes_read)``: ``call(i)`` runs the kernel on the
``i``-th weight copy (copies rotate, see :mod:`.harness`).
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import ops
from ..layout import packed_cols
from .harness import copies_needed

# (name, in_features, out_features): SPEC "How speed is measured".
HEADLINE_SHAPES = [
    ("llama2-7b.qkvo", 4096, 4096),
    ("llama2-7b.up", 4096, 11008),
    ("llama2-7b.down", 11008, 4096),
    ("llama3-8b.up", 4096, 14336),
    ("llama3-8b.down", 14336, 4096),
    ("bitnet-2b.up", 2560, 6912),
    ("bitnet-2b.down", 6912, 2560),
]
BATCHES = [1, 2, 4, 8, 16, 64]
SPARSITIES = [0.0, 0.25, 0.5, 0.6125, 0.75, 0.9]
DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}

Case = tuple[Callable[[int], object], int, int]


@functools.lru_cache(maxsize=2)
def _weights(out_f: int, in_f: int, dtype: torch.dtype, device: torch.device, layout: str) -> list[torch.Tensor]:
    """Rotating weight copies, cached for the points of one shape (they are not modified)."""
    n = copies_needed(out_f * in_f * torch.finfo(dtype).bits // 8, device)
    ws = []
    for _ in range(n):
        w = torch.randn(out_f, in_f, device=device, dtype=dtype) * in_f**-0.5
        ws.append(ops.to_fast_layout(w) if layout == "colmajor" else w)
    return ws


def dense(x: torch.Tensor, out_f: int) -> Case:
    """The baseline: ``F.linear`` with the standard row-major ``nn.Linear`` weight."""
    ws = _weights(out_f, x.shape[-1], x.dtype, x.device, "rowmajor")
    return (lambda i: F.linear(x, ws[i])), len(ws), ws[0].numel() * ws[0].element_size()


def sparse_linear(x: torch.Tensor, out_f: int, k: int, backend: str) -> Case:
    """``sparse_linear`` (top-K included) over the column-major weight."""
    ws = _weights(out_f, x.shape[-1], x.dtype, x.device, "colmajor")
    read = k * out_f * ws[0].element_size()
    return (lambda i: ops.sparse_linear(x, ws[i], k, backend=backend)), len(ws), read


@functools.lru_cache(maxsize=1)
def _packed(out_f: int, in_f: int, device: torch.device) -> list[torch.Tensor]:
    """Rotating random packed ternary weights (codes 0..2 only), cached per shape."""
    n = copies_needed(in_f * packed_cols(out_f), device)
    packs = []
    for _ in range(n):
        codes = torch.randint(0, 256, (in_f, packed_cols(out_f)), dtype=torch.uint8, device=device)
        codes = torch.where((codes & 3) == 3, codes ^ 1, codes)  # no invalid code 3 in any slot ...
        for shift in (2, 4, 6):
            bad = ((codes >> shift) & 3) == 3
            codes = torch.where(bad, codes ^ (1 << shift), codes)  # ... (3 -> 2)
        packs.append(codes)
    return packs


def ternary_linear(x: torch.Tensor, out_f: int, k: int | None, backend: str) -> Case:
    """``ternary_linear`` over packed 2-bit weights; ``k=None`` is dense activations."""
    in_f = x.shape[-1]
    packs = _packed(out_f, in_f, x.device)
    n = len(packs)
    scale = torch.tensor(0.02, device=x.device)
    read = (in_f if k is None else k) * packed_cols(out_f)
    return (lambda i: ops.ternary_linear(x, packs[i], scale, out_f, k, backend=backend)), n, read
