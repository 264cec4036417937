"""``make run`` end to end: the documented command on the shipped configs/tiny.json, with one training
step per task and one eval seed (everything else as shipped). The table it prints must hold
results.json's numbers, and the prompt-adherence figures in results.json must be what the shipped
classifier says about the eval images the run kept (rows 0 and n are on disk)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from safetensors.torch import load_file

from ril_fast.config import read_prompts
from ril_fast.rewards.adherence import adherence_accuracy, load_classifier

REPO = Path(__file__).resolve().parents[1]
SHORT = ["tasks.0.steps=1", "tasks.1.steps=1", "tasks.2.steps=1", "eval.seeds=[0]", "sampling.steps=4"]

pytestmark = pytest.mark.slow  # ~15 s: a fresh interpreter runs configs/tiny.json end to end


def _table_rows(text: str, header: str) -> list[list[str]]:
    """Body rows of the first markdown table after the line starting with ``header``."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 1:]:
        if rows and not line.startswith("|"):
            break
        if line.startswith("|") and not line.startswith("| ---") and not line.startswith("|---"):
            rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[1:]  # drop the header row


def _num(cell: str):
    return None if cell in ("–", "-") else float(cell)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("make_run") / "run"
    cmd = [sys.executable, "-m", "ril_fast.train", "--config", "configs/tiny.json", "--set", f"output_dir={out}"]
    for s in SHORT:
        cmd += ["--set", s]
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    # stderr: the log lines and progress bars
    return out, proc.stdout, json.loads((out / "results.json").read_text(encoding="utf-8")), proc.stderr


def test_printed_table_holds_results_json(run):
    _, stdout, res, _ = run
    names = res["tasks"]
    assert names == ["contrast", "adherence", "compressibility"]
    matrix = _table_rows(stdout, "**Reward matrix**")
    assert len(matrix) == 4 == len(res["reward_matrix"])
    for printed, row in zip(matrix, res["reward_matrix"]):
        # printed with 4 significant digits
        assert [_num(c) for c in printed[1:]] == pytest.approx(row, rel=1e-3, abs=1e-12), (printed, row)
    metrics = {r[0]: r[1:] for r in _table_rows(stdout, "**Continual-learning metrics**")}
    assert list(metrics) == names
    for name, p in zip(res["plasticity"]["tasks"], res["plasticity"]["per_task"]):
        assert _num(metrics[name][0]) == pytest.approx(p, rel=1e-3, abs=1e-12)
    for name, f in zip(res["forgetting"]["tasks"], res["forgetting"]["per_task"]):
        assert _num(metrics[name][2]) == pytest.approx(f, rel=1e-3, abs=1e-12)


def test_prompt_adherence_figures_are_the_classifiers(run):
    out, _, res, _ = run
    pairs = read_prompts(str(REPO / "configs" / "prompts" / "shapes_eval.txt"), "eval")  # one seed: one image each
    rows = res["prompt_adherence"]
    assert len(rows) == 4
    classifier = load_classifier(REPO / "ril_fast" / "assets" / "embedded" / "classifier")
    last = load_file(out / "eval" / "row_images_1.safetensors")  # row 3 lives in slot 3 % 2
    assert int(last["__row__"]) == 3
    for images, figures in ((load_file(out / "eval" / "base_images.safetensors")["adherence"], rows[0]),
                            (last["adherence"], rows[3])):
        want = adherence_accuracy(images, pairs, classifier)
        assert figures["n"] == len(pairs) == want["n"]
        for key in ("shape", "colour", "background", "all"):
            assert figures[key] == pytest.approx(want[key], abs=1e-6), key


def test_the_run_prints_no_warning(run):
    """A clean run warns about nothing: a WARNING line is either ours (something the user should act
    on, which a clean run of the shipped config must not have) or third-party noise (bitsandbytes,
    imported by diffusers, warned on every CPU run about an optional hub package; ``ril_fast/logs.py``)."""
    warnings = [line for line in run[3].splitlines() if "WARNING" in line]
    assert not warnings, warnings
