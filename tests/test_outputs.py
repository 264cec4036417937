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
    assert [(m["task"], m["step"]) for m in metrics if m["kind"] == "train"] == [(1, 1), (2, 1)]  # 1-based
    assert [m["row"] for m in metrics if m["kind"] == "eval"] == [0, 1, 2]  # the old run's rows are gone
    assert (out / "notes.txt").read_text() == "mine"
    with pytest.raises(ValueError, match="task_03"):
        ril_fast.load_pipeline(out, task=3)


def test_resume_message_is_info_and_one_based(tiny_model_dirs, tmp_path, caplog):
    """A rerun names the position in the user's numbering (task 2 = the second task), at INFO."""
    import logging

    from ril_fast import checkpoint as ckpt

    cfg = config(tiny_model_dirs["sd"], tmp_path / "run", 2)
    cfg["tasks"][1]["steps"] = 2
    cfg["train"]["checkpoint_every"] = 1
    conf = write(cfg, tmp_path / "c.json")
    real, calls = ckpt.fault_point, []

    def stop_in_task_2(name):  # a crash right after task 2's first step was checkpointed
        calls.append(name)
        if name == "step" and calls.count("step") == 3:
            raise KeyboardInterrupt
        real(name)

    ckpt.fault_point = stop_in_task_2
    try:
        assert main(["--config", conf]) == 130
    finally:
        ckpt.fault_point = real
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ril_fast"):
        assert main(["--config", conf]) == 0
    resumed = [r for r in caplog.records if "resuming" in r.getMessage()]
    assert [(r.levelname, r.getMessage()) for r in resumed] == [
        ("INFO", "resuming from checkpoint 4: task 2 (smooth) at step 1 of 2")]


@pytest.fixture(scope="module")
def finished(tiny_model_dirs, tmp_path_factory):
    """A 2-task run made under umask 027 (group may read, others nothing)."""
    root = tmp_path_factory.mktemp("outputs")
    cfg = config(tiny_model_dirs["sd"], root / "run", 2)
    for task in cfg["tasks"]:
        task["steps"] = 2
    conf = write(cfg, root / "c.json")
    old = os.umask(0o027)
    try:
        assert main(["--config", conf]) == 0
    finally:
        os.umask(old)
    return root / "run", conf


def test_files_honour_the_umask(finished):
    """Every file and folder of the run has the mode the umask gives a plain open()/mkdir() (not mkstemp's 0600)."""
    run, _ = finished
    modes = {str(p.relative_to(run)): stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*")}
    kinds = {"results.json", "grids", "plots", "adapters/task_02/pytorch_lora_weights.safetensors", "metrics.jsonl",
             "checkpoints/latest", "eval/base_images.safetensors"}
    assert kinds <= set(modes) and any(k.endswith("state.safetensors") for k in modes)
    wrong = {k: oct(m) for k, m in modes.items() if m != (0o750 if (run / k).is_dir() else 0o640)}
    assert not wrong


def test_rerun_with_nothing_to_do_changes_nothing(finished):
    """results.json byte-identical (no fresh wall time or timestamp), no new lines, no new TensorBoard file."""
    run, conf = finished
    before = {p: p.read_bytes() for p in [run / "results.json", run / "metrics.jsonl"]}
    events = sorted((run / "tensorboard").iterdir())
    assert main(["--config", conf]) == 0
    assert {p: p.read_bytes() for p in before} == before
    assert sorted((run / "tensorboard").iterdir()) == events


def test_results_json_reads_without_the_code(finished):
    run, _ = finished
    res = json.loads((run / "results.json").read_text())
    assert res["rows"] == ["base", "after bright", "after smooth"] and res["columns"] == ["bright", "smooth"]
    assert len(res["reward_matrix"]) == len(res["rows"]) and all(len(r) == 2 for r in res["reward_matrix"])
    assert [k for k in res if "wall" in k] == ["wall_seconds"] and res["wall_seconds"] > 0
    import torch

    assert res["versions"]["torch"] == torch.__version__ and res["versions"]["ril_fast"]
    assert res["device"] == "cpu"
    import datetime

    assert datetime.datetime.fromisoformat(res["timestamp"]).tzinfo is not None


def test_sigterm_checkpoints_then_exits_with_one_line(tiny_model_dirs, tmp_path):
    """A cluster preempting the job (SIGTERM to the real CLI process): the step in flight finishes, a
    checkpoint of it is written, and the process exits 143 with one line naming where to resume."""
    import re
    import subprocess
    import sys
    import time

    from ril_fast import checkpoint as ckpt

    cfg = config(tiny_model_dirs["sd"], tmp_path / "run", 1)
    cfg["tasks"][0]["steps"] = 100000  # only the signal ends it; checkpoint_every 0: only the signal's checkpoint
    conf = write(cfg, tmp_path / "c.json")
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]), OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "ril_fast.train", "--config", conf], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.poll() is None:
        if metrics.is_file() and metrics.read_text().count('"kind": "train"') >= 2:
            break
        time.sleep(0.2)
    assert proc.poll() is None, proc.communicate()[1][-3000:]
    proc.terminate()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-3000:]
    assert "Traceback" not in err
    last = err.strip().splitlines()[-1]
    match = re.fullmatch(r"ril_fast: stopped by SIGTERM at task 1 step (\d+); rerun the same command to resume "
                         r"from checkpoint (\d+)", last)
    assert match, err[-3000:]
    meta, _, optim, _ = ckpt.load_latest(tmp_path / "run")
    assert meta["seq"] == int(match.group(2)) and (meta["task"], meta["phase"]) == (0, "train")
    assert meta["step"] == int(match.group(1)) >= 2 and optim is not None  # the interrupted step's own checkpoint


