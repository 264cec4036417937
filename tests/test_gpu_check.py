"""benchmarks/gpu_check.sh, the one prepared GPU script, checked without a GPU.

In ``make test``: with a stand-in interpreter that records its command lines, every phase runs
under its time limit, the limits add up to under 8 minutes, a failing phase is counted without
stopping the others, and the dry run's commands are the real ones. Outside it (marker
``gpu_check``, minutes on CPU): the whole dry run for real, which writes every phase's JSON.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"


def test_phase_limits_fit_eight_minutes():
    text = SCRIPT.read_text()
    limits = [int(n) for n in re.findall(r"^phase \w+ (\d+) ", text, flags=re.M)]
    assert len(limits) == 7 and sum(limits) + 5 * len(limits) < 8 * 60, limits  # (5 s: each kill-after)


def test_dry_run_runs_every_phase_and_counts_failures(tmp_path):
    """A stand-in python logs each call; the one for the SDXL phase fails: the script goes on,
    logs every phase and exits with the number of failed phases."""
    calls = tmp_path / "calls.txt"
    fake = tmp_path / "python"
    fake.write_text(f"#!/bin/sh\necho \"$@\" >> {calls}\ncase \"$*\" in *bench_peer_sdxl*) exit 3;; esac\nexit 0\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": str(fake)}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    logs = sorted(p.stem for p in (out / "cpu-dry-run" / "logs").glob("*.log"))
    assert logs == sorted(["env", "cuda_lib_build", "kernel_tests", "peer_sd15", "peer_sdxl", "backends_sd15",
                           "compile_sd15"]), logs
    lines = calls.read_text().splitlines()
    assert any("-m pytest" in c and "-m gpu" in c for c in lines)
    assert any("bench_step.py" in c and "--backends auto,torch,triton" in c for c in lines)
    peer = [c for c in lines if "bench_peer.py" in c]
    assert len(peer) == 3 and all("configs/tiny.json" in c for c in peer)
    assert "peer_sdxl: exit 3" in proc.stdout


@pytest.mark.gpu_check
def test_dry_run_for_real(tmp_path):
    out = tmp_path / "out"
    env = {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(SCRIPT), "--dry-run", str(out)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=1500)
    assert proc.returncode == 0, proc.stdout[-3000:]
    folder = out / "cpu-dry-run"
    for name in ("bench_peer_sd15", "bench_peer_sdxl", "bench_compile_sd15", "step_backends_sd15"):
        assert json.loads((folder / f"{name}.json").read_text()), name
