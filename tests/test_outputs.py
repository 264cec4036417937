"""What a run leaves on disk, as a user meets it: overwrite clears the old run, a no-op rerun changes
nothing, files honour the umask, results.json is labelled, task numbers are 1-based."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest

from ril_fast.train import main

TASKS = [("bright", "brightness"), ("smooth", "smoothness"), ("dark", "brightness")]


def config(model_dir, out, n_tasks=3, **extra) -> dict:
    return {
        "output_dir": str(out),
        "seed": 1,
        "model": {"path": str(model_dir)},
        "method": {"name": "rid"},
        "sampling": {"steps": 2, "guidance_scale": 1.0},
        "train": {"batch_size": 1, "lr": 1e-2, "checkpoint_every": 0},
        "tasks": [{"name": name, "reward": reward, "train_prompts": ["a red circle"], "eval_prompts": ["a blue square"],
                   "steps": 1} for name, reward in TASKS[:n_tasks]],
        "eval": {"seeds": [0]},
        **extra,
    }


def write(cfg: dict, path: Path) -> str:
    path.write_text(json.dumps(cfg))
    return str(path)


def test_overwrite_removes_every_output_of_the_old_run(tiny_model_dirs, tmp_path):
    """A 3-task run overwritten by a 2-task config: nothing of task 3 survives, and loading task 3 is refused."""
    import ril_fast

    out = tmp_path / "run"
    assert main(["--config", write(config(tiny_model_dirs["sd"], out, 3), tmp_path / "three.json")]) == 0
    assert (out / "adapters" / "task_03").is_dir() and (out / "grids").is_dir()
    (out / "notes.txt").write_text("mine")  # not a run output: stays
    two = write(config(tiny_model_dirs["sd"], out, 2), tmp_path / "two.json")
    assert main(["--config", two]) == 2  # refused without overwrite
    assert (out / "adapters" / "task_03").is_dir()
    assert main(["--config", two, "--set", "overwrite=true"]) == 0
    assert sorted(p.name for p in (out / "adapters").iterdir()) == ["task_01", "task_02"]
    assert not list(out.glob("grids/*task_03*")) and not list(out.glob("plots/*task_03*"))
    res = json.loads((out / "results.json").read_text())
    assert res["tasks"] == ["bright", "smooth"] and len(res["reward_matrix"]) == 3
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([m for m in metrics if m["kind"] == "train"]) == 2
    assert [m["row"] for m in metrics if m["kind"] == "eval"] == [0, 1, 2]  # the old run's rows are gone
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="task_03"):
        ril_fast.load_pipeline(out, task=3)
