"""Every shipped config (configs/*.json but tiny*) runs under the DeepSpeed launcher with two ranks, as shipped.

Only what a CPU machine without weights needs is overridden: ``model.path`` (a tiny random model of
the config's kind), ``output_dir``, each task's reward (a model-free one), the number of tasks (two)
and their steps (two, then one), ``sampling.height/width/steps`` (32², 4 DDIM steps) and the eval size
(one prompt, one seed, batch 1). Method, λ, EMA, precision (bf16 base), ZeRO stage and offload,
memory plan (``budget_gib`` planning included), guidance, eta, gradient window and accumulation stay
as shipped.

Both ranks must hold identical adapters after every step (their fingerprints in metrics.jsonl),
and the run must equal one process with the same global batch: rank r of W draws micro-batch m of
step s from seed index (s·grad_accum + m)·W + r, so 2 ranks × grad_accum A see the batches of one
process × grad_accum 2A. Summation order differs (all-reduce mean vs. accumulated loss/2A), and the
bf16 base rounds what it is given, so the tolerance is 1e-3 relative on adapters and rewards.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import reliability_support as rs
import torch
from safetensors.torch import load_file

from ril_fast.config import read_prompts
from ril_fast.memory import memory_arch

REPO = Path(__file__).resolve().parents[1]
DEEPSPEED = Path(sys.executable).parent / "deepspeed"
SHIPPED = sorted(p for p in (REPO / "configs").glob("*.json") if not p.name.startswith("tiny"))
MODEL_FREE = ["contrast", "colorfulness"]  # task i's reward becomes MODEL_FREE[i]
DDIM_STEPS = 4  # the loop is the same at 20 or 4; only its length (most of a CPU step's time) changes
STEPS = [2, 1]  # task 1: a second optimizer step on the sharded/offloaded state; task 2: the distilling step

pytestmark = [
    pytest.mark.slow,  # ~25-45 s per config on a 2-core machine: a launch of two ranks, then one process
    pytest.mark.skipif(not DEEPSPEED.exists(), reason="the deepspeed launcher is not installed next to python"),
]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(shipped: dict, model: str, out: Path) -> list[str]:
    """The --set list: the only changes the shipped config gets."""
    tasks = []
    for i, task in enumerate(shipped["tasks"][:2]):
        spec = task["eval_prompts"]
        first = read_prompts(spec if isinstance(spec, list) else str(REPO / "configs" / spec), "eval_prompts")[0]
        tasks.append({**task, "reward": MODEL_FREE[i], "reward_options": {}, "steps": STEPS[i], "eval_prompts": [first]})
    return ["--set", f"model.path={model}", "--set", f"output_dir={out}", "--set", f"tasks={json.dumps(tasks)}",
            "--set", "sampling.height=32", "--set", "sampling.width=32", "--set", f"sampling.steps={DDIM_STEPS}",
            "--set", "eval.seeds=[0]",
            "--set", "eval.batch_size=1"]


@pytest.mark.parametrize("config", SHIPPED, ids=[p.stem for p in SHIPPED])
def test_shipped_config_under_the_launcher(config, tmp_path, tiny_model_dirs):
    shipped = json.loads(config.read_text())
    kind = "sdxl" if memory_arch(shipped["model"]["path"]) == "sdxl" else "sd"
    model = tiny_model_dirs[kind]
    argv = ["--config", str(config.relative_to(REPO))]
    env = dict(os.environ, PYTHONPATH=f"{REPO}{os.pathsep}{Path(__file__).parent}", HF_HUB_OFFLINE="1")
    two = subprocess.run([str(DEEPSPEED), "--num_gpus", "2", "--master_port", str(_free_port()), "ril_fast/train.py",
                          *argv, *overrides(shipped, model, tmp_path / "two")], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=900, check=False)
    log = two.stdout + two.stderr
    assert two.returncode == 0, log[-4000:]
    ds = shipped["deepspeed"]
    assert f"engine: deepspeed zero{ds['zero_stage']}" in log and "x 2 ranks x" in log
    assert f"base {shipped['model']['dtype']}" in log

    accum = shipped.get("train", {}).get("grad_accum", 1)
    one_argv = [*argv, *overrides(shipped, model, tmp_path / "one"), "--set", f"train.grad_accum={2 * accum}"]
    cwd = os.getcwd()
    os.chdir(REPO)  # argv names the config relative to the repository
    try:
        rc = rs.run_forked(one_argv, tmp_path / "one.log")
    finally:
        os.chdir(cwd)
    assert rc == 0, (tmp_path / "one.log").read_text()[-3000:]

    train = [m for m in rs.read_metrics(tmp_path / "two") if m["kind"] == "train"]
    assert len(train) == sum(STEPS) and all(not m["skipped"] for m in train)
    assert all(len(m["replica_fingerprints"]) == 2 and len(set(m["replica_fingerprints"])) == 1 for m in train)
    train_one = [m for m in rs.read_metrics(tmp_path / "one") if m["kind"] == "train"]
    for m2, m1 in zip(train, train_one, strict=True):
        assert m2["reward"] == pytest.approx(m1["reward"], rel=1e-3)
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-3)
    for task in ("task_01", "task_02"):
        a = load_file(tmp_path / "two" / "adapters" / task / "pytorch_lora_weights.safetensors")
        b = load_file(tmp_path / "one" / "adapters" / task / "pytorch_lora_weights.safetensors")
        assert a.keys() == b.keys() and any(float(b[k].abs().max()) > 0 for k in b if "lora_B" in k)
        for key in a:
            torch.testing.assert_close(a[key], b[key], rtol=1e-3, atol=1e-6)
    res_two, res_one = rs.comparable_results(tmp_path / "two"), rs.comparable_results(tmp_path / "one")
    torch.testing.assert_close(torch.tensor(res_two["reward_matrix"]), torch.tensor(res_one["reward_matrix"]),
                               rtol=1e-3, atol=1e-6)
