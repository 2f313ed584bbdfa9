"""``sparse_linear`` (SPEC op 3): top-k selection and a split-K sparse GEMV in one launch.

``y[m, :] = sum over kept features i of x[m, i] * W[:, i]  (+ bias)``, float32 accumulation.

A program owns ``BLOCK_N`` outputs of one row and a contiguous slice ``[lo, hi)`` of the input
features. Its prologue re-derives the row's selection from ``x`` (:func:`.select.row_threshold`:
the k-th largest magnitude key and how many ties at it are kept; re-reading one activation row is
cheap next to the weights). The loop then walks its features ``BLOCK_K`` at a time, decides
``kept`` exactly as ``topk_sparsify`` does (ties by lowest index) and loads the
``BLOCK_K x BLOCK_N`` weights ``W[n, i]`` masked by ``kept``, so the weights of dropped features
are never read (the predicated-off loads issue but move no bytes). With the fast layout
(column-major, ``weight.stride(0) == 1``) each kept feature is one contiguous run of ``BLOCK_N``
values: 16-byte loads. Any other strides are correct too (launch arguments), just slower.

Split-K in the same launch, deterministic: each of a tile's ``split_k`` programs stores float32
partial sums, then bumps the tile's arrival counter (acquire-release); the last to arrive adds the
partials in the fixed order ``s = 0, 1, ...``, adds the bias, casts, and re-arms the counter
(the counters live in a zeroed buffer that every call leaves zeroed: :func:`._compat.zeroed`).
No float atomics, so results are bit-identical run to run. ``split_k == 1``: no partials at all.

Batches: every row has its own kept set; see :func:`use_sparse` for the crossover to cuBLAS.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _compat, select
from ._compat import is_tracing, wrap
from .autotune import GemvConfig, gemv_config, nnz_bucket
from .cast import store_rn
from .quantize import to_f32
from .select import kept_step, key_bits, prologue_block, row_threshold, topk_rows

# The fused sparse GEMV (one launch) for every M <= SPARSE_MAX_BATCH and 0 <= k < d; above that batch,
# masked activations through F.linear (cuBLAS). Rows are on grid axis 0, so the programs of the M
# rows that read one weight tile run side by side and were meant to share it through L2; measured
# on the H200, 4096 -> 14336 bf16, s = 0.5 (benchmarks/README.md, 'GPU: the first H200 run'): at M = 16 the fused
# GEMV took 213 us (cuda) / 346 us (triton) against 14 us of selection + 32 us of cuBLAS measured in the same
# run; at M = 1 the two are about even (67 vs 46 us in a CUDA graph, 56 vs 66 us eager) and the fused
# kernel reads less the sparser x is (s = 0.9: 23 us). M = 2..15 was not measured: one row is the
# safe side until a GPU session sweeps it (benchmarks/gpu_check.sh).
SPARSE_MAX_BATCH = 1


# k varies per call: not specialised. N and d are, so that the masks stay vectorisable.
@triton.jit(do_not_specialize=["k", "per_split", "split_k"])
def _sparse_gemv_kernel(
    x_ptr, stride_xm, stride_xd,  # x [M, d]
    w_ptr, stride_wn, stride_wi,  # weight [N, d]: W[n, i] at n * stride_wn + i * stride_wi
    b_ptr,  # bias [N] (HAS_BIAS)
    out_ptr, stride_om,  # y [M, N]
    part_ptr,  # float32 partial sums [split_k, M, N] (SPLIT)
    cnt_ptr,  # int32 arrival counters [M * n_tiles], zero before and after (SPLIT)
    N, d, k, per_split, split_k,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,  # split_k > 1
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    D_BLOCK: tl.constexpr,
    KEY_LOW: tl.constexpr,
    NBITS: tl.constexpr,
    RADIX: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # rows on grid axis 0: no 65535 limit on M
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    x_row = x_ptr + row * stride_xm
    lo = pid_s * per_split  # this program's features: [lo, hi)
    hi = tl.minimum(lo + per_split, d)
    thr, n_ties, ties_seen = row_threshold(x_row, stride_xd, d, k, lo, D_BLOCK, KEY_LOW, NBITS, RADIX)
    jj = tl.arange(0, BLOCK_K)
    # Products accumulate per (feature lane, output) in registers; the one reduction over the
    # feature lanes (possibly across warps) happens once, after the loop.
    acc2 = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    for j0 in range(lo, hi, BLOCK_K):
        j = j0 + jj
        kept, x, ties_seen = kept_step(x_row, stride_xd, j, hi, thr, n_ties, ties_seen, True)
        # The mask keeps the loads to kept features: the weights of dropped features are never read.
        w_ptrs = w_ptr + j[:, None] * stride_wi + n[None, :] * stride_wn
        w = tl.load(w_ptrs, mask=kept[:, None] & n_ok[None, :], other=0.0)
        acc2 += w.to(tl.float32) * tl.where(kept, to_f32(x), 0.0)[:, None]
    acc = tl.sum(acc2, axis=0)
    if SPLIT:
        # Deterministic split-K in the same launch: every program stores its partial sums; the
        # last of a tile's split_k programs to arrive (counter) adds them in the order s = 0, 1, ...
        # and writes y, then re-arms the counter.
        m_total = tl.num_programs(0)
        tl.store(part_ptr + (pid_s * m_total + row) * N + n, acc, mask=n_ok)
        tl.debug_barrier()  # every thread's partials are written before the release below
        tile = cnt_ptr + row * tl.num_programs(1) + pid_n
        if tl.atomic_add(tile, 1, sem="acq_rel") == split_k - 1:
            acc = tl.zeros([BLOCK_N], tl.float32)
            for s in range(split_k):
                acc += tl.load(part_ptr + (s * m_total + row) * N + n, mask=n_ok, other=0.0, cache_modifier=".cg")
            tl.atomic_xchg(tile, 0)
            _epilogue(acc, n, n_ok, row, b_ptr, out_ptr, stride_om, HAS_BIAS)
    else:
        _epilogue(acc, n, n_ok, row, b_ptr, out_ptr, stride_om, HAS_BIAS)


@triton.jit
def _epilogue(acc, n, n_ok, row, b_ptr, out_ptr, stride_om, HAS_BIAS: tl.constexpr):
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    store_rn(out_ptr + row * stride_om + n, acc, n_ok)


def _gemv(x2, k: int, weight, bias, out, cfg: GemvConfig) -> None:
    m, d = x2.shape
    n_out = weight.shape[0]
    split = max(min(cfg.split_k, triton.cdiv(d, cfg.block_k)), 1)
    per_split = triton.cdiv(triton.cdiv(d, split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(d, per_split)  # no empty slices
    n_tiles = triton.cdiv(n_out, cfg.block_n)
    # Pointers a launch does not use get a read-only input as placeholder (never the output:
    # aliasing a written tensor would confuse torch.compile's mutation analysis of the kernel).
    part = _compat.empty((split, m, n_out), torch.float32, out.device) if split > 1 else x2
    cnt = _compat.zeroed("split_k_counters", m * n_tiles, torch.int32, out) if split > 1 else x2
    has_bias = bias is not None
    key_low, nbits = key_bits(x2.dtype)
    wrap(_sparse_gemv_kernel)[(m, n_tiles, split)](
        x2, x2.stride(0), x2.stride(1),
        weight, weight.stride(0), weight.stride(1),
        bias if has_bias else x2,
        out, out.stride(0),
        part, cnt,
        n_out, d, k, per_split, split,
        HAS_BIAS=has_bias, SPLIT=split > 1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        D_BLOCK=prologue_block(d, cfg.num_warps),
        KEY_LOW=key_low, NBITS=nbits, RADIX=select.PROLOGUE_RADIX,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _config(x2, k, weight, bias, out) -> GemvConfig:
    m, d = x2.shape
    n_out = weight.shape[0]
    key = (
        "sparse_gemv", out.device.index, m, n_out, d, nnz_bucket(k), weight.dtype, x2.dtype,
        weight.stride(0) == 1, bias is not None,
    )  # fmt: skip

    def bench(cfg):
        return lambda: _gemv(x2, k, weight, bias, out, cfg)

    tracing = is_tracing(x2, weight, out)
    return gemv_config(key, out.device, m, n_out, d, weight.element_size(), bench, tracing)


def sparse_linear_rows(
    x2: torch.Tensor, weight: torch.Tensor, k: int, bias: torch.Tensor | None, cfg: GemvConfig | None = None
) -> torch.Tensor:
    """The sparse path for any batch: ``x2 [M, d]``, ``weight [N, d]`` (any strides) -> ``[M, N]``.

    ``cfg`` overrides the autotuned config (tests use it to reach every code path).
    """
    m = x2.shape[0]
    out = _compat.empty((m, weight.shape[0]), x2.dtype, x2.device)
    if m == 0 or weight.shape[0] == 0:
        return out
    _gemv(x2, k, weight, bias, out, cfg or _config(x2, k, weight, bias, out))
    return out


def use_sparse(m: int, d: int, k: int) -> bool:
    """The batch crossover: the fused sparse GEMV for ``M <= SPARSE_MAX_BATCH`` (1) and ``k < d``, masked
    ``F.linear`` else."""
    return m <= SPARSE_MAX_BATCH and k < d


def sparse_linear(x: torch.Tensor, weight: torch.Tensor, k: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """SPEC op 3. ``x [..., d]``, ``weight [N, d]`` (fast: ``weight.stride(0) == 1``), ``bias [N]``
    -> ``[..., N]`` in ``x.dtype``, equal to ``F.linear(topk_sparsify(x, k), weight, bias)``."""
    d, n_out = x.shape[-1], weight.shape[0]
    x2 = x.reshape(math.prod(x.shape[:-1]), d)
    m = x2.shape[0]
    if d == 0 or not use_sparse(m, d, k):
        xs = topk_rows(x2, k) if 0 < k < d else (x2 if k == d else torch.zeros_like(x2))
        y = F.linear(xs, weight, bias)
    else:
        y = sparse_linear_rows(x2, weight, k, bias)
    return y.reshape(*x.shape[:-1], n_out)
