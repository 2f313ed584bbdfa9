import os
import random
import sys
import zlib

# pytest-xdist runs a worker per core, and each worker's torch (and the library's kernels) runs an
# OpenMP thread per core. With OpenMP's default spin-waiting, a thread waiting at a barrier keeps
# burning a core that the thread it waits for, or another worker, needs: the CPU kernel test files
# took 138 s instead of 64 s on 2 cores. Passive waiting (threads sleep at barriers) costs the
# tests nothing; libgomp reads it once, when torch loads it, hence before `import torch`. Only
# the tests: the benchmarks keep the default, which is what a user's process runs with.
if "torch" not in sys.modules:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402

import qsparse_kernels as qk  # noqa: E402


def cpu_backends() -> list[str]:
    """Backends whose kernels run on CPU tensors in the default test run (Triton's interpreter
    has its own, smaller tests)."""
    info = qk.backend_info()
    return ["reference"] + (["cpu"] if info["cpu"]["usable"] else [])


@pytest.fixture(params=[1, 2])
def threads(request):
    """Runs the test with torch at 1 and at 2 threads, restoring the count afterwards."""
    n = torch.get_num_threads()
    torch.set_num_threads(request.param)
    request.addfinalizer(lambda: torch.set_num_threads(n))
    return request.param


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: reproducible, different draws per call."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))


# Fresh random inputs on every run, reproducible on demand: QSPARSE_TEST_SEED=<printed seed>.
# Set in the environment here so that pytest-xdist's workers (started after this runs) draw the
# same seed as the controller that prints it.
os.environ.setdefault("QSPARSE_TEST_SEED", str(random.SystemRandom().randrange(2**31)))
BASE_SEED = int(os.environ["QSPARSE_TEST_SEED"])


def pytest_report_header(config):
    return f"qsparse_kernels test seed: QSPARSE_TEST_SEED={BASE_SEED}"


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed((zlib.crc32(request.node.nodeid.encode()) ^ BASE_SEED) % (2**31))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if exitstatus != 0:
        terminalreporter.write_line(f"reproduce with QSPARSE_TEST_SEED={BASE_SEED}")


# Files that take minutes (the Triton interpreter child run, ahead-of-time compiles, ptxas, the
# emulated CUDA kernels, the property tests) first, so that with pytest-xdist (`make test`, `make
# sanitize`) they run beside the rest instead of after it.
_SLOW_FIRST = ("test_triton.py", "test_cuda_kernels.py", "test_triton_aot.py", "test_cuda_ptxas.py", "test_fuzz.py")


def pytest_collection_modifyitems(config, items):
    rank = {name: i for i, name in enumerate(_SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: the rest keep their order
