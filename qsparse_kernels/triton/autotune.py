"""Launch configurations: heuristics, the H100/H200 search space, and the per-shape cache.

Row kernels use :func:`row_block` (quantization) and :func:`select_block` (top-k). The GEMV kernels take a
:class:`GemvConfig`; :func:`gemv_config` returns, per *shape key*, the fastest config measured
once on this GPU (cached in-process), or the heuristic when measuring is not possible:

* under ``TRITON_INTERPRET=1`` one fixed small config (autotuning the interpreter is pointless);
* while torch.compile traces (fake tensors) or a CUDA graph is being captured;
* when ``QSPARSE_TRITON_AUTOTUNE=0``;
* under ``torch.use_deterministic_algorithms(True)``: measured choices can differ between
  processes, and a different split-K changes the float summation order of ``sparse_linear``.

Warm up (one call per shape) before capturing a CUDA graph so that the capture finds the cache
filled. A shape key buckets the kept count to a power of two so that every ``k`` of a layer shares
one measurement; the first call per key compiles and times at most ``len(candidates)`` configs
(a few seconds), never minutes.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import triton
import triton.testing

from ._compat import INTERPRET, is_capturing

ENV_AUTOTUNE = "QSPARSE_TRITON_AUTOTUNE"
MAX_CANDIDATES = 8  # each costs one compile (~1 s) + ~25 ms of timing, once per shape key


@dataclass(frozen=True)
class GemvConfig:
    """Tile of the split-K GEMV kernels.

    block_n: outputs per program; block_k: kept input features per inner step; split_k: programs
    sharing one row's kept list (partial sums reduced by a second, deterministic kernel when > 1).
    """

    block_n: int
    block_k: int
    split_k: int
    num_warps: int = 4
    num_stages: int = 3


# One fixed config for the interpreter: tiles small enough that the tests' odd shapes (up to 130)
# go through the loops, the tails and the split-K reduction, large enough to keep the number of
# interpreted programs (each op costs Python time) low.
INTERPRET_GEMV = GemvConfig(block_n=128, block_k=32, split_k=2, num_warps=1, num_stages=1)
INTERPRET_ROW_BLOCK = 128


def row_block(d: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for the one-program-per-row kernels over ``d`` features."""
    if INTERPRET:
        return INTERPRET_ROW_BLOCK, 1
    block = min(triton.next_power_of_2(max(d, 1)), 2048)
    return block, 8 if block >= 2048 else 4


def select_block(d: int) -> tuple[int, int]:
    """``(BLOCK, num_warps)`` for the radix selection, whose per-pass counters are a
    ``[16, BLOCK]`` int32 tile: 1024 lanes over 8 warps keep them at 64 registers per thread."""
    if INTERPRET:
        return INTERPRET_ROW_BLOCK, 1
    block = min(triton.next_power_of_2(max(d, 1)), 1024)
    return block, 8 if block >= 1024 else 4


def _sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count


def heuristic(device: torch.device, m: int, n: int, nnz: int, elem_bytes: float) -> GemvConfig:
    """A good config without measuring: enough programs to fill every SM about 4x over (split-K
    while the slices stay >= 2 steps deep); a step loads 16 KB of bf16 weights (256 x 32) or 4 KB
    of packed ternary bytes (64 rows x 64 bytes); accumulators <= 64 registers per thread.
    H100/H200: 132 SMs, ~3.3-4.8 TB/s."""
    if INTERPRET or device.type != "cuda":
        return INTERPRET_GEMV
    block_n = 256 if n >= 4096 else 128 if n >= 1024 else 64
    block_k = 32 if elem_bytes >= 1 else 64  # packed ternary rows are 4x narrower in bytes
    n_tiles = triton.cdiv(n, block_n) * max(m, 1)
    want = 4 * _sm_count(device)
    split = 1
    while n_tiles * split < want and nnz // (split * 2) >= 2 * block_k:
        split *= 2
    return GemvConfig(block_n, block_k, split, num_warps=4 if block_n <= 128 else 8, num_stages=3)


def candidates(base: GemvConfig, nnz: int) -> list[GemvConfig]:
    """The H100/H200 search space around ``base``: tile widths, step depths, split-K, warps."""
    out = {base}
    for block_n in (128, 256, 512):
        for block_k in (16, 32, 64):
            for split in (max(base.split_k // 2, 1), base.split_k, base.split_k * 2):
                if split * block_k > max(nnz, 1) * 2:
                    continue
                for warps in (4, 8):
                    # The GEMVs keep a [block_k, block_n] accumulator in registers: <= 64 per thread.
                    if block_n * block_k // (32 * warps) > 64:
                        continue
                    out.add(GemvConfig(block_n, block_k, split, warps, base.num_stages))
    # Keep the search short: the base config and its nearest neighbours first.
    ranked = sorted(
        out,
        key=lambda c: (
            abs(c.block_n - base.block_n) / base.block_n
            + abs(c.block_k - base.block_k) / base.block_k
            + abs(c.split_k - base.split_k) / base.split_k
            + (c.num_warps != base.num_warps)
        ),
    )
    return ranked[:MAX_CANDIDATES]


_CACHE: dict[tuple, GemvConfig] = {}


def _autotune_enabled() -> bool:
    return os.environ.get(ENV_AUTOTUNE, "1") != "0"


def gemv_config(
    key: tuple,
    device: torch.device,
    m: int,
    n: int,
    nnz: int,
    elem_bytes: float,
    bench: Callable[[GemvConfig], Callable[[], object]] | None,
    tracing: bool,
) -> GemvConfig:
    """The config for one GEMV shape: cached measurement, or the heuristic (see module doc).

    ``bench(cfg)`` returns a zero-argument callable that launches the kernel with ``cfg``.
    """
    if torch.are_deterministic_algorithms_enabled():
        # The tile (and so the float summation order) is a function of the shape alone.
        return heuristic(device, m, n, nnz, elem_bytes)
    hit = _CACHE.get(key)
    if hit is not None:
        return hit
    base = heuristic(device, m, n, nnz, elem_bytes)
    if INTERPRET or device.type != "cuda" or bench is None or tracing or is_capturing() or not _autotune_enabled():
        return base
    best, best_ms = base, float("inf")
    for cfg in candidates(base, nnz):
        try:
            ms = triton.testing.do_bench(bench(cfg), warmup=5, rep=20)
        except Exception:  # a config that does not compile (e.g. out of shared memory) is skipped
            continue
        if ms < best_ms:
            best, best_ms = cfg, ms
    _CACHE[key] = best
    return best


def nnz_bucket(nnz: int) -> int:
    """Kept counts that share a cached config: the next power of two."""
    return triton.next_power_of_2(max(nnz, 1))


def clear_cache() -> None:
    _CACHE.clear()
