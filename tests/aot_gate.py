"""Plumbing of the Triton AOT compile gate (test_kernels_compile.py).

``triton.compile`` needs real JIT functions, which ``TRITON_INTERPRET=1`` (set by conftest)
replaces, so the gate re-runs its own file as a worker subprocess without the interpreter. The
test waits for it: the worker compiles every case in a pool of one process per core and prints
one JSON report (case id -> result).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile


def run_worker(test_file: str, timeout: float) -> dict:
    """Run ``test_file --worker`` without the interpreter and return its report (last stdout line)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(test_file), "--worker"], env=env, capture_output=True,
                          text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def print_report(compile_one, jobs) -> None:
    """Worker side: ``compile_one(job) -> (case_id, result)`` over ``jobs`` in a pool, printed as JSON.

    A fresh, empty Triton cache (removed afterwards): every case really compiles, and the gate
    leaves nothing in /tmp."""
    import multiprocessing

    with tempfile.TemporaryDirectory(prefix="ril_fast_gate_") as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        with multiprocessing.get_context("fork").Pool(max(1, os.cpu_count() or 1)) as pool:
            print(json.dumps(dict(pool.map(compile_one, jobs, chunksize=1))))


def signature(fn, constexprs: dict, ptrs: dict, dtype: str, scalars: dict | None = None) -> dict:
    """Triton signature of ``fn``: constexprs by name, ``*_ptr`` args as ``*ptrs.get(name, dtype)``,
    other scalars ``scalars.get(name, "i32")``."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + ptrs.get(name, dtype)
        else:
            sig[name] = (scalars or {}).get(name, "i32")
    return sig
