"""Inputs are checked up front: prompts a reward cannot read, user rewards that return the wrong
thing, and relative paths in a config (read next to the config file, else in the working directory)."""

import json
import os
from pathlib import Path

import pytest
import torch

from ril_fast import rewards
from ril_fast.config import ConfigError, config_from_dict, load_config
from ril_fast.train import main

EMBEDDED = str(Path(__file__).resolve().parents[1] / "ril_fast" / "assets" / "embedded")
SHAPE = "a red circle on a black background"


def task(reward="brightness", train=(SHAPE,), evals=(SHAPE,)):
    return {"name": "t", "reward": reward, "train_prompts": list(train), "eval_prompts": list(evals), "steps": 1}


def problems(data) -> list[str]:
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    return err.value.problems


# ---------------------------------------------------------------------------------------------
# prompt_adherence and the adherence metric read their prompts: refused at validation


def test_prompt_adherence_with_unreadable_prompts_is_refused(tmp_path):
    data = {"output_dir": str(tmp_path), "model": {"path": EMBEDDED},
            "tasks": [task("prompt_adherence", train=(SHAPE, "a cat", "a dog"))]}
    (line,) = problems(data)
    assert line.startswith("tasks.0.train_prompts: reward 'prompt_adherence' cannot read them: prompt 'a cat'")
    assert "(1 more prompts like it)" in line and "\n" not in line
    data["tasks"] = [task("prompt_adherence")]
    config_from_dict(data)  # shapes captions are fine


def test_the_adherence_metric_needs_readable_eval_prompts(tmp_path):
    """The embedded model ships the shapes classifier, so eval.adherence scores every eval prompt."""
    data = {"output_dir": str(tmp_path), "model": {"path": EMBEDDED}, "tasks": [task(evals=("a photo of an owl",))]}
    (line,) = problems(data)
    assert line.startswith("tasks.0.eval_prompts: the prompt-adherence metric") and "eval.adherence=false" in line
    data["eval"] = {"adherence": False}
    config_from_dict(data)


def test_the_tiny_config_plans_and_validates_its_own_prompts():
    """configs/tiny.json's adherence task has a negative prompt "" that the reward never sees."""
    cfg = load_config("configs/tiny.json")
    assert cfg.sampling.negative_prompt == "" and cfg.tasks[1].reward == "prompt_adherence"


# ---------------------------------------------------------------------------------------------
# User rewards: checked on their first call


def good(images, prompts):
    return images.mean(dim=(1, 2, 3))


def column(images, prompts):
    return images.mean(dim=(1, 2, 3))[:, None]  # [B, 1]: broadcasting would train on nonsense


def detached(images, prompts):
    return torch.tensor(images.mean(dim=(1, 2, 3)).tolist())


def nan(images, prompts):
    return images.mean(dim=(1, 2, 3)) * float("nan")


def listed(images, prompts):
    return images.mean(dim=(1, 2, 3)).tolist()


class WithDevice:
    moved_to = None

    def __call__(self, images, prompts):
        return images.mean(dim=(1, 2, 3))

    def to_device(self, device):
        self.moved_to = device


with_device = WithDevice()


@pytest.mark.parametrize("fn,what", [
    ("column", "returned shape [2, 1] for 2 images; return one score per image, shape [B]"),
    ("detached", "returned scores with no gradient with respect to the images"),
    ("nan", "returned non-finite scores (nan/inf)"),
    ("listed", "returned list, not a tensor"),
])
def test_user_reward_is_checked_on_its_first_call(fn, what):
    reward = rewards.build(f"test_inputs_checked:{fn}")
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    # the first call of a fresh run is the base evaluation (no grad); only the gradient check needs one.
    # A NaN on a first *training* call (after a resume) is left to the bad-step streak
    # (test_reliability_resume.py::test_bad_step_streak_survives_resume).
    with pytest.raises(ConfigError) as err, (torch.enable_grad() if fn == "detached" else torch.no_grad()):
        reward(images, ["a", "b"])
    (line,) = err.value.problems
    assert line.startswith(f"reward 'test_inputs_checked:{fn}' {what}")


def test_good_user_reward_passes_and_keeps_its_attributes():
    reward = rewards.build("test_inputs_checked:good")
    images = torch.rand(2, 3, 8, 8, requires_grad=True)
    with torch.no_grad():  # evaluation first: the gradient is checked later, when there is one
        reward(images, ["a", "b"])
    reward(images, ["a", "b"]).sum().backward()
    assert images.grad is not None
    rewards.place(rewards.build("test_inputs_checked:with_device"), "cpu")  # reaches the user's object
    assert with_device.moved_to == torch.device("cpu")


