"""Machine code of the Triton kernels, checked without a GPU: the fused GEMVs compiled ahead of
time by Triton's own compiler for sm_80 and sm_90 at the benchmark shapes (4096 -> 14336,
2048 -> 5632; M = 1 and 16; bf16), for the config the shape gets without measuring and, with
``QSPARSE_AOT=full``, every config the autotuner may try there. Asserted: no spills (no local
memory) and 16-byte loads of every weight stream (the fp32/bf16 weights, the packed ternary
bytes), no scalar byte loads. The kernel code does not depend on M or on the shape beyond the
divisibility by 16 of its sizes, so identical compiles are done once.
"""

from __future__ import annotations

import os

import pytest
import torch

triton = pytest.importorskip("triton")
from qsparse_kernels.triton import autotune, quantize, select  # noqa: E402
from qsparse_kernels.triton.sparse_gemv import _sparse_gemv_kernel  # noqa: E402
from qsparse_kernels.triton.ternary_gemv import _ternary_gemv_kernel  # noqa: E402
from tests.triton_aot import Ptr, compile_kernel, global_loads, resources  # noqa: E402

SHAPES = ((4096, 14336), (2048, 5632))
BATCHES = (1, 16)
ARCHS = (80, 90)
H200_SMS = 132


def _configs(elem_bytes: float) -> list[autotune.GemvConfig]:
    dev = torch.device("cuda")  # only read by the heuristic: no GPU is touched
    out = []
    sm_count, autotune._sm_count = autotune._sm_count, lambda device: H200_SMS
    try:
        for d, n in SHAPES:
            for m in BATCHES:
                base = autotune.heuristic(dev, m, n, d, elem_bytes)
                out += autotune.candidates(base, d) if os.environ.get("QSPARSE_AOT") == "full" else [base]
    finally:
        autotune._sm_count = sm_count
    # One compile per distinct kernel: tile, warps, stages and whether split-K runs.
    return list({(c.block_n, c.block_k, c.num_warps, c.num_stages, c.split_k > 1): c for c in out}.values())


def _sparse_args(d, n, cfg):
    return dict(
        x_ptr=Ptr(torch.bfloat16), stride_xm=d, stride_xd=1, w_ptr=Ptr(torch.bfloat16), stride_wn=1, stride_wi=n,
        b_ptr=Ptr(torch.bfloat16), out_ptr=Ptr(torch.bfloat16), stride_om=n, part_ptr=Ptr(torch.float32),
        cnt_ptr=Ptr(torch.int32), N=n, d=d, k=d // 2, per_split=d // max(cfg.split_k, 1), split_k=cfg.split_k,
        HAS_BIAS=False, SPLIT=cfg.split_k > 1, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        D_BLOCK=select.prologue_block(d, cfg.num_warps), KEY_LOW=16, NBITS=15, RADIX=2,
    )  # fmt: skip


def _ternary_args(d, n, cfg):
    return dict(
        x_ptr=Ptr(torch.bfloat16), stride_xm=d, stride_xd=1, p_ptr=Ptr(torch.uint8), stride_pi=n // 4, stride_pc=1,
        xs_ptr=Ptr(torch.float32), scale_ptr=Ptr(torch.float32), b_ptr=Ptr(torch.bfloat16),
        out_ptr=Ptr(torch.bfloat16), stride_om=n, acc_ptr=Ptr(torch.int32), cnt_ptr=Ptr(torch.int32),
        N=n, C=n // 4, d=d, k=d // 2, per_split=d // max(cfg.split_k, 1), split_k=cfg.split_k,
        SELECT=True, HAS_BIAS=False, SPLIT=cfg.split_k > 1, ACC_ONLY=False, BLOCK_C=cfg.block_n // 4,
        BLOCK_K=cfg.block_k, D_BLOCK=select.prologue_block(d, cfg.num_warps), KEY_LOW=16, NBITS=15, RADIX=2,
        KEY_MIN=quantize.KEY_MIN_ABSMAX,
    )  # fmt: skip


CASES = [
    pytest.param(kernel, args, cfg, cc, id=f"{name}-sm{cc}-bn{cfg.block_n}-bk{cfg.block_k}-w{cfg.num_warps}"
                 f"-split{int(cfg.split_k > 1)}")
    for cc in ARCHS
    for name, kernel, args, eb in (("sparse", _sparse_gemv_kernel, _sparse_args, 2),
                                   ("ternary", _ternary_gemv_kernel, _ternary_args, 0.25))
    for cfg in _configs(eb)
]  # fmt: skip


@pytest.mark.parametrize("kernel,args,cfg,cc", CASES)
def test_no_spills_and_16_byte_weight_loads(kernel, args, cfg, cc):
    d, n = SHAPES[0]
    compiled = compile_kernel(kernel, args(d, n, cfg), cc, cfg.num_warps, cfg.num_stages)
    regs, local = resources(compiled)
    loads = global_loads(compiled.asm["ptx"])
    print(f"sm_{cc} {kernel.__name__} {cfg}: {regs} registers, {local} B local, loads by width {loads}")
    assert local == 0, f"{regs} registers and {local} bytes of local memory (spills)"
    assert loads.get(16, 0) >= 1, loads  # the weight tile: one 16-byte load per thread and step
    assert loads.get(1, 0) == 0, loads  # no scalar byte loads (the packed ternary weight)