def test_reward_curves_use_the_global_step_and_task_names(tiny_model_dirs, tmp_path, monkeypatch):
    """reward_curves.png: each task on its own stretch of the global step, one dashed line per real task
    boundary, legend by task name (it used to overlay every task on 1..steps with a line at every step)."""
    from types import SimpleNamespace

    from ril_fast import report, results
    from ril_fast.config import config_from_dict

    cfg = config_from_dict(config(tiny_model_dirs["sd"], tmp_path, 3))
    for task, steps in zip(cfg.tasks, (3, 2, 4)):
        task.steps = steps
    lines = [{"kind": "train", "task": t, "step": s, "global_step": g, "reward": 0.1 * g}
             for t, s, g in [(1, 1, 1), (1, 2, 2), (1, 3, 3), (2, 1, 4), (2, 2, 5)]]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    figures = {}

    def keep(fig, path):
        figures[Path(path).name] = fig
        return Path(path)

    monkeypatch.setattr(report, "_save_figure", keep)
    results.plot_curves(SimpleNamespace(cfg=cfg, out=tmp_path), 1)  # after task 2 of 3
    ax = figures["reward_curves.png"].axes[0]
    curves = {line.get_label(): list(line.get_xdata()) for line in ax.lines if not line.get_label().startswith("_")}
    assert curves == {"1. bright": [1, 2, 3], "2. smooth": [4, 5]}
    boundaries = [line.get_xdata()[0] for line in ax.lines if line.get_label().startswith("_")]
    assert boundaries == [3.5]
    assert [t.get_text() for t in ax.get_legend().get_texts()] == ["1. bright", "2. smooth"]
    one = figures["reward_curve_task_02.png"].axes[0]
    assert [list(line.get_xdata()) for line in one.lines] == [[1, 2]]  # the task's own steps, no boundary


def test_tensorboard_holds_what_a_person_watches(finished):
    """Eval scalars and one image grid per reward-matrix row at the global step; no bookkeeping scalars."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run, _ = finished
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    tags = events.Tags()
    assert set(tags["scalars"]) == {"train/reward", "train/distill", "train/grad_norm", "train/step_seconds",
                                    "eval/reward/bright", "eval/reward/smooth", "eval/structure_drift"}
    assert tags["images"] == ["eval/images"]
    assert [e.step for e in events.Images("eval/images")] == [0, 2, 4]  # base, after task 1 (2 steps), after 2
    assert [e.step for e in events.Scalars("eval/reward/bright")] == [0, 2, 4]
    assert [e.step for e in events.Scalars("train/reward")] == [1, 2, 3, 4]
