"""Builds ``tests/cuda_emu``: the csrc/cuda kernels compiled for the host under the SIMT emulator
(``simt_emulator.h``), registered as ``torch.ops.qsparse_cuda_emu.*`` for CPU tensors.

The build is torch's JIT extension build (ninja, ~1 min on 2 cores, then cached in
``build/cuda_emu``). Under ``make sanitize`` (QSPARSE_SANITIZE_FLAGS set) it is built with the
same ASan/UBSan flags as the CPU kernels, in ``build/cuda_emu-sanitize``.
"""

from __future__ import annotations

import functools
import os

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
SOURCES = ("module.cpp", "quantize_act.cpp", "sparse_linear.cpp", "ternary_linear.cpp")


@functools.cache
def load():
    """Builds (or reuses) and imports the emulated kernels; returns the module (``set_sm_count``)."""
    from torch.utils import cpp_extension

    san = os.environ.get("QSPARSE_SANITIZE_FLAGS", "").split()
    build_dir = os.path.join(ROOT, "build", "cuda_emu-sanitize" if san else "cuda_emu")
    os.makedirs(build_dir, exist_ok=True)
    # Device code's float semantics: no contraction into FMA, type punning as CUDA allows it.
    flags = ["-O2", "-DQSK_CUDA_EMULATION", "-ffp-contract=off", "-fno-strict-aliasing", "-pthread", *san]
    return cpp_extension.load(
        name="qsk_cuda_emu" + ("_sanitize" if san else ""),
        sources=[os.path.join(HERE, s) for s in SOURCES],
        extra_cflags=flags,
        extra_ldflags=["-pthread", *san],
        extra_include_paths=[os.path.join(ROOT, "csrc", "include"), HERE],
        build_directory=build_dir,
        verbose=False,
    )
