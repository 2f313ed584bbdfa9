"""The Triton launchers' kept zero-filled scratch (``_compat.zeroed``) under torch.compile's fake
tracing: a fresh buffer while tracing, the kept real one otherwise, and tracing never replaces or
poisons what eager calls keep. (On the GPU, inductor tracing a ``triton_op`` after an eager call
failed with "Please convert all Tensors to FakeTensors first": the kept real buffer reached the
fake trace.) Pure PyTorch: runs on every machine."""

from __future__ import annotations

import torch
from torch._subclasses.fake_tensor import FakeTensorMode, is_fake

from qsparse_kernels.triton import _compat


def test_eager_calls_share_one_zero_buffer():
    like = torch.empty(3)
    a = _compat.zeroed("test_scratch_eager", 10, torch.int32, like)
    b = _compat.zeroed("test_scratch_eager", 7, torch.int32, like)
    assert a.data_ptr() == b.data_ptr() and a.numel() >= 10 and not a.any()


def test_tracing_gets_a_fresh_fake_buffer_and_keeps_nothing():
    kept = _compat.zeroed("test_scratch_trace", 16, torch.int32, torch.empty(1))
    with FakeTensorMode() as mode:
        like = mode.from_tensor(torch.empty(4))
        traced = _compat.zeroed("test_scratch_trace", 16, torch.int32, like)
        assert is_fake(traced) and traced.shape == (16,) and traced.dtype == torch.int32
        fresh = _compat.zeroed("test_scratch_trace_new", 5, torch.int32, like)  # no kept buffer yet
        assert is_fake(fresh)
    after = _compat.zeroed("test_scratch_trace", 16, torch.int32, torch.empty(1))
    assert after is kept and not is_fake(after)
    assert not is_fake(_compat.zeroed("test_scratch_trace_new", 5, torch.int32, torch.empty(1)))
