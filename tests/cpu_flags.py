"""The CPU's feature flags as Linux reports them (/proc/cpuinfo), read independently of the
library's own detection (csrc/cpu/isa.cpp) so that tests can check which kernel it picks; and
:func:`with_isa`, which runs a call with the kernels' ISA capped."""

# The ISA levels a cap can select (QSPARSE_CPU_ISA / set_cpu_isa_cap); above the CPU's, its own.
ISAS = ["avx512", "avx2", "scalar"]


def with_isa(isa: str, fn):
    """``fn()`` with the CPU kernels capped at ``isa`` (one of :data:`ISAS`), the cap lifted after."""
    from qsparse_kernels import _native

    _native._C.set_cpu_isa_cap(isa)
    try:
        return fn()
    finally:
        _native._C.set_cpu_isa_cap("")


def _fields() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where there is none)."""
    out: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break
                key, _, value = line.partition(":")
                out[key.strip()] = value.strip()
    except OSError:
        pass
    return out


_FIELDS = _fields()
CPU_FLAGS = frozenset(_FIELDS.get("flags", "").split())
# AMD family 0x19 with AVX-512 (Zen 4): 512-bit FMAs at the 256-bit rate, so fp32 (and, without a
# fast torch fp16 GEMM, fp16) batches take the AVX2 row-sparse GEMM there too
# (csrc/cpu/sparse_linear.cpp: row_gemm_wins).
ZEN4 = _FIELDS.get("vendor_id") == "AuthenticAMD" and _FIELDS.get("cpu family") == "25" and "avx512f" in CPU_FLAGS
