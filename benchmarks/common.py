"""Shared benchmark helpers: timing (do_bench on GPU, a plain timer on CPU) and JSON records.

Records go to ``benchmarks/results/<gpu-slug or cpu>/<name>.json`` (or ``--out``), written
atomically, with the machine and software versions needed to compare runs.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import re
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent


def device_slug(device: torch.device | str) -> str:
    """Results folder name: the GPU's name in lower case, runs of other characters as ``-``
    (``nvidia-h200``), or ``cpu``."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def env_info(device: torch.device | str) -> dict:
    device = torch.device(device)
    try:
        import triton

        triton_version = triton.__version__
    except Exception:  # pragma: no cover - triton is pinned
        triton_version = None
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True,
                             timeout=10).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True,
                                    timeout=10).stdout.strip())
    except Exception:
        sha, dirty = None, None
    info = {
        "device": device.type,
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "git_sha": sha,
        "git_dirty": dirty,
        "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "cpu_threads": torch.get_num_threads(),
        "interpret": os.environ.get("TRITON_INTERPRET") == "1",
    }
    return info


def bench(fn, device: torch.device | str, *, grad_to_none=None, warmup_ms: float = 25, rep_ms: float = 100) -> dict:
    """Median / p20 / p80 of ``fn()`` in milliseconds.

    GPU: ``triton.testing.do_bench`` (CUDA events, L2 flush between reps). CPU: wall-clock timer
    over enough repeats to fill ``rep_ms`` (at least 3).
    """
    device = torch.device(device)
    if device.type == "cuda":
        from triton.testing import do_bench

        med, p20, p80 = do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                 quantiles=[0.5, 0.2, 0.8])
        return {"median_ms": med, "p20_ms": p20, "p80_ms": p80}
    times = []
    deadline = time.perf_counter() + warmup_ms / 1e3
    fn()
    while time.perf_counter() < deadline:
        fn()
    while len(times) < 3 or sum(times) < rep_ms / 1e3:
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
        if len(times) >= 200:
            break
    q = statistics.quantiles(times, n=10) if len(times) >= 2 else times * 9
    return {"median_ms": statistics.median(times) * 1e3, "p20_ms": q[1] * 1e3, "p80_ms": q[7] * 1e3}


def results_path(name: str, device: torch.device | str, out: str | None = None) -> Path:
    """``out`` may be a directory (``<out>/<slug>/<name>.json``) or a ``.json`` file path."""
    if out and out.endswith(".json"):
        return Path(out)
    base = Path(out) if out else ROOT / "benchmarks" / "results"
    return base / device_slug(device) / f"{name}.json"


def write_record(path: Path, record: dict) -> Path:
    """Atomic JSON write (temp file + os.replace), so a killed run never leaves half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(record, fh, indent=1, default=str)
    os.replace(tmp, path)
    return path


def bench_graph(fn, device: torch.device | str, *, grad_to_none=None, warmup_ms: float = 25,
                rep_ms: float = 100, repeat: int = 1) -> dict:
    """Like :func:`bench`, but ``fn`` is captured once in a CUDA graph and the replay is timed.

    The replay shows GPU time without host launch overhead. ``fn`` runs three times on a side
    stream first (JIT compiles, caches fill), with ``grad_to_none`` cleared before capture.
    ``repeat`` > 1 captures ``fn`` that many times back to back (``grad_to_none`` cleared before each,
    so no call accumulates) and reports times per call: the graph's own launch latency (8-10 µs on
    an H200, as much as a small layer's GEMM) is then spread out, as kernels run inside a UNet.
    """
    device = torch.device(device)
    if device.type != "cuda":
        raise RuntimeError(f"CUDA-graph timing needs a cuda device, got {device}; use bench() on CPU")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    side = torch.cuda.Stream(device)
    side.wait_stream(torch.cuda.current_stream(device))
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream(device).wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(repeat):
            for t in grad_to_none or ():
                t.grad = None
            fn()
    torch.cuda.synchronize(device)
    got = bench(graph.replay, device, warmup_ms=warmup_ms, rep_ms=rep_ms)
    if repeat > 1:
        got = {k: v / repeat if k.endswith("_ms") else v for k, v in got.items()}
        got["graph_repeat"] = repeat
    return got
