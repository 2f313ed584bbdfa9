"""The benchmark harness keeps its promises: DRAM-sized rotations, disjoint kept sets at batch 1,
wide points measured again and flagged, cache flushing that touches nothing else."""

import itertools

import pytest
import torch

from qsparse_kernels import _native
from qsparse_kernels.bench import cases, harness


def test_dram_bytes_from_the_last_level_cache(monkeypatch):
    assert harness.llc_bytes("cpu") > 0
    assert harness.dram_bytes("cpu") >= max(4 * harness.llc_bytes("cpu"), 1 << 30)
    monkeypatch.setattr(harness, "_cpu_llc_bytes", lambda: 480 << 20)  # a machine reporting a 480 MiB L3
    assert harness.dram_bytes("cpu") == 4 * (480 << 20)
    monkeypatch.setattr(harness, "_cpu_llc_bytes", lambda: 8 << 20)
    assert harness.dram_bytes("cpu") == 1 << 30  # never less than 1 GiB on a CPU


@pytest.mark.parametrize("d,k", [(64, 1), (64, 7), (63, 31), (100, 50)])
def test_batch1_activations_keep_disjoint_parts(d, k):
    x = torch.randn(1, d, dtype=torch.bfloat16)
    acts, parts = cases.activations(x, k)
    assert parts and len(acts) == d // k
    kept = [set(a[0].float().abs().topk(k).indices.tolist()) for a in acts]
    for a, s in zip(acts, kept, strict=True):
        # exactly the part: its k magnitudes are strictly above every other entry
        mags = a[0].float().abs()
        assert mags[list(s)].min() > mags[[i for i in range(d) if i not in s]].max()
    for s, t in itertools.combinations(kept, 2):
        assert not s & t


@pytest.mark.parametrize("M,k", [(1, None), (1, 0), (4, 3), (1, 64)])
def test_other_points_use_random_activations(M, k):
    acts, parts = cases.activations(torch.randn(M, 64), k)
    assert not parts and len(acts) == cases.N_ACTIVATIONS


def test_rotation_reads_dram_bytes_between_repeats(monkeypatch):
    """A row read by call i is read again only after >= dram_bytes of other weight bytes."""
    monkeypatch.setattr(cases, "dram_bytes", lambda device: 8 << 20)  # small, for the test
    cases._pool.clear()
    x = torch.randn(1, 256, dtype=torch.bfloat16)
    case = cases.ternary_linear(x, 512, 32, "reference")
    n, nx = case.n, 256 // 32
    assert not case.evict
    assert n * nx * case.read >= 8 << 20  # one rotation: every copy read once per part
    assert case.read == 32 * 128  # k rows of ceil(512 / 4) bytes
    cases._pool.clear()


def test_wide_points_are_measured_again_and_flagged():
    times = itertools.cycle([0.0, 0.004])  # alternate fast and slow calls: p80 / p20 >> 1.25

    def fn(i):
        import time

        time.sleep(next(times))

    t = harness.time_calls(fn, 1, torch.device("cpu"), reps=20, warmup=1)
    assert t.attempts == harness.MAX_ATTEMPTS and t.wide
    steady = harness.time_calls(lambda i: sum(range(2000)), 1, torch.device("cpu"), reps=20, warmup=1)
    assert steady.p20 <= steady.p50 <= steady.p80


def test_flush_cache_leaves_values_alone():
    t = torch.randn(1000)
    before = t.clone()
    _native._C.flush_cache(t)
    _native._C.flush_cache(t[3:])  # a view: its whole storage
    _native._C.flush_cache(torch.empty(0))
    assert torch.equal(t, before)
    with pytest.raises(RuntimeError, match="CPU tensor"):
        _native._C.flush_cache(torch.empty(4, device="meta"))


def test_round_order_rotates_so_no_variant_always_follows_the_same_one():
    names = ["dense", "a", "b", "c"]
    orders = [harness.round_order(names, r) for r in range(8)]
    for o in orders:
        assert sorted(o) == sorted(names)  # every variant once per round
    # over len(names) rounds every variant runs in every position, and right after dense's
    # fixed neighbour changes
    assert {o[0] for o in orders[:4]} == set(names)
    after_first = {o[1] for o in orders[:4]}
    assert len(after_first) == 4
    assert orders[4] == orders[0]
    assert harness.round_order({"x": 1, "y": 2}, 1) == ["y", "x"]  # a dict gives its keys
    assert harness.round_order([], 3) == []


def test_interleaved_bursts_times_every_entry_each_round():
    """One time per round and entry (the warm-up round not kept), each burst of `calls` calls."""
    counts = {"a": 0, "b": 0}

    def bump(name):
        counts[name] += 1

    per = harness.interleaved_bursts({"a": lambda: bump("a"), "b": lambda: bump("b")}, rounds=3, calls=5)
    assert counts == {"a": 20, "b": 20}  # (3 + 1 warm-up) rounds x 5 calls
    assert {k: len(v) for k, v in per.items()} == {"a": 3, "b": 3}
    assert all(t > 0 for ts in per.values() for t in ts)
