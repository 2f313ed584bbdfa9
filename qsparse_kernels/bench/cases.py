"""What the bench measures: SPEC headline shapes and one builder per kernel.

A builder returns a :class:`Case`: ``call(i)`` runs the kernel on weight copy ``i % n`` with
activation ``(i // n) % len(acts)`` (both rotate), ``read`` is the weight bytes one call must read
(the kept rows; for a batch, the union of its rows' kept sets), and ``evict`` says whether the
rotation is too short to leave the last-level cache (the harness then flushes the next call's
weights from the caches before it; it never happens at the default plan's points).

DRAM, not cache (SPEC "How speed is measured"): a weight row read by one call is read again only
after :func:`.harness.dram_bytes` of other weight bytes. At batch 1 with ``0 < k < d`` the
activations make that cheap: the features are shuffled and cut into ``P = d // k`` parts of ``k``
and activation ``j`` keeps exactly part ``j``, so on one copy consecutive activations read
disjoint rows (each a random scatter of ``k`` rows, as a real kept set is) and a row comes back
only after all ``n`` copies have each been read ``P`` times: the rotation reads ``n * P * read``,
about ``n`` whole copies, and needs no more memory than the dense baseline's rotation.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import ops
from ..layout import packed_cols
from .harness import dram_bytes, flush

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

# Weight memory one case may hold for its rotation (above it: flushes, Case.evict).
MAX_ROTATION_BYTES = 3 << 30
N_ACTIVATIONS = 16  # random activations of a batch (or dense) point; a batch-1 sparse point uses P parts


@dataclass
class Case:
    """One benchmark point (see the module docstring)."""

    call: Callable[[int], object]
    n: int  # weight copies
    read: int  # weight bytes one call reads
    evict: bool  # the rotation reads fewer than harness.dram_bytes(): flush the weights before each call
    weights: list  # the rotated weight copies; call(i) reads weights[i % n]

    def flush(self, i: int) -> None:
        """Evicts the weights that ``call(i)`` reads from the caches (harness.flush)."""
        flush([self.weights[i % self.n]])

    def __iter__(self):  # (call, n, read), as the older tuple form
        return iter((self.call, self.n, self.read))


_pool: dict[tuple, list[torch.Tensor]] = {}


def _copies(key: tuple, make: Callable[[], torch.Tensor], n: int, bytes_each: int) -> list:
    """``n`` copies (at least 2, within :data:`MAX_ROTATION_BYTES`), kept per shape: one weight made by
    ``make``, then clones of it, each its own storage (harness.flush evicts a whole storage). The
    kernels' speed does not depend on the values, and cloning is a memcpy where drawing fresh
    random values for the 1 GiB rotation of a tiny shape took ~40 s."""
    n = max(2, min(n, MAX_ROTATION_BYTES // max(1, bytes_each)))
    if _pool and key not in _pool and next(iter(_pool))[:3] != key[:3]:
        _pool.clear()  # a new shape: free the previous one's copies
    pool = _pool.setdefault(key, [])
    if not pool:
        pool.append(make())
    while len(pool) < n:
        pool.append(pool[0].clone())  # keeps the layout (strides) of the weight
    return pool[:n]


def activations(x: torch.Tensor, k: int | None) -> tuple[list[torch.Tensor], bool]:
    """The rotated activations of a point, shaped like ``x [M, d]``, and whether they are the
    disjoint parts of the module docstring (batch 1, ``0 < k < d``); else :data:`N_ACTIVATIONS`
    random ones (the first is ``x``)."""
    M, d = x.shape
    if M != 1 or k is None or not 0 < k < d:
        return [x] + [torch.randn_like(x) for _ in range(N_ACTIVATIONS - 1)], False
    perm = torch.randperm(d, device=x.device)
    out = []
    for j in range(d // k):
        a = torch.randn_like(x) * 0.5
        part = perm[j * k : (j + 1) * k]
        # strictly larger magnitudes on the part: |.| in [1, 2) there, < 1 elsewhere
        a.clamp_(-0.99, 0.99)
        mag = 1 + torch.rand(k, device=x.device)
        a[0, part] = (torch.sign(torch.randn(k, device=x.device)) * mag).to(x.dtype)
        out.append(a)
    return out, True


def _union_rows(xs: list[torch.Tensor], k: int | None) -> float:
    """Mean number of weight rows a call reads: the union of its batch rows' kept sets."""
    d = xs[0].shape[-1]
    if k is None or k >= d:
        return float(d)
    if k == 0:
        return 0.0
    total = 0
    for x in xs:
        idx = x.float().abs().topk(k, dim=-1).indices
        mask = torch.zeros(d, dtype=torch.bool, device=x.device)
        mask[idx.flatten()] = True
        total += int(mask.sum())
    return total / len(xs)


