"""Kernel benchmarks (pytest-benchmark). Each case rotates weight copies like the bench CLI."""

import itertools

import pytest
import torch

import qsparse_kernels as qk
from qsparse_kernels.bench import cases
from qsparse_kernels.bench.__main__ import _backends_for

CPU = torch.device("cpu")


def _bench(benchmark, case, group):
    call, _, read = case
    counter = itertools.count()
    benchmark.group = group
    benchmark.extra_info["weight_bytes_read"] = read
    benchmark.pedantic(lambda: call(next(counter)), rounds=20, warmup_rounds=3, iterations=1)


# M = 64: a prefill-sized batch (on AVX2, sparse_linear's row-sparse GEMM).
@pytest.mark.parametrize("M", [1, 8, 64])
def test_dense(benchmark, shape, M):
    x = torch.randn(M, shape[0], dtype=torch.bfloat16)
    _bench(benchmark, cases.dense(x, shape[1]), f"linear M={M}")


@pytest.mark.parametrize("backend", _backends_for("sparse_linear", CPU, None) or ["reference"])
@pytest.mark.parametrize("sparsity", [0.5, 0.9])
@pytest.mark.parametrize("M", [1, 8, 64])
def test_sparse_linear(benchmark, shape, backend, sparsity, M):
    x = torch.randn(M, shape[0], dtype=torch.bfloat16)
    k = qk.sparsity_to_k(shape[0], sparsity)
    _bench(benchmark, cases.sparse_linear(x, shape[1], k, backend), f"linear M={M}")


@pytest.mark.parametrize("backend", _backends_for("ternary_linear", CPU, None) or ["reference"])
@pytest.mark.parametrize("sparsity", [None, 0.6125])
@pytest.mark.parametrize("M", [1, 8])
def test_ternary_linear(benchmark, shape, backend, sparsity, M):
    x = torch.randn(M, shape[0], dtype=torch.bfloat16)
    k = None if sparsity is None else qk.sparsity_to_k(shape[0], sparsity)
    _bench(benchmark, cases.ternary_linear(x, shape[1], k, backend), f"linear M={M}")


# The selection alone (no weights), 64 rows of the input width, per dtype: the prologue of every
# sparse call. Divide by 64 for the per-row time.
@pytest.mark.parametrize("backend", _backends_for("topk_sparsify", CPU, None) or ["reference"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_topk_sparsify(benchmark, shape, backend, dtype):
    x = torch.randn(64, shape[0], dtype=dtype)
    k = qk.sparsity_to_k(shape[0], 0.5)
    benchmark.group = f"topk_sparsify 64 rows of {shape[0]}"
    benchmark.pedantic(lambda: qk.topk_sparsify(x, k, backend=backend), rounds=20, warmup_rounds=3, iterations=1)


# One decoder layer's attention (TinyLlama heads, bf16), decoding over 144 cached tokens and the
# causal prefill of 128: torch's SDPA in bf16, the inputs cast to float32 for torch's SDPA (the
# library's path before its kernel), and qsparse_kernels.attention.sdpa (csrc/cpu/attention.cpp).
@pytest.mark.parametrize("impl", ["torch", "cast", "ours"])
@pytest.mark.parametrize("T, L", [(1, 144), (128, 128)], ids=["decode", "prefill"])
def test_attention(benchmark, impl, T, L):
    from qsparse_kernels.attention import sdpa

    F = torch.nn.functional
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(1, 32, T, 64, generator=gen).bfloat16()
    k, v = (torch.randn(1, 4, L, 64, generator=gen).bfloat16() for _ in range(2))
    c = T > 1
    fns = {"torch": lambda: F.scaled_dot_product_attention(q, k, v, is_causal=c, enable_gqa=True),
           "cast": lambda: F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=c,
                                                          enable_gqa=True).bfloat16(),
           "ours": lambda: sdpa(q, k, v, is_causal=c, enable_gqa=True)}
    benchmark.group = f"attention, 32 / 4 heads of 64, {T} x {L}{' causal' if c else ''}, bf16"
    with torch.inference_mode():
        benchmark.pedantic(fns[impl], rounds=20 if T == 1 else 10, warmup_rounds=3, iterations=1)


# HF's LlamaRMSNorm against qsparse_kernels.nn.RMSNorm (one kernel call), one decode row of 2048, bf16.
@pytest.mark.parametrize("impl", ["hf", "ours"])
def test_rms_norm_decode(benchmark, impl):
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    from qsparse_kernels.nn import RMSNorm

    norm = LlamaRMSNorm(2048, eps=1e-5).bfloat16()
    mod = norm if impl == "hf" else RMSNorm.from_module(norm)
    x = torch.randn(1, 1, 2048, generator=torch.Generator().manual_seed(0)).bfloat16()
    benchmark.group = "RMSNorm, 1 x 2048, bf16"
    with torch.inference_mode():
        benchmark.pedantic(lambda: mod(x), rounds=20, warmup_rounds=3, iterations=100)
