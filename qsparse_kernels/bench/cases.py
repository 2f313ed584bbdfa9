"""What the bench measures: SPEC headline shapes and one builder per kernel.

A builder returns a :class:`Case`: ``call(i)`` runs the kernel on the ``i``-th weight copy and
activation (both rotate, see :mod:`.harness`), ``read`` is the weight bytes one call must read,
and ``evict`` says whether the rotation alone is too short to leave the last-level cache (then the
harness flushes the next call's weights from the caches before every timed call).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..layout import packed_cols
from .harness import copies_needed, dram_bytes, flush

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



@dataclass
class Case:
    """One benchmark point: ``call(i)`` rotates over ``n`` weight copies (and the activations)."""

    call: Callable[[int], object]
    n: int
    read: int  # weight bytes one call reads
    evict: bool  # the rotation reads fewer than harness.dram_bytes(): flush the weights before each call
    weights: list  # the rotated weight copies; call(i) reads weights[i % len(weights)]

    def flush(self, i: int) -> None:
        """Evicts the weights that ``call(i)`` reads from the caches (harness.flush)."""
        flush([self.weights[i % len(self.weights)]])

    def __iter__(self):  # (call, n, read), as the older tuple form
        return iter((self.call, self.n, self.read))


# Weight memory one case may hold for its rotation. A sparse case whose kept rows are small would
# need more copies than that: it rotates what fits, and the harness flushes its weights from the caches before each
# call instead (Case.evict).
MAX_ROTATION_BYTES = 3 << 30
N_ACTIVATIONS = 16  # activations rotate too, so every call keeps a different set of features

_pool: dict[tuple, list[torch.Tensor]] = {}


def _copies(key: tuple, make: Callable[[], torch.Tensor], bytes_read: int, bytes_each: int, device) -> list:
    """``n`` copies made by ``make``: enough that the bytes read over a rotation reach
    :func:`.harness.dram_bytes` (SPEC: >= 4x the last-level cache), within
    :data:`MAX_ROTATION_BYTES`. Kept per shape."""
    n = max(2, min(copies_needed(bytes_read, device), MAX_ROTATION_BYTES // max(1, bytes_each)))
    if _pool and key not in _pool and next(iter(_pool))[:3] != key[:3]:
        _pool.clear()  # a new shape: free the previous one's copies
    pool = _pool.setdefault(key, [])
    while len(pool) < n:
        pool.append(make())
    return pool[:n]


def _activations(x: torch.Tensor) -> list[torch.Tensor]:
    return [x] + [torch.randn_like(x) for _ in range(N_ACTIVATIONS - 1)]


def _float_weights(out_f, in_f, dtype, device, layout, bytes_read) -> list[torch.Tensor]:
    def make():
        w = torch.randn(out_f, in_f, device=device, dtype=dtype) * in_f**-0.5
        return ops.to_fast_layout(w) if layout == "colmajor" else w

    each = out_f * in_f * torch.finfo(dtype).bits // 8
    return _copies((out_f, in_f, str(device), dtype, layout), make, bytes_read, each, device)


def dense(x: torch.Tensor, out_f: int) -> Case:
    """The baseline: ``F.linear`` with the standard row-major ``nn.Linear`` weight."""
    read = out_f * x.shape[-1] * x.element_size()
    ws, xs = _float_weights(out_f, x.shape[-1], x.dtype, x.device, "rowmajor", read), _activations(x)
    return _case(lambda i: F.linear(xs[i % len(xs)], ws[i % len(ws)]), ws, read)


def _case(call, weights: list, read: int) -> Case:
    n = len(weights)
    return Case(call, n, read, n * read < dram_bytes(weights[0].device), weights)


def sparse_linear(x: torch.Tensor, out_f: int, k: int, backend: str) -> Case:
    """``sparse_linear`` (top-K included) over the column-major weight."""
    read = k * out_f * x.element_size()
    ws, xs = _float_weights(out_f, x.shape[-1], x.dtype, x.device, "colmajor", read), _activations(x)
    return _case(lambda i: ops.sparse_linear(xs[i % len(xs)], ws[i % len(ws)], k, backend=backend), ws, read)


def random_packed(in_f: int, out_f: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random canonical packed ternary weight, uint8 ``[in_f, ceil(out_f / 4)]`` (SPEC 6): codes
    0..2, padding codes past ``out_f`` 1 (zero), as a module's checkpoint loader accepts."""
    codes = torch.randint(0, 256, (in_f, packed_cols(out_f)), dtype=torch.uint8, device=device, generator=generator)
    for shift in (0, 2, 4, 6):
        bad = ((codes >> shift) & 3) == 3
        codes = torch.where(bad, codes ^ (1 << shift), codes)  # the invalid code 3 -> 2
        if out_f % 4 and shift // 2 >= out_f % 4:  # padding slot s of the last byte: code 1
            last = codes[:, -1]
            codes[:, -1] = (last & (0xFF ^ (3 << shift))) | (1 << shift)
    return codes


def ternary_linear(x: torch.Tensor, out_f: int, k: int | None, backend: str) -> Case:
    """``ternary_linear`` over packed 2-bit weights; ``k=None`` is dense activations."""
    in_f = x.shape[-1]
    read = (in_f if k is None else k) * packed_cols(out_f)
    packs = _copies((out_f, in_f, str(x.device), "packed"), lambda: random_packed(in_f, out_f, x.device), read,
                    in_f * packed_cols(out_f), x.device)
    xs, scale = _activations(x), torch.tensor(0.02, device=x.device)
    return _case(lambda i: ops.ternary_linear(xs[i % len(xs)], packs[i % len(packs)], scale, out_f, k, backend=backend),
                 packs, read)
