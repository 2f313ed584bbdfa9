"""Parallel compilation for setuptools builds without ninja.

torch's ``BuildExtension`` falls back to setuptools' serial ``CCompiler.compile`` when ninja is
missing (207 s for the CUDA kernels for sm_90 alone on the GPU machine). ``enable(jobs)`` replaces
it with one that compiles up to ``jobs`` sources at once, each in a forked child: torch's non-ninja
hook swaps the compiler executable (nvcc for .cu files) on the shared compiler object around each
``_compile`` call, which threads would race on and forked children each do on their own copy.
"""

from __future__ import annotations

import os


def _compile_parallel(self, sources, output_dir=None, macros=None, include_dirs=None, debug=False,
                      extra_preargs=None, extra_postargs=None, depends=None):
    macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
        output_dir, macros, include_dirs, sources, depends, extra_postargs
    )
    cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)
    todo = [(obj, *build[obj]) for obj in objects if obj in build]
    jobs = max(1, int(os.environ.get("MAX_JOBS") or os.cpu_count() or 1))
    running: dict[int, str] = {}
    failed: list[str] = []

    def reap():
        pid, status = os.wait()
        src = running.pop(pid)
        if os.waitstatus_to_exitcode(status) != 0:
            failed.append(src)

    for obj, src, ext in todo:
        while len(running) >= jobs:
            reap()
        pid = os.fork()
        if pid == 0:  # child: compile one source, report by exit status only
            code = 1
            try:
                self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)
                code = 0
            except BaseException as e:  # noqa: BLE001 - the parent reports the failure
                print(f"error compiling {src}: {e}", flush=True)
            finally:
                os._exit(code)
        running[pid] = src
    while running:
        reap()
    if failed:
        from setuptools._distutils.errors import CompileError

        raise CompileError("failed to compile: " + ", ".join(sorted(failed)))
    return objects


def enable() -> None:
    """Compile every extension's sources MAX_JOBS (default: CPU count) at a time."""
    from setuptools._distutils import ccompiler

    ccompiler.CCompiler.compile = _compile_parallel
