"""Machine code of ``csrc/cuda`` without a GPU: every kernel compiled by ptxas for sm_80 and sm_90
(``nvcc -fatbin -Xptxas -v``, device code only) spills nothing to local memory.

The sources are compiled as C++17, the standard torch <= 2.11 builds extensions with, where the
installed torch's headers allow it; torch >= 2.12's headers need C++20 (ATen.h says so), and then
C++20 is used.

Each .cu file is one nvcc job (both architectures in it), the jobs run side by side; ~1 minute on
2 cores. Skipped only when nvcc is missing. ``python -m tests.test_cuda_ptxas`` prints the table
of registers / spills / shared memory per kernel and architecture (exit status 1 if any spills);
with QSPARSE_PTXAS_ROOT=<another checkout> it reads that checkout's csrc instead.
"""

from __future__ import annotations

import glob
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from functools import cache

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ARCHS = ("80", "90")
# QSPARSE_PTXAS_ROOT: another checkout's csrc (to compare a change with what it replaces).
SRC_ROOT = os.environ.get("QSPARSE_PTXAS_ROOT", ROOT)
SOURCES = sorted(glob.glob(os.path.join(SRC_ROOT, "csrc", "cuda", "*.cu")))
NVCC = shutil.which("nvcc")

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for 'sm_(\d+)'")
_SPILL = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")


def cxx_std() -> str:
    """``c++17`` unless the installed torch's headers require C++20."""
    from torch.utils import cpp_extension

    for d in cpp_extension.include_paths(device_type="cuda"):
        aten = os.path.join(d, "ATen", "ATen.h")
        if os.path.exists(aten):
            with open(aten) as f:
                return "c++20" if "C++20 or later" in f.read() else "c++17"
    return "c++17"


def _includes() -> list[str]:
    from torch.utils import cpp_extension

    dirs = cpp_extension.include_paths(device_type="cuda") + [os.path.join(SRC_ROOT, "csrc", "include")]
    try:
        import nvidia

        for base in nvidia.__path__:
            dirs += glob.glob(os.path.join(base, "*", "include"))
    except ImportError:
        pass
    return [f"-I{d}" for d in dirs]


def _demangle(names: list[str]) -> list[str]:
    tool = shutil.which("c++filt")
    if not tool:
        return names
    out = subprocess.run([tool], input="\n".join(names), capture_output=True, text=True, check=False).stdout
    got = out.splitlines()
    return got if len(got) == len(names) else names


def parse_ptxas(text: str) -> list[dict]:
    """Rows ``{kernel, arch, registers, stack, spill_stores, spill_loads, smem}`` from ``ptxas -v``."""
    rows, cur = [], None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            cur = {"kernel": m.group(1), "arch": m.group(2)}
            rows.append(cur)
        elif cur is not None and (m := _SPILL.search(line)):
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif cur is not None and (m := _USED.search(line)):
            smem = _SMEM.search(line)
            cur.update(registers=int(m.group(1)), smem=int(smem.group(1)) if smem else 0)
    for r, name in zip(rows, _demangle([r["kernel"] for r in rows]), strict=True):
        r["kernel"] = name
    return rows


def _compile(src: str) -> str:
    gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in ARCHS]
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [NVCC, "-fatbin", f"-std={cxx_std()}", "-O3", "--expt-relaxed-constexpr", "-Xptxas=-v", *gencode,
               "-DTORCH_EXTENSION_NAME=qsk_ptxas", *_includes(), src, "-o", os.path.join(tmp, "k.fatbin")]
        p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        raise RuntimeError(f"nvcc failed on {os.path.relpath(src, SRC_ROOT)}:\n{p.stderr[-4000:]}")
    return p.stderr + p.stdout


@cache
def resource_usage() -> tuple[tuple[str, dict], ...]:
    """``(source file, row)`` for every kernel entry of every .cu file and architecture."""
    with ThreadPoolExecutor(max_workers=max(1, min(len(SOURCES), os.cpu_count() or 1))) as pool:
        logs = list(pool.map(_compile, SOURCES))
    return tuple((os.path.basename(src), r) for src, log in zip(SOURCES, logs, strict=True) for r in parse_ptxas(log))


def table() -> str:
    """A Markdown table of the resource usage, one line per kernel and architecture."""
    lines = ["| file | kernel | sm | registers | spill stores / loads (bytes) | stack | smem |", "|---" * 7 + "|"]
    for src, r in resource_usage():
        name = r["kernel"].replace("qsk::cuda::(anonymous namespace)::", "")
        lines.append(f"| {src} | `{name}` | {r['arch']} | {r.get('registers')} | {r.get('spill_stores')} / "
                     f"{r.get('spill_loads')} | {r.get('stack')} | {r.get('smem')} |")
    return "\n".join(lines)


needs_nvcc = pytest.mark.skipif(NVCC is None, reason="needs nvcc (the CUDA toolkit) on PATH")


def test_parse_ptxas():
    log = """ptxas info    : Compiling entry function '_Z3fooPf' for 'sm_90'
ptxas info    : Function properties for _Z3fooPf
    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads
ptxas info    : Used 40 registers, used 1 barriers, 2048 bytes smem, 400 bytes cmem[0]"""
    (r,) = parse_ptxas(log)
    assert r["arch"] == "90" and r["registers"] == 40 and r["smem"] == 2048
    assert (r["stack"], r["spill_stores"], r["spill_loads"]) == (8, 4, 12)


@needs_nvcc
def test_every_kernel_compiled_for_both_archs():
    rows = resource_usage()
    for src in map(os.path.basename, SOURCES):
        archs = {r["arch"] for s, r in rows if s == src}
        assert archs == set(ARCHS), (src, archs)
    assert all("registers" in r and "spill_stores" in r for _, r in rows), rows


@needs_nvcc
def test_no_spills():
    spills = [(s, r) for s, r in resource_usage() if r["spill_stores"] or r["spill_loads"]]
    assert not spills, "kernels that spill:\n" + "\n".join(f"{s}: {r}" for s, r in spills)


if __name__ == "__main__":
    if NVCC is None:
        sys.exit("nvcc not found")
    print(f"-std={cxx_std()}")
    print(table())
    sys.exit(1 if any(r["spill_stores"] or r["spill_loads"] for _, r in resource_usage()) else 0)
