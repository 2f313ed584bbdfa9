"""Q-Sparse training at small scale: the paper's claims reproduced with the library's own modules.

``python -m benchmarks.training [--quick]`` (see :mod:`benchmarks.training.__main__`).
"""