def _point(x: torch.Tensor, k: int | None, row_bytes: int, full_bytes: int, key: tuple,
           make: Callable[[], torch.Tensor], kernel: Callable) -> Case:
    """A rotated point: activations, enough weight copies, the call."""
    xs, parts = activations(x, k)
    read = round(_union_rows(xs, k) * row_bytes)
    per_copy = read * len(xs) if parts else read  # bytes read from one copy before a row repeats
    need = -(-dram_bytes(x.device) // per_copy) if per_copy else 2  # k = 0 reads no weight
    ws = _copies(key, make, need, full_bytes)
    n, nx = len(ws), len(xs)
    evict = read > 0 and n * per_copy < dram_bytes(x.device)
    return Case(lambda i: kernel(xs[(i // n) % nx], ws[i % n]), n, read, evict, ws)


def _float_weight(out_f, in_f, dtype, device, layout) -> Callable[[], torch.Tensor]:
    def make():
        w = torch.randn(out_f, in_f, device=device, dtype=dtype) * in_f**-0.5
        return ops.to_fast_layout(w) if layout == "colmajor" else w

    return make


def dense(x: torch.Tensor, out_f: int) -> Case:
    """The baseline: ``F.linear`` with the standard row-major ``nn.Linear`` weight."""
    in_f, es = x.shape[-1], x.element_size()
    key = (out_f, in_f, str(x.device), x.dtype, "rowmajor")
    make = _float_weight(out_f, in_f, x.dtype, x.device, "rowmajor")
    return _point(x, None, out_f * es, out_f * in_f * es, key, make, F.linear)


def sparse_linear(x: torch.Tensor, out_f: int, k: int, backend: str) -> Case:
    """``sparse_linear`` (top-K included) over the column-major weight."""
    in_f, es = x.shape[-1], x.element_size()
    key = (out_f, in_f, str(x.device), x.dtype, "colmajor")
    make = _float_weight(out_f, in_f, x.dtype, x.device, "colmajor")
    return _point(x, k, out_f * es, out_f * in_f * es, key, make,
                  lambda a, w: ops.sparse_linear(a, w, k, backend=backend))


def random_packed(in_f: int, out_f: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random canonical packed ternary weight, uint8 ``[in_f, ceil(out_f / 4)]`` (SPEC 6): codes
    uniform in 0..2, padding codes past ``out_f`` 1 (zero), as a module's checkpoint loader accepts."""
    cols = packed_cols(out_f)
    codes = torch.randint(0, 3, (in_f, 4 * cols), dtype=torch.uint8, device=device, generator=generator)
    codes[:, out_f:] = 1
    return codes[:, 0::4] | (codes[:, 1::4] << 2) | (codes[:, 2::4] << 4) | (codes[:, 3::4] << 6)


def ternary_linear(x: torch.Tensor, out_f: int, k: int | None, backend: str) -> Case:
    """``ternary_linear`` over packed 2-bit weights; ``k=None`` is dense activations."""
    in_f, cols = x.shape[-1], packed_cols(out_f)
    scale = torch.tensor(0.02, device=x.device)
    return _point(x, k, cols, in_f * cols, (out_f, in_f, str(x.device), "packed"),
                  lambda: random_packed(in_f, out_f, x.device),
                  lambda a, p: ops.ternary_linear(a, p, scale, out_f, k, backend=backend))
