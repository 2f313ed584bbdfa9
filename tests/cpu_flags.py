"""The CPU's feature flags as Linux reports them (/proc/cpuinfo), read independently of the
library's own detection (csrc/cpu/isa.cpp) so that tests can check which kernel it picks."""


def _read() -> frozenset[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


CPU_FLAGS = _read()
