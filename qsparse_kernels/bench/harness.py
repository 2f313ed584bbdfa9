"""Timing harness shared by every benchmark (SPEC "How speed is measured").

- Weights rotate among enough copies that their total is >= 4x the last-level cache
  (CPU: >= 128 MB, GPU: >= 256 MB), so DRAM/HBM is measured, not cache.
- Warm-up, then the median of >= 20 repetitions, with p20/p80.
- Bandwidth is reported beside the machine's read bandwidth measured in the same run.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

MIN_ROTATION_BYTES = {"cpu": 128 << 20, "cuda": 256 << 20}


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and the 20th / 80th percentiles."""

    p50: float
    p20: float
    p80: float


def copies_needed(bytes_per_copy: int, device: torch.device) -> int:
    """How many copies of a weight make the rotation exceed the cache (SPEC), at least 2."""
    need = MIN_ROTATION_BYTES.get(device.type, MIN_ROTATION_BYTES["cpu"])
    return max(2, -(-need // max(1, bytes_per_copy)))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _quantile(xs: Sequence[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def time_calls(
    fn: Callable[[int], object], n_variants: int, device: torch.device, reps: int = 30, warmup: int = 5
) -> Timing:
    """Time ``fn(i)`` where ``i`` cycles through ``n_variants`` weight copies; one call per sample."""
    for i in range(warmup):
        fn(i % n_variants)
    _sync(device)
    samples = []
    if device.type == "cuda":
        for i in range(reps):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i % n_variants)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
    else:
        for i in range(reps):
            t0 = time.perf_counter()
            fn(i % n_variants)
            samples.append(time.perf_counter() - t0)
    return Timing(statistics.median(samples), _quantile(samples, 0.2), _quantile(samples, 0.8))


def read_bandwidth(device: torch.device, nbytes: int = 512 << 20, reps: int = 7) -> float:
    """Measured read bandwidth in bytes/s: a reduction over a buffer far larger than the cache.

    ``amax`` (one compare per element; ~8% faster than ``sum`` on the 2-core CPU). It streams one
    sequential range per thread; a GEMV that reads many rows at once keeps more loads in flight
    and can exceed it (the CPU sparse GEMV reaches ~110-120% at some shapes)."""
    buf = torch.ones(nbytes // 4, dtype=torch.float32, device=device)
    t = time_calls(lambda _: buf.amax(), 1, device, reps=reps, warmup=2)
    return nbytes / t.p50
