"""Timing harness shared by every benchmark (SPEC "How speed is measured").

- DRAM, not cache: weights rotate among enough copies that the bytes read over one rotation are
  >= 4x the last-level cache *of this machine* (read at run time, :func:`llc_bytes`), and never
  less than 1 GiB on a CPU (GPU: >= 4x L2 and >= 256 MB): :func:`dram_bytes`. Where the copies
  that would take exceed what a benchmark may hold, the harness also evicts the weights of the
  next call from every cache level before it (:func:`flush`, untimed), so the call still reads
  them from DRAM; only a run that does neither is labelled ``cache-resident``.
- Warm-up, then the median of >= 20 repetitions, with p20/p80; a point whose spread is wide
  (p80 / p20 > :data:`WIDE_SPREAD`) is measured again, a bounded number of times, and flagged
  if it stays wide.
- Bandwidth is reported beside the machine's read bandwidth measured in the same run.
"""

from __future__ import annotations

import glob
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

GIB = 1 << 30
# SPEC: the rotation is >= 4x the last-level cache, and at least this much per device type.
MIN_DRAM_BYTES = {"cpu": GIB, "cuda": 256 << 20}
LLC_FACTOR = 4
WIDE_SPREAD = 1.25  # p80 / p20 above this: the point is measured again
MAX_ATTEMPTS = 3  # measurements of one point at most (the first + 2 repeats)


@dataclass(frozen=True)
class Timing:
    """Seconds per call: median and the 20th / 80th percentiles, and how the point was measured.

    ``attempts``: how many times the point was measured (repeats happen when the spread was wide;
    the measurement with the narrowest spread is kept); ``wide``: still wider than
    :data:`WIDE_SPREAD` after the last attempt."""

    p50: float
    p20: float
    p80: float
    attempts: int = 1
    wide: bool = False

    @property
    def spread(self) -> float:
        return self.p80 / self.p20 if self.p20 > 0 else float("inf")


def _cpu_llc_bytes() -> int | None:
    """The largest cache of cpu0 from sysfs (the last-level cache), in bytes."""
    best = None
    for idx in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*"):
        try:
            with open(os.path.join(idx, "size")) as f:
                txt = f.read().strip()
            with open(os.path.join(idx, "type")) as f:
                if f.read().strip() == "Instruction":
                    continue
        except OSError:
            continue
        mult = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(txt[-1:].upper(), 1)
        num = txt[:-1] if txt[-1:].isalpha() else txt
        if num.isdigit():
            best = max(best or 0, int(num) * mult)
    return best


def llc_bytes(device: torch.device | str = "cpu") -> int:
    """The last-level cache of ``device``: the CPU's L3 (sysfs) or the GPU's L2, in bytes.

    Falls back to 32 MiB on a CPU whose sysfs says nothing (a guess, large for a 2-core VM)."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).L2_cache_size)
    return _cpu_llc_bytes() or (32 << 20)


def dram_bytes(device: torch.device | str = "cpu") -> int:
    """Bytes that must be read between two uses of the same weight bytes so they come from DRAM."""
    device = torch.device(device)
    return max(LLC_FACTOR * llc_bytes(device), MIN_DRAM_BYTES.get(device.type, MIN_DRAM_BYTES["cpu"]))


def copies_needed(bytes_per_copy: int, device: torch.device, rotate_bytes: int | None = None) -> int:
    """How many copies of a weight make one rotation read ``rotate_bytes`` (default
    :func:`dram_bytes`), at least 2."""
    total = dram_bytes(device) if rotate_bytes is None else rotate_bytes
    return max(2, -(-total // max(1, bytes_per_copy)))


def flush(tensors: Sequence[torch.Tensor]) -> None:
    """Evicts ``tensors`` from the caches, so the next call reads them from DRAM / HBM.

    CPU: ``clflush`` of every line of their storage (the native ``flush_cache``), which leaves the
    code, the interpreter's state and the activations warm, as in a real decode step. GPU (or no
    native module): streams a :func:`dram_bytes` buffer through the caches instead."""
    if not tensors:
        return
    device = tensors[0].device
    if device.type == "cpu":
        from .. import _native

        if _native.loaded() and hasattr(_native._C, "flush_cache"):
            for t in tensors:
                _native._C.flush_cache(t)
            return
    key = str(device)
    buf = _EVICT_BUFFERS.get(key)
    if buf is None:
        buf = _EVICT_BUFFERS[key] = torch.ones(dram_bytes(device) // 4, device=device)
    buf.amax()
    _sync(device)


_EVICT_BUFFERS: dict[str, torch.Tensor] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def quantile(xs: Sequence[float], q: float) -> float:
    """The ``q`` quantile of ``xs`` (nearest rank)."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def round_order(items: Sequence, r: int) -> list:
    """The order in which interleaved round ``r`` calls ``items``: rotated by ``r``.

    A fixed order makes each variant always follow the same neighbour, and the call that follows a
    heavy one can be slow for reasons of its own: on a 2-core Sapphire Rapids, whichever ternary
    case ran right after torch's AMX bf16 GEMM took ~1.6x the time of the same call later in the
    round (2026-12-03, both case orders tried). Rotating spreads that over every variant."""
    items = list(items)
    if not items:
        return items
    r %= len(items)
    return items[r:] + items[:r]


