"""Concurrency and determinism of every op on the backends runnable here.

- 8 Python threads calling the same ops at once get results identical to serial calls (the
  kernels hold no global mutable state).
- Outputs are bit-identical across repeated calls and across 1 and 2 intra-op threads.
"""

import threading

import pytest
import torch

import qsparse_kernels as qk
from qsparse_kernels import reference as R
from tests.conftest import cpu_backends


def _calls(backend: str):
    """A list of zero-argument callables covering every op, with fixed inputs."""
    g = torch.Generator().manual_seed(7)
    d, out_f = 515, 257
    x = torch.randn(5, d, generator=g).to(torch.bfloat16)
    x32 = torch.randn(3, d, generator=g)
    w = qk.to_fast_layout(torch.randn(out_f, d, generator=g).to(torch.bfloat16))
    w_rm = torch.randn(out_f, d, generator=g)
    b = torch.randn(out_f, generator=g).to(torch.bfloat16)
    t = torch.randint(-1, 2, (out_f, d), generator=g, dtype=torch.int8)
    packed, scale = R.pack_ternary(t), torch.tensor(0.031)
    return [
        lambda: qk.topk_sparsify(x, 200, backend=backend),
        lambda: qk.block_topk_sparsify(x32[:, :512], 3, 8, backend=backend),
        lambda: qk.sparse_linear(x, w, 250, b, backend=backend),
        lambda: qk.sparse_linear(x[:1], w, 100, backend=backend),
        lambda: qk.sparse_linear(x32, w_rm, 300, backend=backend),
        lambda: qk.quantize_act_int8(x, backend=backend)[0],
        lambda: qk.ternary_linear(x, packed, scale, out_f, backend=backend),
        lambda: qk.ternary_linear(x32, packed, scale, out_f, 200, backend=backend),
    ]


def _equal(a, b):
    return torch.equal(a.view(torch.uint8) if a.is_floating_point() else a,
                       b.view(torch.uint8) if b.is_floating_point() else b)


@pytest.mark.parametrize("backend", cpu_backends())
def test_eight_threads_match_serial(backend):
    calls = _calls(backend)
    serial = [c() for c in calls]
    results, errors = {}, []

    def worker(tid):
        try:
            for rep in range(3):
                for i, c in enumerate(calls):
                    results[(tid, rep, i)] = c()
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    for (tid, rep, i), y in results.items():
        assert _equal(y, serial[i]), f"thread {tid}, rep {rep}, call {i} differs from the serial result"


@pytest.mark.parametrize("backend", cpu_backends())
def test_bit_identical_across_calls_and_thread_counts(backend):
    calls = _calls(backend)
    old = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = [c() for c in calls]
        torch.set_num_threads(2)
        two = [c() for c in calls]
        again = [c() for c in calls]
    finally:
        torch.set_num_threads(old)
    for i, (a, b, c) in enumerate(zip(one, two, again, strict=True)):
        assert _equal(a, b), f"call {i}: 1 vs 2 threads differ"
        assert _equal(b, c), f"call {i}: repeated calls differ"
