"""Per-row top-k magnitude selection without a sort: radix select over magnitude keys.

One program per row. The keys are the float32 bits of ``x`` with the sign cleared, as int32
(:func:`select_key`): their integer order is the magnitude order with NaN above +Inf, every NaN
payload one key, which is the SPEC's order. The threshold ``thr`` (the k-th largest key) is built
digit by digit, ``RADIX_BITS`` bits per pass from the top: a pass counts, for all ``2**RADIX_BITS`` candidate
digits at once, how many keys are >= ``prefix + (digit << shift)``, and keeps the largest digit
whose count is still >= k (counts fall as the digit grows, so that is the number of candidates
that pass, minus one). 31 key bits take 8 passes of 4 bits; each pass re-reads the row, which
stays in L1/L2. Keys of bf16 / fp16 inputs have 16 / 13 low bits that are always zero, so those
take 4 / 5 passes (``KEY_ZERO_BITS``). A last pass keeps every key > ``thr`` plus the first
``k - count(key > thr)`` keys equal to ``thr`` in index order (ties broken by lowest index, so
exactly ``k`` are kept), using an exclusive prefix sum of the tie flags carried across chunks.

That pass writes the dense sparsified row (``topk_sparsify``): kept entries copied, the others
+0. The fused GEMVs (``sparse_gemv``, ``ternary_gemv``) select in their own prologue with the
same steps (:func:`row_threshold`, :func:`kept_step`), without writing a row or a list.

``k == 0`` needs no special case: every candidate passes, ``thr`` ends at the largest key value
and no key is kept. No host synchronisation: ``k`` is a launch argument, never read back.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from . import _compat
from ._compat import wrap
from .autotune import select_block
from .quantize import mag_key

INF_KEY = tl.constexpr(0x7F800000)
NAN_KEY = tl.constexpr(0x7FC00000)  # every NaN's key (reference.NAN_KEY); low 16 bits 0, as KEY_ZERO_BITS needs


@triton.jit
def select_key(x):
    """:func:`.quantize.mag_key` with every NaN, whatever its payload, mapped to one key, so NaNs tie
    and the lowest index wins among them (SPEC 1)."""
    key = mag_key(x)
    return tl.where(key > INF_KEY, NAN_KEY, key)

RADIX_BITS = 4
KEY_BITS = 31  # the sign bit of a magnitude key is always 0
# Low key bits that are always 0 because the input is a narrower float widened to float32
# (subnormals, Inf and NaN included): the radix passes skip them. bf16 keys take 4 passes, fp16 5,
# fp32 8.
KEY_ZERO_BITS = {torch.float32: 0, torch.float16: 13, torch.bfloat16: 16}


# k varies per call: one compiled kernel for all of them. d is specialised (only on its
# divisibility by 16), so that the row loads vectorise (16 bytes per thread).
@triton.jit(do_not_specialize=["k"])
def _select_kernel(
    x_ptr, stride_xm, stride_xd,  # x [M, d], any strides
    y_ptr, stride_ym,  # dense output [M, d], unit stride along d
    d, k,
    BLOCK: tl.constexpr,
    RADIX_BITS: tl.constexpr,
    KEY_LOW: tl.constexpr,
    NPASS: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_xm
    offs = tl.arange(0, BLOCK)
    digits = tl.arange(0, 1 << RADIX_BITS)

    # ---- radix select: thr = the k-th largest key (invariant: count(key >= prefix) >= k) ----
    prefix = tl.full([], 0, tl.int32)
    for p in range(NPASS):
        shift = KEY_LOW + (NPASS - 1 - p) * RADIX_BITS
        cand = prefix.to(tl.int64) + (digits.to(tl.int64) << shift)
        valid = cand <= 0x7FFFFFFF  # the top digit only has 31 - 28 = 3 bits
        cand32 = tl.where(valid, cand, 0x7FFFFFFF).to(tl.int32)
        cnt = tl.zeros([1 << RADIX_BITS, BLOCK], tl.int32)  # per candidate and lane: one reduction per pass
        for start in range(0, d, BLOCK):
            o = start + offs
            x = tl.load(x_row + o * stride_xd, mask=o < d, other=0.0)
            key = select_key(x)
            key = tl.where(o < d, key, -1)  # padding is below every candidate
            cnt += (key[None, :] >= cand32[:, None]).to(tl.int32)
        passed = (tl.sum(cnt, axis=1) >= k) & valid  # digit 0 always passes; counts fall as the digit grows
        prefix = prefix + ((tl.sum(passed.to(tl.int32), axis=0) - 1) << shift)
    thr = prefix

    n_gt = tl.zeros([BLOCK], tl.int32)
    for start in range(0, d, BLOCK):
        o = start + offs
        x = tl.load(x_row + o * stride_xd, mask=o < d, other=0.0)
        key = select_key(x)
        n_gt += ((key > thr) & (o < d)).to(tl.int32)
    n_ties = k - tl.sum(n_gt, axis=0)  # how many keys equal to thr are kept, lowest index first

    # ---- keep pass ----
    ties_seen = tl.full([], 0, tl.int32)
    for start in range(0, d, BLOCK):
        o = start + offs
        inb = o < d
        x = tl.load(x_row + o * stride_xd, mask=inb, other=0.0)
        key = select_key(x)
        tie = ((key == thr) & inb).to(tl.int32)
        tie_rank = ties_seen + tl.cumsum(tie, axis=0) - tie  # exclusive prefix count of ties
        kept = ((key > thr) & inb) | ((tie == 1) & (tie_rank < n_ties))
        ties_seen += tl.sum(tie, axis=0)
        tl.store(y_ptr + row * stride_ym + o, tl.where(kept, x, 0.0), mask=inb)


@triton.jit
def row_keys(x_row, stride_xd, o, d):
    """Selection keys of ``x[o]`` (-1 past ``d``, below every key) and the values (0 past ``d``)."""
    x = tl.load(x_row + o * stride_xd, mask=o < d, other=0.0)
    return tl.where(o < d, select_key(x), -1), x


@triton.jit
def _digit_counts(keys, prefix, digits, shift):
    """For candidates ``prefix + (digit << shift)`` (int64, past 31 bits invalid): ``(cand32, valid)``."""
    cand = prefix.to(tl.int64) + (digits.to(tl.int64) << shift)
    valid = cand <= 0x7FFFFFFF
    return tl.where(valid, cand, 0x7FFFFFFF).to(tl.int32), valid


@triton.jit
def row_threshold(x_row, stride_xd, d, k, lo, D_BLOCK: tl.constexpr, KEY_LOW: tl.constexpr, NBITS: tl.constexpr,
                  RADIX: tl.constexpr):
    """The fused GEMVs' prologue: one row's selection as every program of that row re-derives it.

    Returns ``(thr, n_ties, ties_before)``: ``thr`` = the k-th largest key, built ``RADIX`` bits
    per pass from the top (``cdiv(NBITS, RADIX)`` passes; a pass compares every key with the
    ``2**RADIX`` candidate digits at once and needs one reduction; invariant
    ``count(key >= thr) >= k``), ``n_ties`` = how many keys equal to ``thr`` are kept (the lowest
    indices first), ``ties_before`` = keys equal to ``thr`` at indices ``< lo`` (where the
    caller's slice of features starts). When the row fits one block (``d <= D_BLOCK``) the keys
    stay in registers across the passes; otherwise each pass re-reads the row (from L1 / L2).
    ``k == 0``: ``thr`` climbs above every key, nothing is kept.
    """
    offs = tl.arange(0, D_BLOCK)
    digits = tl.arange(0, 1 << RADIX)
    NPASS: tl.constexpr = (NBITS + RADIX - 1) // RADIX
    thr = tl.full([], 0, tl.int32)
    if d <= D_BLOCK:
        keys, _ = row_keys(x_row, stride_xd, offs, d)
        for p in range(NPASS):
            shift = KEY_LOW + (NPASS - 1 - p) * RADIX
            cand, valid = _digit_counts(keys, thr, digits, shift)
            cnt = tl.sum((keys[None, :] >= cand[:, None]).to(tl.int32), axis=1)
            thr += (tl.sum(((cnt >= k) & valid).to(tl.int32), axis=0) - 1) << shift  # digit 0 always passes
        n_gt = tl.sum((keys > thr).to(tl.int32), axis=0)
        ties_before = tl.sum(((keys == thr) & (offs < lo)).to(tl.int32), axis=0)
    else:
        for p in range(NPASS):
            shift = KEY_LOW + (NPASS - 1 - p) * RADIX
            cand, valid = _digit_counts(thr, thr, digits, shift)
            cnt = tl.zeros([1 << RADIX], tl.int32)
            for start in range(0, d, D_BLOCK):
                keys, _ = row_keys(x_row, stride_xd, start + offs, d)
                cnt += tl.sum((keys[None, :] >= cand[:, None]).to(tl.int32), axis=1)
            thr += (tl.sum(((cnt >= k) & valid).to(tl.int32), axis=0) - 1) << shift
        n_gt_v = tl.zeros([D_BLOCK], tl.int32)
        before_v = tl.zeros([D_BLOCK], tl.int32)
        for start in range(0, d, D_BLOCK):
            keys, _ = row_keys(x_row, stride_xd, start + offs, d)
            n_gt_v += (keys > thr).to(tl.int32)
            before_v += ((keys == thr) & (start + offs < lo)).to(tl.int32)
        n_gt = tl.sum(n_gt_v, axis=0)
        ties_before = tl.sum(before_v, axis=0)
    return thr, k - n_gt, ties_before


@triton.jit
def row_max_key(x_row, stride_xd, d, D_BLOCK: tl.constexpr):
    """The largest selection key of one row (NaN above +Inf): ``max|x|`` for the int8 scale."""
    offs = tl.arange(0, D_BLOCK)
    mx = tl.full([D_BLOCK], -1, tl.int32)
    for start in range(0, d, D_BLOCK):
        keys, _ = row_keys(x_row, stride_xd, start + offs, d)
        mx = tl.maximum(mx, keys)
    return tl.max(mx, axis=0)


@triton.jit
def kept_step(x_row, stride_xd, j, hi, thr, n_ties, ties_seen, SELECT: tl.constexpr):
    """One step of a fused GEMV over features ``j`` (a block of consecutive indices, ``< hi``):
    ``(kept, x, ties_seen)``, where ``kept`` is exactly the selection's verdict (ties at ``thr``
    kept in index order while fewer than ``n_ties`` were) and ``ties_seen`` counts ties so far."""
    keys, x = row_keys(x_row, stride_xd, j, hi)
    if SELECT:
        tie = (keys == thr).to(tl.int32)
        rank = ties_seen + tl.cumsum(tie, axis=0) - tie  # ties at lower indices
        kept = (keys > thr) | ((tie == 1) & (rank < n_ties))
        ties_seen += tl.sum(tie, axis=0)
    else:
        kept = j < hi
    return kept, x, ties_seen


def prologue_block(d: int, num_warps: int) -> int:
    """Keys per row block in :func:`row_threshold`: the whole row while that is <= 16 per thread."""
    return min(triton.next_power_of_2(max(d, 1)), 16 * 32 * num_warps)


# Bits per pass of the fused prologue's selection: on the GPU 2 (three useful comparisons per key
# and pass, 8 passes for bf16); the interpreter, whose cost is per operation, not per element,
# takes 4 (tests also run 2).
PROLOGUE_RADIX = 4 if _compat.INTERPRET else 2


def key_bits(dtype: torch.dtype) -> tuple[int, int]:
    """``(KEY_LOW, NBITS)``: the key bits that can be non-zero for inputs of ``dtype``."""
    low = KEY_ZERO_BITS[dtype]
    return low, KEY_BITS - low


def topk_rows(x2: torch.Tensor, k: int) -> torch.Tensor:
    """``x2 [M, d]`` (any strides) -> contiguous ``[M, d]`` with the k largest |x| per row kept."""
    y = _compat.empty(x2.shape, x2.dtype, x2.device)
    m, d = x2.shape
    if m == 0 or d == 0:
        return y
    block, warps = select_block(d)
    key_low = KEY_ZERO_BITS[x2.dtype]
    wrap(_select_kernel)[(m,)](
        x2, x2.stride(0), x2.stride(1), y, y.stride(0), d, k,
        BLOCK=block, RADIX_BITS=RADIX_BITS, KEY_LOW=key_low,
        NPASS=triton.cdiv(KEY_BITS - key_low, RADIX_BITS), num_warps=warps,
    )  # fmt: skip
    return y


def topk_sparsify(x: torch.Tensor, k: int) -> torch.Tensor:
    """SPEC op 1. ``x [..., d]`` -> same shape and dtype, the k largest |x| of each row kept, others +0."""
    d = x.shape[-1]
    if d == 0:
        return torch.empty_like(x)
    return topk_rows(x.reshape(math.prod(x.shape[:-1]), d), k).reshape(x.shape)
