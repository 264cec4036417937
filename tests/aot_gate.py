"""Shared plumbing of the Triton AOT compile gates (test_kernels_compile_*.py).

``triton.compile`` needs real JIT functions, which ``TRITON_INTERPRET=1`` (set by conftest) replaces,
so each gate re-runs its own file as a worker subprocess without the interpreter; the worker
compiles every case in a small process pool and prints one JSON report (case id -> result).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys


def run_worker(test_file: str, timeout: float) -> dict:
    """Run ``test_file --worker`` without the interpreter; its last stdout line, parsed."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(test_file), "--worker"], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_report(compile_one, jobs) -> None:
    """Worker side: ``compile_one(job) -> (case_id, result)`` over ``jobs`` in a pool, printed as JSON."""
    import multiprocessing

    with multiprocessing.get_context("fork").Pool(max(1, min(4, os.cpu_count() or 1))) as pool:
        print(json.dumps(dict(pool.map(compile_one, jobs, chunksize=1))))


def signature(fn, constexprs: dict, ptrs: dict, dtype: str, scalars: dict | None = None) -> dict:
    """Triton signature of ``fn``: constexprs by name, ``*_ptr`` args as ``*ptrs.get(name, dtype)``,
    ``*_desc`` args (TMA descriptors) as ``ptrs[name]`` verbatim, other scalars ``scalars.get(name, "i32")``."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_desc"):
            sig[name] = ptrs[name]
        elif name.endswith("_ptr"):
            sig[name] = "*" + ptrs.get(name, dtype)
        else:
            sig[name] = (scalars or {}).get(name, "i32")
    return sig
