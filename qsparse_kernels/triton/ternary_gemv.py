"""``ternary_linear`` (SPEC op 7): int8 activations x packed 2-bit ternary weights, exact int32,
in one launch.

The weight stays in the canonical packed layout (SPEC 6, :mod:`qsparse_kernels.layout`):
``uint8 [d, C = ceil(N / 4)]``, output ``n`` of input feature ``i`` at bits ``2 * (n % 4)`` of byte
``[i, n // 4]`` as ``t + 1``. A program owns ``BLOCK_C`` bytes (``4 * BLOCK_C`` outputs) of one
row and a slice ``[lo, hi)`` of the input features. Its prologue re-derives from ``x`` the row's
int8 scale (max |x|) and, when ``k`` is given and ``< d``, the row's selection
(:func:`.select.row_threshold`); with ``k`` None there is no selection at all. The loop quantizes
its features on the fly, loads a ``BLOCK_K x BLOCK_C`` byte tile masked by ``kept`` (the mask is
on ``C``, whose divisibility by 16 is known, so each thread loads 16 bytes at once) and
accumulates ``(code - 1) * x_q`` into four 2-D int32 accumulators, one per 2-bit lane: exact, no
float rounding before the epilogue. Code 3 (invalid) gives a wrong value, never a bad access.

Split-K in the same launch: int32 atomics into a zeroed accumulator (exact, order-free); the
last program of a tile to arrive (counter) takes the sums, leaves zeros, and applies the epilogue:
``y = acc * x_scale * scale (+ bias)`` in float32 as the reference, NaN in every output of a row
whose ``x_scale`` is not finite (kept NaN / Inf), cast to ``x.dtype``.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _compat, select
from ._compat import is_tracing, wrap
from .autotune import GemvConfig, gemv_config, nnz_bucket
from .cast import store_rn
from .quantize import KEY_MIN_ABSMAX, act_scales, round_half_even_i32, to_f32
from .select import kept_step, key_bits, prologue_block, row_max_key, row_threshold


@triton.jit
def _epilogue(acc, n, n_ok, row, xs, scale_ptr, b_ptr, out_ptr, stride_om, HAS_BIAS: tl.constexpr,
              ACC_ONLY: tl.constexpr):
    """Store ``acc`` (int32, outputs ``n``) as the int32 accumulator or as ``y``; ``xs`` = x_scale."""
    if ACC_ONLY:
        tl.store(out_ptr + row * stride_om + n, acc, mask=n_ok)
    else:
        y = acc.to(tl.float32) * xs * tl.load(scale_ptr)
        if HAS_BIAS:
            y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)
        y = tl.where(tl.abs(xs) < float("inf"), y, float("nan"))  # kept NaN/Inf: the whole row is NaN
        store_rn(out_ptr + row * stride_om + n, y, n_ok)


@triton.jit
def _lane_sum(byte, q, LANE: tl.constexpr):
    """``sum over features of (t - 1) * q`` for output lane ``LANE`` of each byte: ``[BLOCK_C]``."""
    code = (byte >> (2 * LANE)) & 3
    return (code - 1) * q[:, None]


# k varies per call: not specialised. N, C and d are, so that the masks stay vectorisable.
@triton.jit(do_not_specialize=["k", "per_split", "split_k"])
def _ternary_gemv_kernel(
    x_ptr, stride_xm, stride_xd,  # x [M, d] float
    p_ptr, stride_pi, stride_pc,  # packed weight [d, C] uint8
    xs_ptr, scale_ptr, b_ptr,  # x_scale [M] float32 (written when ACC_ONLY), weight scale [], bias [N]
    out_ptr, stride_om,  # y [M, N] (or the int32 accumulator when ACC_ONLY)
    acc_ptr,  # int32 [M, N] accumulators, zero before and after (SPLIT)
    cnt_ptr,  # int32 arrival counters [M * n_tiles], zero before and after (SPLIT)
    N, C, d, k, per_split, split_k,
    SELECT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SPLIT: tl.constexpr,  # split_k > 1
    ACC_ONLY: tl.constexpr,
    BLOCK_C: tl.constexpr,
    BLOCK_K: tl.constexpr,
    D_BLOCK: tl.constexpr,
    KEY_LOW: tl.constexpr,
    NBITS: tl.constexpr,
    RADIX: tl.constexpr,
    KEY_MIN: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    pid_c = tl.program_id(1)
    pid_s = tl.program_id(2)
    x_row = x_ptr + row * stride_xm
    lo = pid_s * per_split  # this program's features: [lo, hi)
    hi = tl.minimum(lo + per_split, d)
    # Prologue: the row's selection (SELECT) and its int8 scale, as every program of the row
    # derives them. max|x| of the kept entries is the row's max when k >= 1 (the max is kept).
    mx = row_max_key(x_row, stride_xd, d, D_BLOCK)
    if SELECT:
        thr, n_ties, ties_seen = row_threshold(x_row, stride_xd, d, k, lo, D_BLOCK, KEY_LOW, NBITS, RADIX)
        mx = tl.where(k > 0, mx, 0)
    else:
        thr, n_ties, ties_seen = 0, 0, 0
    s, x_scale = act_scales(mx, KEY_MIN)
    if ACC_ONLY:
        if (pid_c == 0) & (pid_s == 0):
            tl.store(xs_ptr + row, x_scale)

    c = pid_c * BLOCK_C + tl.arange(0, BLOCK_C)  # byte columns of the packed rows
    c_ok = c < C  # C, not (N + 3) // 4: its divisibility is known, so the byte loads are 16 wide
    jj = tl.arange(0, BLOCK_K)
    # One 2-D accumulator per 2-bit lane of a byte (output n = 4 * c + lane), reduced over the
    # feature rows after the loop; exact int32 throughout.
    a0 = tl.zeros([BLOCK_K, BLOCK_C], tl.int32)
    a1 = tl.zeros([BLOCK_K, BLOCK_C], tl.int32)
    a2 = tl.zeros([BLOCK_K, BLOCK_C], tl.int32)
    a3 = tl.zeros([BLOCK_K, BLOCK_C], tl.int32)
    for j0 in range(lo, hi, BLOCK_K):
        j = j0 + jj
        kept, x, ties_seen = kept_step(x_row, stride_xd, j, hi, thr, n_ties, ties_seen, SELECT)
        q = tl.where(kept, round_half_even_i32(to_f32(x) * s), 0)
        byte = tl.load(p_ptr + j[:, None] * stride_pi + c[None, :] * stride_pc, mask=kept[:, None] & c_ok[None, :],
                       other=0).to(tl.int32)
        a0 += _lane_sum(byte, q, 0)
        a1 += _lane_sum(byte, q, 1)
        a2 += _lane_sum(byte, q, 2)
        a3 += _lane_sum(byte, q, 3)
    r0 = tl.sum(a0, axis=0)
    r1 = tl.sum(a1, axis=0)
    r2 = tl.sum(a2, axis=0)
    r3 = tl.sum(a3, axis=0)
    n = c * 4
    if SPLIT:
        # Split-K in the same launch: exact int32 atomics into a zeroed accumulator; the last of a
        # tile's split_k programs to arrive (counter, acquire-release) takes the sums (leaving zeros
        # behind for the next call), re-arms the counter and applies the epilogue.
        acc_row = acc_ptr + row * N
        tl.atomic_add(acc_row + n, r0, mask=n < N, sem="relaxed")
        tl.atomic_add(acc_row + n + 1, r1, mask=n + 1 < N, sem="relaxed")
        tl.atomic_add(acc_row + n + 2, r2, mask=n + 2 < N, sem="relaxed")
        tl.atomic_add(acc_row + n + 3, r3, mask=n + 3 < N, sem="relaxed")
        tl.debug_barrier()  # every thread's adds are done before the release below
        tile = cnt_ptr + row * tl.num_programs(1) + pid_c
        if tl.atomic_add(tile, 1, sem="acq_rel") == split_k - 1:
            r0 = tl.atomic_xchg(acc_row + n, 0, mask=n < N)
            r1 = tl.atomic_xchg(acc_row + n + 1, 0, mask=n + 1 < N)
            r2 = tl.atomic_xchg(acc_row + n + 2, 0, mask=n + 2 < N)
            r3 = tl.atomic_xchg(acc_row + n + 3, 0, mask=n + 3 < N)
            tl.atomic_xchg(tile, 0)
            _epilogue(r0, n, n < N, row, x_scale, scale_ptr, b_ptr, out_ptr, stride_om, HAS_BIAS, ACC_ONLY)
            _epilogue(r1, n + 1, n + 1 < N, row, x_scale, scale_ptr, b_ptr, out_ptr, stride_om, HAS_BIAS, ACC_ONLY)
            _epilogue(r2, n + 2, n + 2 < N, row, x_scale, scale_ptr, b_ptr, out_ptr, stride_om, HAS_BIAS, ACC_ONLY)
            _epilogue(r3, n + 3, n + 3 < N, row, x_scale, scale_ptr, b_ptr, out_ptr, stride_om, HAS_BIAS, ACC_ONLY)
    else:
        _epilogue(r0, n, n < N, row, x_scale, scale_ptr, b_ptr, out_ptr, stride_om, HAS_BIAS, ACC_ONLY)
        _epilogue(r1, n + 1, n + 1 < N, row, x_scale, scale_ptr, b_ptr, out_ptr, stride_om, HAS_BIAS, ACC_ONLY)
        _epilogue(r2, n + 2, n + 2 < N, row, x_scale, scale_ptr, b_ptr, out_ptr, stride_om, HAS_BIAS, ACC_ONLY)
        _epilogue(r3, n + 3, n + 3 < N, row, x_scale, scale_ptr, b_ptr, out_ptr, stride_om, HAS_BIAS, ACC_ONLY)


def _gemv(x2, k, packed, scale, bias, out, xscale, n_out: int, cfg: GemvConfig, acc_only: bool) -> None:
    """One launch: ``k`` None (or ``d``) walks every feature, else the top-``k`` of each row."""
    m, d = x2.shape
    split = max(min(cfg.split_k, triton.cdiv(d, cfg.block_k)), 1)
    per_split = triton.cdiv(triton.cdiv(d, split), cfg.block_k) * cfg.block_k
    split = triton.cdiv(d, per_split)  # no empty slices
    block_c = max(cfg.block_n // 4, 1)
    n_tiles = triton.cdiv(packed.shape[1], block_c)
    # Unused pointers get a read-only input as placeholder, never the output (see sparse_gemv).
    acc = _compat.zeroed("ternary_acc", m * n_out, torch.int32, out) if split > 1 else packed
    cnt = _compat.zeroed("split_k_counters", m * n_tiles, torch.int32, out) if split > 1 else packed
    has_bias = bias is not None
    sel = k is not None and k < d
    key_low, nbits = key_bits(x2.dtype)
    wrap(_ternary_gemv_kernel)[(m, n_tiles, split)](
        x2, x2.stride(0), x2.stride(1),
        packed, packed.stride(0), packed.stride(1),
        xscale if acc_only else packed, packed if scale is None else scale, bias if has_bias else packed,
        out, out.stride(0),
        acc, cnt,
        n_out, packed.shape[1], d, k if sel else d, per_split, split,
        SELECT=sel, HAS_BIAS=has_bias, SPLIT=split > 1, ACC_ONLY=acc_only, BLOCK_C=block_c, BLOCK_K=cfg.block_k,
        D_BLOCK=prologue_block(d, cfg.num_warps),
        KEY_LOW=key_low, NBITS=nbits, RADIX=select.PROLOGUE_RADIX, KEY_MIN=KEY_MIN_ABSMAX,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip


def _run(x2, packed, scale, n_out, k, bias, cfg, acc_only):
    m, d = x2.shape
    dtype = torch.int32 if acc_only else x2.dtype
    out = _compat.empty((m, n_out), dtype, x2.device)
    xscale = _compat.empty((m,), torch.float32, x2.device) if acc_only else None
    if m == 0 or n_out == 0:
        return out, xscale
    if cfg is None:
        key = ("ternary_gemv", out.device.index, m, n_out, d, x2.dtype, nnz_bucket(d if k is None else k),
               k is None or k == d, bias is not None, acc_only)  # fmt: skip

        def bench(c):
            return lambda: _gemv(x2, k, packed, scale, bias, out, xscale, n_out, c, acc_only)

        tracing = is_tracing(x2, packed, out)
        cfg = gemv_config(key, out.device, m, n_out, d, 0.25, bench, tracing)
    _gemv(x2, k, packed, scale, bias, out, xscale, n_out, cfg, acc_only)
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
