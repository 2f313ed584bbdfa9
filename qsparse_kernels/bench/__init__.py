"""Benchmark harness and the ``python -m qsparse_kernels.bench`` CLI."""
