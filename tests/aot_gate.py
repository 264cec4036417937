"""Shared plumbing of the Triton AOT compile gates (test_kernels_compile_*.py).

``triton.compile`` needs real JIT functions, which ``TRITON_INTERPRET=1`` (set by conftest) replaces,
so each gate re-runs its own file as a worker subprocess without the interpreter; the worker
compiles every case in a small process pool and prints one JSON report (case id -> result).

The compiles are most of the suite's CPU time while its other tests run on one thread
(conftest), so conftest starts every selected gate's worker in the background, niced, as soon as
collection ends, and runs the gate modules (marker ``compile_gate``) last: their reports are ready,
or nearly, when their tests ask.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile

# Niceness of a background worker: the foreground tests keep their core (a nice-19 process weighs
# 1.5 % of a nice-0 one in the scheduler) and the compiles take whatever the foreground leaves.
BACKGROUND_NICE = 19

_workers: dict = {}  # absolute test file -> (Popen, stdout file, stderr file)


def start_worker(test_file: str) -> None:
    """Start ``test_file --worker`` without the interpreter, in the background (once per file)."""
    path = os.path.abspath(test_file)
    if path in _workers:
        return
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    # files, not pipes: nobody reads a background worker's output until it ends (a full pipe would stall it)
    out, err = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed with the worker)
    # A process group of its own, so stop_workers kills the worker and its compile pool together. Not
    # a session: with autogroup scheduling (Linux's default) a new session is a new scheduling group
    # that takes its equal share of the CPU whatever its niceness (measured: the foreground tests ran
    # up to 2x slower beside three such workers).
    # (Python 3.10 has no process_group: a session there, killable as a group, at the scheduling cost above.)
    group = {"process_group": 0} if sys.version_info >= (3, 11) else {"start_new_session": True}
    proc = subprocess.Popen(["nice", "-n", str(BACKGROUND_NICE), sys.executable, path, "--worker"], env=env,
                            stdout=out, stderr=err, **group)
    _workers[path] = proc, out, err


def run_worker(test_file: str, timeout: float) -> dict:
    """The report of ``test_file --worker`` (started now unless :func:`start_worker` did already):
    its last stdout line, parsed. ``timeout`` counts from this call."""
    start_worker(test_file)
    proc, out, err = _workers[os.path.abspath(test_file)]
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        _kill(proc)
        raise
    err.seek(0)
    assert proc.returncode == 0, err.read()[-3000:]
    out.seek(0)
    return json.loads(out.read().strip().splitlines()[-1])


def stop_workers() -> None:
    """End of session: kill the workers still running (their tests were deselected or the session
    stopped early) and close every worker's output files."""
    for proc, out, err in _workers.values():
        if proc.poll() is None:
            _kill(proc)
        out.close()
        err.close()
    _workers.clear()


def _kill(proc) -> None:
    with contextlib.suppress(ProcessLookupError):  # the group is already gone
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


@contextlib.contextmanager
def fresh_triton_cache(prefix: str):
    """Worker side: a new, empty Triton cache, removed afterwards, so every case runs ptxas (and
    reports its register spills under ``TRITON_DUMP_PTXAS_LOG``)."""
    with tempfile.TemporaryDirectory(prefix=prefix) as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        yield


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