def test_detached_user_reward_stops_the_run_with_one_line(tmp_path, tiny_model_dirs, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    cfg = {"output_dir": str(tmp_path / "run"), "model": {"path": tiny_model_dirs["sd"]},
           "sampling": {"steps": 2}, "train": {"batch_size": 1}, "eval": {"seeds": [0]},
           "tasks": [task("test_inputs_checked:detached", train=("a red cat",), evals=("a dog",))]}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    (line,) = [x for x in err.splitlines() if x.startswith("ril_fast:")]
    assert "Traceback" not in err and line.startswith("ril_fast: config error: reward 'test_inputs_checked:detached' returned scores with no "
                           "gradient")


# ---------------------------------------------------------------------------------------------
# Relative paths: next to the config file first, then the working directory


def test_relative_paths_are_read_next_to_the_config(tmp_path, tiny_model_dirs, monkeypatch):
    import shutil

    folder = tmp_path / "exp"
    (folder / "prompts").mkdir(parents=True)
    (folder / "prompts" / "train.txt").write_text("a red cat\n")
    shutil.copytree(tiny_model_dirs["sd"], folder / "model")
    (tmp_path / "cwd_prompts.txt").write_text("a blue dog\n")
    conf = folder / "cfg.json"
    conf.write_text(json.dumps({
        "output_dir": "out", "model": {"path": "model"},
        "tasks": [{"name": "t", "reward": "brightness", "train_prompts": "prompts/train.txt",
                   "eval_prompts": "cwd_prompts.txt"}],
    }))
    monkeypatch.chdir(tmp_path)  # not the config's folder
    cfg = load_config(str(conf))
    assert cfg.model.path == str(folder / "model")
    assert cfg.tasks[0].train_prompts == str(folder / "prompts" / "train.txt")
    assert cfg.tasks[0].eval_prompts == "cwd_prompts.txt"  # not next to the config: the working directory's
    assert cfg.output_dir == "out"  # outputs stay relative to where the run is started
    # a path that reaches the same file from both places is kept as written (a rerun's config is unchanged)
    monkeypatch.chdir(folder)
    (folder / "cwd_prompts.txt").write_text("a blue dog\n")  # the eval file is read from the new cwd too
    assert load_config(str(conf)).tasks[0].train_prompts == "prompts/train.txt"


def test_hub_ids_are_not_paths_and_missing_files_say_where_they_were_looked_for(tmp_path, monkeypatch):
    conf = tmp_path / "cfg.json"
    conf.write_text(json.dumps({
        "output_dir": "out", "model": {"path": "stabilityai/stable-diffusion-xl-base-1.0"},
        "tasks": [{"name": "t", "reward": "brightness", "train_prompts": "nope.txt", "eval_prompts": ["x"]}],
    }))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as err:
        load_config(str(conf))
    (line,) = err.value.problems
    assert "'nope.txt' not found (relative paths are read from the config file's folder, then the working " \
           "directory)" in line
    data = json.loads(conf.read_text())
    data["tasks"][0]["train_prompts"] = ["x"]
    conf.write_text(json.dumps(data))
    assert load_config(str(conf)).model.path == "stabilityai/stable-diffusion-xl-base-1.0"
    assert os.getcwd() == str(tmp_path)


@pytest.mark.parametrize("name", sorted(p.name for p in (Path(__file__).resolve().parents[1] / "configs").glob("*.json")))
def test_shipped_configs_load_from_any_working_directory(name, tmp_path, monkeypatch):
    """The shipped configs name their prompt files (and the embedded model) next to themselves, so
    `ril-fast train --config /path/to/configs/x.json` works from anywhere, not only the repo root."""
    path = Path(__file__).resolve().parents[1] / "configs" / name
    monkeypatch.chdir(tmp_path)
    cfg = load_config(str(path))
    for task in cfg.tasks:
        for spec in (task.train_prompts, task.eval_prompts):
            assert isinstance(spec, list) or Path(spec).is_file(), spec
    if not cfg.model.path.count("/") == 1:  # a local folder, not a hub id "org/name"
        assert (Path(cfg.model.path) / "model_index.json").is_file()