def interleaved_bursts(fns: dict[str, Callable[[], object]], rounds: int, calls: int) -> dict[str, list[float]]:
    """us per call of each ``fns`` entry: bursts of ``calls`` calls timed as a whole, the entries
    interleaved (:func:`round_order`) over ``rounds`` rounds after a warm-up round; one time per
    round. For calls short enough that one timer read would be noise (CPU, synchronous)."""
    per = {name: [] for name in fns}
    for r in range(rounds + 1):  # round 0 warms up
        for name in round_order(fns, r):
            fn = fns[name]
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            if r:
                per[name].append((time.perf_counter() - t0) / calls * 1e6)
    return per


def _samples(fn, n_variants, device, reps, warmup, before) -> list[float]:
    for i in range(warmup):
        if before:
            before(i % n_variants)
        fn(i % n_variants)
    _sync(device)
    samples = []
    for i in range(reps):
        if before:
            before(i % n_variants)
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn(i % n_variants)
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn(i % n_variants)
            samples.append(time.perf_counter() - t0)
    return samples


def time_calls(
    fn: Callable[[int], object],
    n_variants: int,
    device: torch.device,
    reps: int = 30,
    warmup: int = 5,
    before: Callable[[int], None] | None = None,
    attempts: int = MAX_ATTEMPTS,
) -> Timing:
    """Time ``fn(i)`` where ``i`` cycles through ``n_variants`` weight copies; one call per sample.

    ``before(i)`` runs untimed before every call ``fn(i)`` (e.g. :func:`flush` of its weights). A measurement whose
    p80 / p20 exceeds :data:`WIDE_SPREAD` is repeated, ``attempts`` measurements at most, and the
    one with the narrowest spread is returned (with ``wide`` set if even that one is wide)."""
    best = None
    for attempt in range(1, max(1, attempts) + 1):
        s = _samples(fn, n_variants, device, reps, warmup if attempt == 1 else 1, before)
        t = Timing(statistics.median(s), quantile(s, 0.2), quantile(s, 0.8), attempt)
        if best is None or t.spread < best.spread:
            best = t
        if t.spread <= WIDE_SPREAD:
            break
    return Timing(best.p50, best.p20, best.p80, attempt, best.spread > WIDE_SPREAD)


def read_bandwidth(device: torch.device, reps: int = 7) -> float:
    """Measured read bandwidth in bytes/s: ``amax`` over a :func:`dram_bytes` buffer (so it comes
    from DRAM, not the last-level cache), median of ``reps``.

    ``amax`` is one compare per element and streams one sequential range per thread. It is a
    reference, not a hard bound: a GEMV that keeps more independent loads in flight can exceed it
    by some percent."""
    buf = torch.ones(dram_bytes(device) // 4, dtype=torch.float32, device=device)
    t = time_calls(lambda _: buf.amax(), 1, device, reps=reps, warmup=2, attempts=1)
    return buf.numel() * 4 / t.p50


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``), or the platform's processor string."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_summary(device: torch.device) -> dict:
    """What a result was measured on: device name, ISA path, threads, last-level cache."""
    device = torch.device(device)
    if device.type == "cuda":
        name, isa = torch.cuda.get_device_name(device), "cuda sm_{}{}".format(*torch.cuda.get_device_capability(device))
    else:
        name = cpu_model()
        try:
            from .. import _native

            isa = _native._C.cpu_isa() if _native.loaded() and hasattr(_native._C, "cpu_isa") else "n/a"
        except Exception:  # noqa: BLE001 - informational only
            isa = "n/a"
    return {"device": name, "isa": isa, "threads": torch.get_num_threads(), "llc_mib": llc_bytes(device) / (1 << 20)}
