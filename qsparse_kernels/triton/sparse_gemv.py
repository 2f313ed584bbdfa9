"""``sparse_linear`` (SPEC op 3): top-k selection feeding a split-K sparse GEMV.

``y[m, :] = sum over kept features i of x[m, i] * W[:, i]  (+ bias)``, float32 accumulation.

The selection (:mod:`.select`) writes each row's kept list (feature indices in index order and
their values as float32). The GEMV then walks only that list: a program owns ``BLOCK_N`` outputs
of one row and a contiguous slice of the row's kept list, and for each step of ``BLOCK_K`` kept
features loads the ``BLOCK_K x BLOCK_N`` weights ``W[n, i]``, so the weights of dropped features
are never read. With the fast layout (column-major, ``weight.stride(0) == 1``) each kept feature
is one contiguous run of ``BLOCK_N`` values: coalesced, vectorised loads. Any other strides are
correct too (they are launch arguments), just slower.

Split-K: ``split_k`` programs share one row's list; each writes float32 partial sums and a small
second kernel adds them in a fixed order, adds the bias and casts, so results are deterministic
(no float atomics). With ``split_k == 1`` the GEMV kernel does that epilogue itself.

Batches: every row has its own kept set, so ``M`` rows read up to ``M * k / d`` of the weight.
Above the crossover (:func:`use_sparse`) the masked activations go through ``F.linear`` (cuBLAS)
instead. The crossover constants are first estimates for H100/H200 and should be measured with
``benchmarks/bench_gpu.py`` on the target GPU.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from . import _compat
from ._compat import is_tracing, wrap
from .autotune import GemvConfig, gemv_config, nnz_bucket
from .cast import store_rn
from .select import kept_list, topk_rows

# Sparse GEMV while  M <= SPARSE_MAX_BATCH  and  M * k <= DENSE_FRACTION * d  (both ints known on
# the host: no data-dependent branching). The sparse kernel streams ~85-90% of copy bandwidth on
# the rows it reads, cuBLAS ~90% on all of them, so reading >~0.75 of the weight in total
# (summed over rows, ignoring L2 reuse between rows) is no longer a win. TO MEASURE on the GPU.
DENSE_FRACTION = 0.75
SPARSE_MAX_BATCH = 16


# nnz (= k) varies per call: not specialised. N is, so that the n-masks stay vectorisable.
@triton.jit(do_not_specialize=["nnz", "per_split"])
def _sparse_gemv_kernel(
    idx_ptr, val_ptr, stride_lm,  # kept list [M, nnz]: int32 feature indices, float32 values
    w_ptr, stride_wn, stride_wi,  # weight [N, d]: W[n, i] at n * stride_wn + i * stride_wi
    b_ptr,  # bias [N] (HAS_BIAS)
    out_ptr, stride_om,  # y [M, N] (split_k == 1)
    part_ptr,  # float32 partial sums [split_k, M, N] (split_k > 1)
    N, nnz, per_split,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # rows on grid axis 0: no 65535 limit on M
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    jj = tl.arange(0, BLOCK_K)
    lo = pid_s * per_split
    hi = tl.minimum(lo + per_split, nnz)
    # Products accumulate per (feature lane, output) in registers; the one reduction over the
    # feature lanes (possibly across warps) happens once, after the loop.
    acc2 = tl.zeros([BLOCK_K, BLOCK_N], tl.float32)
    for j0 in range(lo, hi, BLOCK_K):
        j = j0 + jj
        j_ok = j < hi
        i = tl.load(idx_ptr + row * stride_lm + j, mask=j_ok, other=0).to(tl.int64)
        v = tl.load(val_ptr + row * stride_lm + j, mask=j_ok, other=0.0)
        # The mask keeps the loads to kept features: the weights of dropped features are never read.
        w = tl.load(
            w_ptr + i[:, None] * stride_wi + n[None, :] * stride_wn,
            mask=j_ok[:, None] & n_ok[None, :],
            other=0.0,
        )
        acc2 += w.to(tl.float32) * v[:, None]
    acc = tl.sum(acc2, axis=0)
    if SPLIT:
        tl.store(part_ptr + (pid_s * tl.num_programs(0) + row) * N + n, acc, mask=n_ok)
    else:
        if HAS_BIAS:
            acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        store_rn(out_ptr + row * stride_om + n, acc, n_ok)


@triton.jit
def _split_reduce_kernel(
    part_ptr, b_ptr, out_ptr, stride_om, N,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """y[m, n] = sum_s part[s, m, n] (in order s = 0, 1, ...) + bias[n], cast to y's dtype."""
    row = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    m_total = tl.num_programs(0)
    acc = tl.zeros([BLOCK_N], tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + (s * m_total + row) * N + n, mask=n_ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
    store_rn(out_ptr + row * stride_om + n, acc, n_ok)


REDUCE_BLOCK = 1024


def _gemv(idx, val, weight, bias, out, cfg: GemvConfig) -> None:
    m, nnz = idx.shape
    n_out = weight.shape[0]
    split = cfg.split_k if nnz > 0 else 1
    per_split = triton.cdiv(triton.cdiv(max(nnz, 1), split), cfg.block_k) * cfg.block_k
    # Pointers a launch does not use get a read-only input as placeholder (never the output:
    # aliasing a written tensor would confuse torch.compile's mutation analysis of the kernel).
    part = _compat.empty((split, m, n_out), torch.float32, out.device) if split > 1 else val
    has_bias = bias is not None
    wrap(_sparse_gemv_kernel)[(m, triton.cdiv(n_out, cfg.block_n), split)](
        idx, val, idx.stride(0),
        weight, weight.stride(0), weight.stride(1),
        bias if has_bias else val,
        out, out.stride(0),
        part,
        n_out, nnz, per_split,
        HAS_BIAS=has_bias, SPLIT=split > 1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if split > 1:
        block = min(REDUCE_BLOCK, triton.next_power_of_2(n_out))
        wrap(_split_reduce_kernel)[(m, triton.cdiv(n_out, block))](
            part, bias if has_bias else val, out, out.stride(0), n_out,
            SPLIT_K=split, HAS_BIAS=has_bias, BLOCK_N=block, num_warps=4,
        )  # fmt: skip


def _config(idx, val, weight, bias, out) -> GemvConfig:
    m, nnz = idx.shape
    n_out = weight.shape[0]
    key = (
        "sparse_gemv", out.device.index, m, n_out, nnz_bucket(nnz), weight.dtype,
        weight.stride(0) == 1, bias is not None,
    )  # fmt: skip

    def bench(cfg):
        return lambda: _gemv(idx, val, weight, bias, out, cfg)

    tracing = is_tracing(idx, val, weight, out)
    return gemv_config(key, out.device, m, n_out, nnz, weight.element_size(), bench, tracing)


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
    idx, val = kept_list(x2, k)
    _gemv(idx, val, weight, bias, out, cfg or _config(idx, val, weight, bias, out))
    return out


def use_sparse(m: int, d: int, k: int) -> bool:
    """The batch crossover: the sparse GEMV for small ``M * k``, masked ``F.linear`` above it."""
    return m <= SPARSE_MAX_BATCH and m * k <= DENSE_FRACTION * d


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
