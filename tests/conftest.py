import pytest
import torch

import qsparse_kernels as qk


def cpu_backends() -> list[str]:
    """Backends whose kernels run on CPU tensors in the default test run (Triton's interpreter
    has its own, smaller tests)."""
    info = qk.backend_info()
    return ["reference"] + (["cpu"] if info["cpu"]["usable"] else [])


@pytest.fixture
def gen():
    """A fresh, seeded generator per test: reproducible, different draws per call."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**31 - 1, ())))


@pytest.fixture(autouse=True)
def _seed(request):
    torch.manual_seed(hash(request.node.nodeid) % (2**31))
