# The two commands a fresh machine needs: `make bench` (the main job) and `make test`.
PY := .venv/bin/python
export PYTHONPATH := $(CURDIR)

.PHONY: setup build test bench bench-pytest sanitize sanitize-cuda fuzz training lint clean test-gpu-stack

setup:
	@bash scripts/setup_env.sh

build:
	MAX_JOBS=$${MAX_JOBS:-2} QSPARSE_BUILD_CUDA=$${QSPARSE_BUILD_CUDA:-toolkit} $(PY) setup.py -q build_ext --inplace

test: setup  # the tests spread over every core (pytest-xdist; worksteal: 9.5 vs 12 min with loadfile on 2 cores)
	$(PY) -m pytest -q -n $${QSPARSE_TEST_JOBS:-auto} --dist worksteal tests
	QSPARSE_BENCH_SHAPE=256x512 $(PY) -m pytest -q benchmarks --benchmark-disable  # smoke: the suite runs
	$(PY) -m ruff check .

bench-pytest: setup
	$(PY) -m pytest benchmarks --benchmark-only

bench: setup
	$(PY) -m qsparse_kernels.bench $(ARGS)

sanitize: setup  # C++ CPU kernels under AddressSanitizer + UBSan, CPU tests incl. the fuzz profile
	bash scripts/sanitize.sh

sanitize-cuda: setup  # the CUDA kernels under the SIMT emulator, built with ASan + UBSan (~20 min)
	bash scripts/sanitize.sh cuda

fuzz: setup  # long property tests: >= 10,000 examples per test (reference, cpu), 2,000 (emulated CUDA, triton interpreter)
	QSPARSE_FUZZ=long QSPARSE_FUZZ_BACKENDS=reference,cpu $(PY) -m pytest -q tests/test_fuzz.py
	QSPARSE_FUZZ=interpreter-long QSPARSE_FUZZ_BACKENDS=cuda-emulated $(PY) -m pytest -q tests/test_fuzz.py
	TRITON_INTERPRET=1 QSPARSE_FUZZ=interpreter-long QSPARSE_FUZZ_BACKENDS=triton $(PY) -m pytest -q tests/test_fuzz.py

training: setup  # the Q-Sparse training study (~35 min on 2 cores): benchmarks/training/results
	$(PY) -m benchmarks.training $(ARGS)

test-gpu-stack:  # the GPU machine's stack (torch 2.11, triton 3.6) in /tmp/qsparse-gpu-stack: the Triton interpreter tests
	bash scripts/gpu_stack_env.sh

lint:
	$(PY) -m ruff check .

clean:
	rm -rf build qsparse_kernels/_C*.so
