"""Builds ``qsparse_kernels._C``: the C++ CPU kernels always, the CUDA kernels when possible.

Environment:
  QSPARSE_BUILD_CUDA   unset (what `pip install .` does): the CUDA kernels are built only when a
                       CUDA device is visible and nvcc and a CUDA build of torch are there, so a
                       CPU-only machine compiles the CPU kernels alone. "1" forces the CUDA build
                       (an error without nvcc or with a CPU build of torch: a GPU image built on a
                       machine without a GPU), "0" skips it, "toolkit" builds it whenever nvcc and
                       a CUDA build of torch are there (`make` / scripts/setup_env.sh use this, so
                       CI compiles and links the CUDA kernels without a GPU).
  QSPARSE_CUDA_ARCHS   semicolon list of compute capabilities, default "80;90"; PTX is embedded
                       for the last one so newer GPUs can JIT it.
  MAX_JOBS             parallel compile jobs (torch's ninja build honours it; without ninja,
                       scripts/parallel_compile.py compiles that many sources at once).
  QSPARSE_SANITIZE_FLAGS  sanitizer flags added to the C++ compile and link (scripts/sanitize.sh
                       sets ASan + UBSan; tests/cuda_emu builds with the same ones).
The CPU code is compiled for baseline x86-64; the AVX2 / AVX-512 kernels carry their own target
attributes and are picked at run time (csrc/cpu/isa.cpp), so no -march=native ever ships.
"""

import glob
import os
import sys

import torch
from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension, is_ninja_available

ROOT = os.path.dirname(os.path.abspath(__file__))


CUDA_CHOICES = ("", "0", "1", "toolkit")


def _want_cuda() -> bool:
    """Whether to build the CUDA kernels (see QSPARSE_BUILD_CUDA in the module docstring)."""
    flag = os.environ.get("QSPARSE_BUILD_CUDA", "").strip()
    if flag not in CUDA_CHOICES:
        raise ValueError(f"QSPARSE_BUILD_CUDA must be one of {CUDA_CHOICES[1:]} or unset, got {flag!r}")
    toolkit = torch.version.cuda is not None and CUDA_HOME is not None
    if flag == "0":
        return False
    if flag == "1":
        if not toolkit:
            raise RuntimeError(
                "QSPARSE_BUILD_CUDA=1 needs nvcc (CUDA_HOME) and a CUDA build of torch; found "
                f"CUDA_HOME={CUDA_HOME!r}, torch.version.cuda={torch.version.cuda!r}"
            )
        return True
    if flag == "toolkit":
        return toolkit
    if not torch.cuda.is_available():
        print("[qsparse_kernels] no CUDA device visible, CPU kernels only (QSPARSE_BUILD_CUDA=1 builds CUDA too)")
        return False
    if not toolkit:
        print("[qsparse_kernels] a CUDA device is visible, but nvcc or a CUDA build of torch is missing: CPU only")
    return toolkit


def _gencode(archs: str) -> list[str]:
    caps = [a.strip().replace(".", "") for a in archs.split(";") if a.strip()]
    flags = [f"-gencode=arch=compute_{c},code=sm_{c}" for c in caps]
    return flags + [f"-gencode=arch=compute_{caps[-1]},code=compute_{caps[-1]}"]


def _nvidia_wheel_includes() -> list[str]:
    """cuBLAS / cuSPARSE headers that torch's CUDA headers include: shipped in the nvidia-* wheels
    that a CUDA build of torch installs (the nvcc toolkit alone may not have them)."""
    try:
        import nvidia
    except ImportError:
        return []
    found = []
    for base in nvidia.__path__:
        found += glob.glob(os.path.join(base, "*", "include"))
    has = lambda d, pat: bool(glob.glob(os.path.join(d, pat)))  # noqa: E731
    return sorted(d for d in found if has(d, "cusparse*.h") or has(d, "cublas*.h"))


def _cudart_library_dirs() -> list[str]:
    """Where libcudart.so lives: CUDA_HOME may be a prefix like /usr/local whose lib has no CUDA."""
    cands = [os.path.join(CUDA_HOME or "", sub) for sub in ("lib64", "lib")]
    cands += ["/usr/local/cuda/lib64", "/usr/local/cuda/lib"]
    for c in cands:
        if glob.glob(os.path.join(c, "libcudart.so*")):
            return [c]
    return []


def _libstdcxx() -> str:
    """The linker argument for libstdc++: the very shared library this process (torch) has loaded,
    by its path, ahead of whatever the compiler adds itself. The GPU image's /opt/gcc links
    libstdc++ statically even when given -lstdc++ (it has no shared one); a private static copy in
    a process that also has the shared one crashed it on every C++ check message with a number in
    it (its iostreams are not the process's). Elsewhere (no /proc, nothing loaded): -lstdc++."""
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.split()[-1]
                if os.path.basename(path).startswith("libstdc++.so") and os.path.exists(path):
                    return path
    except OSError:
        pass
    return "-lstdc++"


def extensions():
    rel = lambda pattern: sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))  # noqa: E731
    sources = rel("csrc/*.cpp") + rel("csrc/cpu/*.cpp")
    # -g1: line tables only (stack traces keep file:line) instead of Python's default -g, which
    # spends ~40% of each file's compile time on debug info for the torch headers.
    cxx = ["-O3", "-g1", "-fopenmp", "-fno-math-errno", "-Wall", "-Wno-unknown-pragmas"]
    link = ["-fopenmp", _libstdcxx()]
    san = os.environ.get("QSPARSE_SANITIZE_FLAGS", "").split()  # `make sanitize`: ASan + UBSan build
    cxx, link = cxx + san, link + san
    define_macros = []
    include_dirs = [os.path.join(ROOT, "csrc", "include")]
    kwargs = dict(extra_link_args=link, include_dirs=include_dirs)
    if _want_cuda():
        include_dirs += _nvidia_wheel_includes()
        kwargs["library_dirs"] = _cudart_library_dirs()
        archs = os.environ.get("QSPARSE_CUDA_ARCHS", "80;90")
        define_macros.append(("QSK_WITH_CUDA", None))
        define_macros.append(("QSK_CUDA_ARCHS", f'"{archs}"'))
        nvcc = ["-O3", "-lineinfo", "--expt-relaxed-constexpr", *_gencode(archs)]
        if os.environ.get("QSPARSE_PTXAS_VERBOSE") == "1":
            nvcc.append("-Xptxas=-v")
        return [
            CUDAExtension(
                "qsparse_kernels._C",
                sources + rel("csrc/cuda/*.cu"),
                define_macros=define_macros,
                extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                **kwargs,
            )
        ]
    return [
        CppExtension(
            "qsparse_kernels._C", sources, define_macros=define_macros, extra_compile_args={"cxx": cxx}, **kwargs
        )
    ]


if not is_ninja_available():  # torch would compile one source at a time
    sys.path.insert(0, os.path.join(ROOT, "scripts"))
    import parallel_compile

    parallel_compile.enable()

setup(
    packages=find_packages(include=["qsparse_kernels", "qsparse_kernels.*"]),
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
)
