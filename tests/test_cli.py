"""The ``ril-fast`` command as documented: every subcommand, on a real (tiny) run."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ril_fast import cli

REPO = Path(__file__).resolve().parents[1]


def test_console_script_is_declared_and_resolves():
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    module, _, attr = scripts["ril-fast"].partition(":")
    assert (module, attr) == ("ril_fast.cli", "main")


def test_help_documents_every_command(capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["--help"])
    assert exc.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # argparse wraps help text
    for name, text in cli.COMMANDS.items():
        assert f"{name} {' '.join(text.split())}" in out
    for name in ("sample", "eval"):
        with pytest.raises(SystemExit):
            cli.main([name, "--help"])
        assert "the run's output_dir" in capsys.readouterr().out


def test_version_and_help_in_a_real_process():
    from ril_fast import __version__

    env = {"PYTHONPATH": str(REPO), "PATH": "/usr/bin:/bin"}
    proc = subprocess.run([sys.executable, "-m", "ril_fast", "--version"], capture_output=True, text=True, env=env,
                          timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.strip() == f"ril-fast {__version__}", proc.stderr
    proc = subprocess.run([sys.executable, "-m", "ril_fast", "train", "--help"], capture_output=True, text=True,
                          env=env, timeout=120, check=False)
    assert proc.returncode == 0 and proc.stdout.startswith("usage: ril-fast train") and "--config" in proc.stdout


def test_rewards_lists_every_registered_reward(capsys):
    from ril_fast import rewards

    assert cli.main(["rewards"]) == 0
    lines = capsys.readouterr().out.splitlines()
    listed = {line.split()[0] for line in lines[1:]}
    assert listed == set(rewards.names()) | {"module:function"}
    assert all(len(line.split()) > 2 for line in lines[1:])  # each with a description


def test_info(capsys, monkeypatch):
    monkeypatch.setenv("RIL_FAST_KERNELS", "torch")
    assert cli.main(["info"]) == 0
    assert "RIL_FAST_KERNELS=torch" in capsys.readouterr().out


@pytest.fixture(scope="module")
def run(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    conf = root / "c.json"
    conf.write_text(json.dumps({
        "output_dir": str(root / "run"), "seed": 2, "model": {"path": str(tiny_model_dirs["sd"])},
        "sampling": {"steps": 2, "guidance_scale": 2.0}, "train": {"batch_size": 1, "lr": 5e-2},
        "lora": {"rank": 4, "alpha": 8.0},  # scale 2: a re-score that applied it twice would show
        "tasks": [{"name": n, "reward": r, "train_prompts": ["a red circle"], "eval_prompts": ["a blue square"],
                   "steps": 1} for n, r in (("bright", "brightness"), ("smooth", "smoothness"))],
        "eval": {"seeds": [3, 4]},
    }))
    assert cli.main(["train", "--config", str(conf)]) == 0
    return root / "run"


def test_sample_draws_the_grid_images(run, tmp_path):
    """Same prompt and seed as the run's evaluation: the same pixels as its grid (stock diffusers pipeline)."""
    out = tmp_path / "s.png"
    assert cli.main(["sample", str(run), "--task", "2", "--prompt", "a blue square", "--out", str(out)]) == 0
    sample = np.asarray(Image.open(out).convert("RGB")).astype(np.float32)
    grid = np.asarray(Image.open(run / "grids" / "after_task_02.png").convert("RGB")).astype(np.float32)
    from ril_fast.report import GRID_PADDING as P
    from ril_fast.report import tile_scale

    assert sample.shape[1] == grid.shape[1]  # one prompt row, the run's two seeds; only the titles differ
    side = int(16 * tile_scale(16, 16))
    tiles = [arr[-side - P : -P, -2 * (side + P) : -P] for arr in (sample, grid)]  # the last row: both seeds
    assert np.abs(tiles[0] - tiles[1]).max() <= 2 and tiles[0].std() > 1


def test_sample_of_a_task_the_run_does_not_have(run, capsys):
    assert cli.main(["sample", str(run), "--task", "3", "--prompt", "x"]) == 2
    assert "task_03" in capsys.readouterr().err


def test_eval_rescores_to_the_runs_matrix(run):
    """Re-scoring from the exported adapters alone gives the trainer's reward matrix (same seeds, same steps)."""
    assert cli.main(["eval", str(run)]) == 0
    got = json.loads((run / "eval" / "rescore.json").read_text())
    want = json.loads((run / "results.json").read_text())
    assert got["rows"] == want["rows"] and got["columns"] == want["columns"]
    np.testing.assert_allclose(got["reward_matrix"], want["reward_matrix"], rtol=1e-5, atol=1e-6)
    assert cli.main(["eval", str(run), "--set", "eval.seeds=[7]"]) == 0  # other seeds: other numbers
    other = json.loads((run / "eval" / "rescore.json").read_text())
    assert other["eval"]["seeds"] == [7] and other["reward_matrix"] != want["reward_matrix"]


def test_train_py_as_a_script_shadows_no_top_level_package(monkeypatch):
    """`deepspeed ril_fast/train.py` runs the file as a script: Python puts ril_fast/ first on sys.path,
    where ril_fast/kernels shadowed the `kernels` package bitsandbytes imports (every launch warned
    "cannot import name 'get_kernel' from 'kernels'"). The script must swap its folder for the repo root."""
    here = str(REPO / "ril_fast")
    monkeypatch.setattr(sys, "path", [here, *sys.path])
    runpy.run_path(str(REPO / "ril_fast" / "train.py"), run_name="as_a_script")
    assert here not in [os.path.abspath(p or os.curdir) for p in sys.path]
    assert sys.path[0] == str(REPO)
