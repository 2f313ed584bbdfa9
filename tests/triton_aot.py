"""Ahead-of-time compilation of the Triton kernels for NVIDIA targets, without a GPU.

:func:`compile_kernel` builds one kernel as ``kernel[grid](**args)`` would on a GPU of compute
capability ``cc``, with the launcher's specialisations done by hand: a pointer is 16-byte aligned
(every torch allocation is), an int equal to 1 becomes the constant 1, an int divisible by 16 gets
``tt.divisibility = 16`` (except the ``do_not_specialize`` ones). :func:`resources` reads registers
and spills from the cubin (``cuobjdump -res-usage``: ``LOCAL`` is the per-thread stack, which holds
the spills), :func:`global_loads` counts the PTX ``ld.global`` instructions by width.
"""

from __future__ import annotations

import os
import re
import subprocess
from dataclasses import dataclass

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

TL_TYPES = {
    torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16",
    torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.int64: "i64",
}  # fmt: skip


@dataclass(frozen=True)
class Ptr:
    """A tensor argument: its element type (the data pointer is 16-byte aligned)."""

    dtype: torch.dtype


def _jit(fn):
    return getattr(fn, "fn", fn) if not hasattr(fn, "arg_names") else fn


def compile_kernel(fn, args: dict, cc: int, num_warps: int, num_stages: int):
    """``fn`` compiled for ``sm_<cc>``; ``args`` maps every parameter name to a :class:`Ptr`, an
    int (runtime argument) or a constexpr value."""
    fn = _jit(fn)
    signature, constexprs, attrs = {}, {}, {}
    no_spec = {fn.arg_names[p.num] for p in fn.params if p.do_not_specialize}
    for i, p in enumerate(fn.params):
        name = p.name
        v = args[name]
        if p.is_constexpr:
            signature[name] = "constexpr"
            constexprs[name] = v
        elif isinstance(v, Ptr):
            signature[name] = "*" + TL_TYPES[v.dtype]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{name}: {v!r}")
        elif v == 1 and name not in no_spec:
            signature[name] = "constexpr"
            constexprs[name] = 1
        else:
            signature[name] = "i64" if abs(v) >= 2**31 else "i32"
            if v % 16 == 0 and name not in no_spec:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn, signature, constexprs, attrs)
    target = GPUTarget("cuda", cc, 32)
    return triton.compile(src, target=target, options={"num_warps": num_warps, "num_stages": num_stages})


def _tool(name: str) -> str:
    return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)


def resources(kernel) -> tuple[int, int]:
    """``(registers per thread, local memory bytes per thread)`` of the compiled cubin."""
    import tempfile

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(kernel.asm["cubin"])
        f.flush()
        out = subprocess.run([_tool("cuobjdump"), "-res-usage", f.name], capture_output=True, text=True, check=True)
    regs = int(re.search(r"REG:(\d+)", out.stdout).group(1))
    local = int(re.search(r"LOCAL:(\d+)", out.stdout).group(1))
    return regs, local


_LD = re.compile(r"\bld\.global(?:\.[a-z0-9_:]+)*?\.(v[248]\.)?([bsuf](?:8|16|32|64|128))\b")


def global_loads(ptx: str) -> dict[int, int]:
    """PTX ``ld.global`` instructions by bytes per load (per thread): ``{16: 2, 1: 80, ...}``."""
    out: dict[int, int] = {}
    for vec, ty in _LD.findall(ptx):
        width = (int(vec[1]) if vec else 1) * int(ty[1:]) // 8
        out[width] = out.get(width, 0) + 1
    return out
