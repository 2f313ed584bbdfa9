"""``ternary_linear`` (SPEC op 7): int8 activations x packed 2-bit ternary weights, exact int32.

The weight stays in the canonical packed layout (SPEC 6, :mod:`qsparse_kernels.layout`):
``uint8 [d, ceil(N / 4)]``, output ``n`` of input feature ``i`` at bits ``2 * (n % 4)`` of byte
``[i, n // 4]`` as ``t + 1``. A program owns ``BLOCK_C`` bytes (``4 * BLOCK_C`` outputs) of one
row and a slice of its input features; per step it loads a ``BLOCK_K x BLOCK_C`` byte tile (each
feature's bytes are contiguous, so the loads vectorise), expands it to ``BLOCK_K x BLOCK_C x 4``
codes with shifts, and accumulates ``(code - 1) * x_q`` in int32, which is exact: no float
rounding anywhere before the epilogue. Code 3 (invalid) gives a wrong value, never a bad access.

Activations:

* ``k is None`` (or ``k == d``): :func:`.quantize.quantize_rows` writes ``x_q [M, d]`` and the GEMV
  walks every feature;
* otherwise the selection (:func:`.select.kept_list_int8`) writes the kept list with the int8 codes
  of ``quantize_act_int8(topk_sparsify(x, k))`` and the GEMV reads only the kept features' rows.

Epilogue (float32, as the reference): ``y = acc * x_scale * scale (+ bias)``, NaN in every output of
a row whose ``x_scale`` is not finite (kept NaN / Inf), cast to ``x.dtype``. Split-K partials are
int32, so their sum is exact and order-free; the reduce kernel applies the epilogue.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from ..layout import packed_cols
from . import _compat
from ._compat import is_tracing, wrap
from .autotune import GemvConfig, gemv_config, nnz_bucket
from .cast import store_rn
from .quantize import quantize_rows
from .select import kept_list_int8


@triton.jit
def _epilogue(acc, n, n_ok, row, xs_ptr, scale_ptr, b_ptr, out_ptr, stride_om, HAS_BIAS: tl.constexpr,
              ACC_ONLY: tl.constexpr):
    """Store ``acc`` (int32, any shape, outputs ``n``) as the int32 accumulator or as ``y``."""
    if ACC_ONLY:
        tl.store(out_ptr + row * stride_om + n, acc, mask=n_ok)
    else:
        xs = tl.load(xs_ptr + row)
        y = acc.to(tl.float32) * xs * tl.load(scale_ptr)
        if HAS_BIAS:
            y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        y = tl.where(tl.abs(xs) < float("inf"), y, float("nan"))  # kept NaN/Inf: the whole row is NaN
        store_rn(out_ptr + row * stride_om + n, y, n_ok)


# nnz (= k) varies per call: not specialised. N is, so that the n-masks stay vectorisable.
@triton.jit(do_not_specialize=["nnz", "per_split"])
def _ternary_gemv_kernel(
    idx_ptr, q_ptr, stride_lm,  # LIST: kept list [M, nnz] (int32 indices, int8 codes); else x_q [M, d]
    p_ptr, stride_pi, stride_pc,  # packed weight [d, C] uint8
    xs_ptr, scale_ptr, b_ptr,  # x_scale [M] float32, weight scale [] float32, bias [N]
    out_ptr, stride_om,  # y [M, N] (or the int32 accumulator when ACC_ONLY)
    part_ptr,  # int32 partial sums [split_k, M, N] (SPLIT)
    N, nnz, per_split,
    LIST: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,
    ACC_ONLY: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # byte columns of the packed rows
    c_ok = c < (N + 3) // 4
    lane = tl.arange(0, 4)  # output n = 4 * c + lane sits at bits 2 * lane
    n = c[:, None] * 4 + lane[None, :]  # [BLOCK_C, 4]
    n_ok = n < N
    jj = tl.arange(0, BLOCK_K)
    lo = pid_s * per_split
    hi = tl.minimum(lo + per_split, nnz)
    acc3 = tl.zeros([BLOCK_K, BLOCK_C, 4], tl.int32)  # reduced over the feature lanes after the loop
    for j0 in range(lo, hi, BLOCK_K):
        j = j0 + jj
        j_ok = j < hi
        if LIST:
            i = tl.load(idx_ptr + row * stride_lm + j, mask=j_ok, other=0).to(tl.int64)
        else:
            i = j.to(tl.int64)
        q = tl.load(q_ptr + row * stride_lm + j, mask=j_ok, other=0).to(tl.int32)  # masked: 0
        byte = tl.load(
            p_ptr + i[:, None] * stride_pi + c[None, :] * stride_pc,
            mask=j_ok[:, None] & c_ok[None, :],
            other=0,
        ).to(tl.int32)
        code = (byte[:, :, None] >> (2 * lane)[None, None, :]) & 3  # [BLOCK_K, BLOCK_C, 4]
        acc3 += (code - 1) * q[:, None, None]
    acc = tl.sum(acc3, axis=0)
    if SPLIT:
        tl.store(part_ptr + (pid_s * tl.num_programs(0) + row) * N + n, acc, mask=n_ok)
    else:
        _epilogue(acc, n, n_ok, row, xs_ptr, scale_ptr, b_ptr, out_ptr, stride_om, HAS_BIAS, ACC_ONLY)


@triton.jit
def _ternary_reduce_kernel(
    part_ptr, xs_ptr, scale_ptr, b_ptr, out_ptr, stride_om, N,
    SPLIT_K: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    ACC_ONLY: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """acc[m, n] = sum_s part[s, m, n] (exact int32), then the epilogue."""
    row = tl.program_id(0).to(tl.int64)
    n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < N
    acc = tl.zeros([BLOCK_N], tl.int32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + (s * tl.num_programs(0) + row) * N + n, mask=n_ok, other=0)
    _epilogue(acc, n, n_ok, row, xs_ptr, scale_ptr, b_ptr, out_ptr, stride_om, HAS_BIAS, ACC_ONLY)


REDUCE_BLOCK = 1024


def _gemv(idx, q, packed, xscale, scale, bias, out, n_out: int, cfg: GemvConfig, acc_only: bool = False) -> None:
    """``idx`` None: dense (``q [M, d]``); else the kept list ``idx, q [M, nnz]``."""
    m, nnz = q.shape
    split = cfg.split_k if nnz > 0 else 1
    per_split = triton.cdiv(triton.cdiv(max(nnz, 1), split), cfg.block_k) * cfg.block_k
    # Unused pointers get a read-only input as placeholder, never the output (see sparse_gemv).
    part = _compat.empty((split, m, n_out), torch.int32, out.device) if split > 1 else packed
    has_bias = bias is not None
    block_c = max(cfg.block_n // 4, 1)
    flags = dict(HAS_BIAS=has_bias, ACC_ONLY=acc_only)
    wrap(_ternary_gemv_kernel)[(m, triton.cdiv(packed_cols(n_out), block_c), split)](
        q if idx is None else idx, q, q.stride(0),
        packed, packed.stride(0), packed.stride(1),
        xscale, xscale if scale is None else scale, bias if has_bias else packed,
        out, out.stride(0),
        part,
        n_out, nnz, per_split,
        LIST=idx is not None, SPLIT=split > 1, BLOCK_C=block_c, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **flags,
    )  # fmt: skip
    if split > 1:
        block = min(REDUCE_BLOCK, triton.next_power_of_2(n_out))
        wrap(_ternary_reduce_kernel)[(m, triton.cdiv(n_out, block))](
            part, xscale, xscale if scale is None else scale, bias if has_bias else packed, out, out.stride(0), n_out,
            SPLIT_K=split, BLOCK_N=block, num_warps=4, **flags,
        )  # fmt: skip


def _run(x2, packed, scale, n_out, k, bias, cfg, acc_only):
    m, d = x2.shape
    dtype = torch.int32 if acc_only else x2.dtype
    out = _compat.empty((m, n_out), dtype, x2.device)
    if m == 0 or n_out == 0:
        return out, None
    if k is None or k == d:  # every feature kept: no selection, no index list
        idx = None
        q, xscale = quantize_rows(x2)
    else:
        idx, q, xscale = kept_list_int8(x2, k)
    if cfg is None:
        nnz = q.shape[1]
        key = ("ternary_gemv", out.device.index, m, n_out, nnz_bucket(nnz), idx is None, bias is not None, acc_only)

        def bench(c):
            return lambda: _gemv(idx, q, packed, xscale, scale, bias, out, n_out, c, acc_only)

        tracing = is_tracing(x2, packed, out)
        cfg = gemv_config(key, out.device, m, n_out, q.shape[1], 0.25, bench, tracing)
    _gemv(idx, q, packed, xscale, scale, bias, out, n_out, cfg, acc_only)
    return out, xscale


def ternary_accumulate_rows(
    x2: torch.Tensor, packed: torch.Tensor, out_features: int, k: int | None, cfg: GemvConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The exact integer part of ``ternary_linear`` on ``x2 [M, d]``:
    ``(acc int32 [M, N], x_scale float32 [M])`` (tests compare ``acc`` with the reference exactly)."""
    return _run(x2, packed, None, out_features, k, None, cfg, acc_only=True)


def ternary_linear_rows(x2, packed, scale, out_features, k=None, bias=None, cfg: GemvConfig | None = None):
    """``ternary_linear`` on ``x2 [M, d]`` -> ``[M, N]``; ``cfg`` overrides the autotuned config."""
    return _run(x2, packed, scale, out_features, k, bias, cfg, acc_only=False)[0]


def ternary_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    out_features: int,
    k: int | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """SPEC op 7. ``x [..., d]``, ``packed uint8 [d, ceil(N/4)]``, ``scale float32 []``, ``bias [N]``
    -> ``[..., N]`` in ``x.dtype``."""
    d = x.shape[-1]
    x2 = x.reshape(math.prod(x.shape[:-1]), d)
    if d == 0:  # nothing to accumulate: acc = 0, x_scale = 1e-5 / 127
        from ..reference import ternary_linear as ref

        return ref(x, packed, scale, out_features, k, bias)
    y = ternary_linear_rows(x2, packed, scale, out_features, k, bias)
    return y.reshape(*x.shape[:-1], out_features)
