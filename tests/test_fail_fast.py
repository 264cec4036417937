"""A model or reward weights that are not on this machine stop ``train`` in seconds, before anything runs.

Before: ``python -m ril_fast.train --config configs/sd15.json`` without the hub planned memory, created
the run folder, then spent minutes in hub retries. Now: one line per missing item with the
``hf download`` command, exit 2, no run folder, nothing planned or loaded.
"""

import shutil

import huggingface_hub
import huggingface_hub.constants
import pytest

from ril_fast import memory, train
from ril_fast.config import ConfigError, check_available, config_from_dict
from ril_fast.models import check_model_available, load_models
from ril_fast.train import main

HUB_ID = "some-owner/some-model"


def config(model, out, reward="brightness", **extra):
    return {"output_dir": str(out), "model": {"path": model},
            "tasks": [{"name": "a", "reward": reward, "train_prompts": ["x"], "eval_prompts": ["x"]}], **extra}


@pytest.fixture
def nothing_heavy(monkeypatch):
    """Planning and model loading must not be reached."""
    def reached(*_, **__):
        raise AssertionError("planned or loaded before the inputs were checked")

    monkeypatch.setattr(memory, "plan", reached)
    monkeypatch.setattr("ril_fast.models.load_models", reached)


@pytest.fixture
def online_without_network(monkeypatch, tmp_path):
    """HF_HUB_OFFLINE unset, an empty HF cache, and a hub that cannot be reached (as on this machine)."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    calls = []

    def model_info(self, repo_id, **kwargs):
        calls.append((repo_id, kwargs.get("timeout")))
        raise OSError("[Errno -2] Name or service not known")

    monkeypatch.setattr(huggingface_hub.HfApi, "model_info", model_info)
    return calls


def run_cli(tmp_path, data, capsys):
    import json

    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(data))
    code = main(["--config", str(path)])
    return code, capsys.readouterr().err.strip().splitlines()


def test_missing_hub_model_fails_in_one_request(tmp_path, capsys, nothing_heavy, online_without_network):
    out = tmp_path / "run"
    code, lines = run_cli(tmp_path, config(HUB_ID, out, memory={"budget_gib": 8.0}), capsys)
    assert code == 2 and len(lines) == 1
    assert f"hf download {HUB_ID}" in lines[0] and "HF_HUB_OFFLINE=1" in lines[0]
    assert online_without_network == [(HUB_ID, 10.0)]  # one request with a timeout, no retries
    assert not out.exists()  # no empty run folder left behind


def test_missing_reward_weights_fail_before_the_run_folder(tmp_path, capsys, nothing_heavy, tiny_model_dirs,
                                                           online_without_network):
    out = tmp_path / "run"
    data = config(tiny_model_dirs["sd"], out, reward="aesthetic")
    data["tasks"].append({"name": "b", "reward": "aesthetic", "train_prompts": ["x"], "eval_prompts": ["x"]})
    code, lines = run_cli(tmp_path, data, capsys)
    assert code == 2 and not out.exists()
    # the CLIP folder and the MLP head, once each although two tasks use them
    assert len(lines) == 2 and all(line.startswith("ril_fast: config error: tasks.0.reward_options") for line in lines)
    assert "`hf download openai/clip-vit-large-patch14`" in lines[0]
    assert "`hf download trl-lib/ddpo-aesthetic-predictor aesthetic-model.pth`" in lines[1]


def fake_snapshot(cache, repo_id, model_dir, parts=None):
    """The layout ``hf download`` leaves in the HF cache: refs/main names a snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    for part in parts or [p.name for p in model_dir.iterdir()]:
        src = model_dir / part
        (shutil.copytree if src.is_dir() else shutil.copy)(src, snap / part)
    return snap


def test_cached_hub_model_loads_without_the_hub(tmp_path, tiny_model_dirs, online_without_network):
    from pathlib import Path

    import huggingface_hub.constants as c

    snap = fake_snapshot(Path(c.HF_HUB_CACHE), HUB_ID, Path(tiny_model_dirs["sd"]))
    assert check_model_available(HUB_ID) is None
    models = load_models(HUB_ID)  # from the snapshot folder: the hub (which raises) is never asked
    assert models.path == str(snap) and online_without_network == []


def test_incomplete_cached_model_is_named(tmp_path, tiny_model_dirs, online_without_network):
    from pathlib import Path

    import huggingface_hub.constants as c

    fake_snapshot(Path(c.HF_HUB_CACHE), HUB_ID, Path(tiny_model_dirs["sd"]), parts=["model_index.json"])
    problem = check_model_available(HUB_ID)
    assert "cached copy is incomplete" in problem and f"hf download {HUB_ID}" in problem


def test_build_run_checks_before_planning(tmp_path, nothing_heavy, online_without_network):
    cfg = config_from_dict(config(HUB_ID, tmp_path / "run", memory={"budget_gib": 8.0}))
    with pytest.raises(ConfigError, match="hf download"):
        train.build_run(cfg)
    with pytest.raises(ConfigError, match="hf download"):
        check_available(cfg)
