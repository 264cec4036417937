"""End to end: the CLI trains a tiny 2-task RID run; its outputs are complete and consistent."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from ril_fast.metrics_log import read_metrics
from ril_fast.train import main


def write_cfg(path, model_dir, out, **method):
    path.write_text(json.dumps({
        "output_dir": str(out),
        "seed": 3,
        "model": {"path": str(model_dir)},
        "method": {"name": "rid", **method},
        "sampling": {"steps": 2, "guidance_scale": 2.0},
        "train": {"batch_size": 1, "lr": 5e-2},
        "tasks": [
            {"name": "bright", "reward": "brightness", "train_prompts": ["a red circle"],
             "eval_prompts": ["a blue square"], "steps": 2},
            {"name": "smooth", "reward": "smoothness", "train_prompts": ["a green star"],
             "eval_prompts": ["a blue square"], "steps": 2},
        ],
        "eval": {"seeds": [5, 6]},
    }))
    return path


@pytest.fixture(scope="module")
def finished_run(tiny_model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    cfg = write_cfg(root / "cfg.json", tiny_model_dirs["sd"], root / "run")
    assert main(["--config", str(cfg)]) == 0
    return root / "run", cfg


def test_results_json(finished_run):
    run, _ = finished_run
    res = json.loads((run / "results.json").read_text())
    assert res["tasks"] == ["bright", "smooth"]
    R = np.array(res["reward_matrix"])
    assert R.shape == (3, 2) and np.isfinite(R).all()
    # Independent recomputation of docs/design.md §3: P_j = R[j][j] − R[j−1][j]; F_1 over the rows after task 1 only.
    assert res["plasticity"]["per_task"] == pytest.approx([R[1, 0] - R[0, 0], R[2, 1] - R[1, 1]])
    assert res["forgetting"]["per_task"] == pytest.approx([R[1, 0] - R[2, 0]])
    assert res["bwt"] == pytest.approx(R[2, 0] - R[1, 0])
    assert res["average_final_reward"] == pytest.approx(R[2].mean())
    # The scale of each reward: its std over the base model's eval images, recomputed from the saved images.
    from ril_fast.rewards import build

    base = load_file(run / "eval" / "base_images.safetensors")
    for name, reward, scale in zip(res["tasks"], ("brightness", "smoothness"), res["reward_scales"]["values"]):
        scores = build(reward)(base[name], ["a blue square"] * len(base[name])).double()
        assert len(scores) == 2 and scale == pytest.approx(float(scores.std()), rel=1e-5)
    assert res["forgetting"]["normalized_per_task"] == pytest.approx(
        [(R[1, 0] - R[2, 0]) / res["reward_scales"]["values"][0]])
    assert res["normalized"]["reward_matrix"][0] == [0.0, 0.0]
    assert len(res["structure_drift"]) == 3 and res["structure_drift"][0] == pytest.approx(1.0)
    assert len(res["structure"]["to_base"]) == len(res["structure"]["to_previous"]) == 3
    assert res["wall_seconds"] > 0 and res["config"]["method"]["name"] == "rid"


def test_metrics_and_artefacts(finished_run):
    run, _ = finished_run
    metrics = read_metrics(run)
    train = [m for m in metrics if m["kind"] == "train"]
    assert [(m["task"], m["step"]) for m in train] == [(1, 1), (1, 2), (2, 1), (2, 2)]
    assert all("distill" not in m for m in train if m["task"] == 1)  # no teacher on task 1 by default
    assert all("distill" in m for m in train if m["task"] == 2)
    assert [m["row"] for m in metrics if m["kind"] == "eval"] == [0, 1, 2]
    from ril_fast.config import load_config
    from ril_fast.report import grid_layout
    from ril_fast.results import grid_title

    # both tasks evaluate "a blue square" at the eval seeds: the grid shows each image once, enlarged and labelled
    cfg = load_config(run / "config.json")
    seeds = cfg.eval.seeds
    for row, name in enumerate(("base", "after_task_01", "after_task_02")):
        want = grid_layout(len(seeds), 16, 16, len(seeds), ["a blue square"], [f"seed {s}" for s in seeds],
                           grid_title(cfg, row))
        with Image.open(run / "grids" / f"{name}.png") as grid:
            assert grid.size == (want.width, want.height) and want.tile_h == 128
    for name in ("reward_curves", "reward_matrix", "reward_curve_task_01", "reward_curve_task_02"):
        assert (run / "plots" / f"{name}.png").stat().st_size > 1000
    for task in (1, 2):
        assert (run / "adapters" / f"task_{task:02d}" / "pytorch_lora_weights.safetensors").is_file()
    assert list((run / "tensorboard").iterdir())


def test_rerun_resumes_instead_of_retraining(finished_run, capsys):
    run, cfg = finished_run
    before = (run / "results.json").read_text()
    n_lines = len(read_metrics(run))
    assert main(["--config", str(cfg)]) == 0
    assert len(read_metrics(run)) == n_lines  # nothing trained or evaluated again
    after = json.loads((run / "results.json").read_text())
    assert after["reward_matrix"] == json.loads(before)["reward_matrix"]


def test_other_config_in_same_dir_is_refused(finished_run, tmp_path, capsys):
    run, cfg = finished_run
    data = json.loads(cfg.read_text())
    data["method"]["name"] = "baseline"
    other = tmp_path / "other.json"
    other.write_text(json.dumps(data))
    assert main(["--config", str(other)]) == 2
    assert "different config" in capsys.readouterr().err


def test_load_pipeline_reproduces_trainer_images(finished_run):
    """The exported adapters in a stock diffusers pipeline draw the trainer's final eval image."""
    from diffusers import DDIMScheduler

    import ril_fast
    from ril_fast.evaluate import eval_noise

    run, _ = finished_run
    pipe = ril_fast.load_pipeline(run, task=2)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    z = eval_noise(lambda n: (n, 4, 16, 16), 5, "a blue square")
    image = pipe(["a blue square"], num_inference_steps=2, guidance_scale=2.0, latents=z, output_type="pt").images
    from ril_fast.config import load_config
    from ril_fast.report import grid_layout, tile_scale
    from ril_fast.results import grid_title

    grid = np.asarray(Image.open(run / "grids" / "after_task_02.png").convert("RGB")).astype(np.float32) / 255
    h, w = image.shape[-2:]
    k = int(tile_scale(h, w))  # the grid enlarges by whole pixels: every k-th pixel is the image's own
    cfg = load_config(run / "config.json")
    seeds = cfg.eval.seeds
    layout = grid_layout(len(seeds), h, w, len(seeds), ["a blue square"], [f"seed {s}" for s in seeds],
                         grid_title(cfg, 2))
    x, y = layout.tile_box(0, seeds.index(5))
    tile = torch.from_numpy(grid[y : y + k * h : k, x : x + k * w : k]).permute(2, 0, 1)
    assert (image[0] - tile).abs().max() <= 2 / 255


def test_idle_rewards_wait_on_the_cpu_during_gpu_training(monkeypatch):
    """memory.idle_rewards = cpu on a GPU run: while task i trains only its reward is on the device
    (idle ones are moved first, so a model shared by two tasks ends on the device); in evaluation
    each reward comes over for its own scoring only. On a CPU run nothing moves."""
    from types import SimpleNamespace

    from ril_fast import run_state, train
    from ril_fast.config import config_from_dict

    class Stub:
        def __init__(self, name, log):
            self.name, self.log = name, log

        def to_device(self, device):
            self.log.append((self.name, device.type))

    log = []
    cfg = config_from_dict({"eval": {"adherence": False},
                            "tasks": [{"name": n, "reward": "brightness", "train_prompts": ["a"],
                                       "eval_prompts": ["b"]} for n in "xyz"]})
    run = SimpleNamespace(cfg=cfg, device=torch.device("cuda"), rewards=[Stub(n, log) for n in "xyz"])
    train.stage_rewards(run, 1)
    assert log == [("x", "cpu"), ("z", "cpu"), ("y", "cuda")]
    assert run_state.idle_reward_device(cfg, torch.device("cpu")) is None
    cfg.memory.idle_rewards = "device"
    log.clear()
    train.stage_rewards(run, 1)
    assert log == [] and run_state.idle_reward_device(cfg, torch.device("cuda")) is None

    # evaluation: place on the device, score, place back (the sampler is stubbed out)
    from ril_fast import evaluate

    log.clear()
    calls = []

    class Scored(Stub):
        def __call__(self, images, prompts):
            calls.append((self.name, self.log[-1]))
            return images.mean((1, 2, 3))

    scorers = [Scored(n, log) for n in "xyz"]
    monkeypatch.setattr(evaluate, "sample_images", lambda *a, **k: (torch.rand(2, 3, 4, 4), ["p", "p"]))
    evaluate.evaluate_all_tasks(None, cfg, None, [["p"]] * 3, scorers, torch.device("cpu"), None,
                                idle_device=torch.device("meta"))
    assert calls == [(n, (n, "cpu")) for n in "xyz"]  # each scored while on the scoring device
    assert log == [(n, d) for n in "xyz" for d in ("cpu", "meta")]


def test_appending_tasks_continues_the_run(finished_run, tiny_model_dirs, tmp_path, capsys):
    """Train task 1 alone, then rerun with task 2 appended to the config: the run goes on from its
    checkpoint, the earlier rows are evaluated on the new task (row r = first r adapters), and the
    results equal those of the straight two-task run."""
    straight, cfg2 = finished_run
    data = json.loads(cfg2.read_text())
    data["output_dir"] = str(tmp_path / "run")
    first = dict(data, tasks=data["tasks"][:1])
    (tmp_path / "one.json").write_text(json.dumps(first))
    assert main(["--config", str(tmp_path / "one.json")]) == 0
    assert json.loads((tmp_path / "run" / "results.json").read_text())["tasks"] == ["bright"]
    (tmp_path / "two.json").write_text(json.dumps(data))
    capsys.readouterr()
    assert main(["--config", str(tmp_path / "two.json")]) == 0
    assert "eval new tasks" in capsys.readouterr().err  # rows 0..1 evaluated on the appended task
    got = json.loads((tmp_path / "run" / "results.json").read_text())
    want = json.loads((straight / "results.json").read_text())
    assert got["tasks"] == want["tasks"] == ["bright", "smooth"]
    np.testing.assert_allclose(np.array(got["reward_matrix"]), np.array(want["reward_matrix"]), rtol=1e-5, atol=1e-7)
    for key in ("per_task", "mean"):
        np.testing.assert_allclose(got["forgetting"][key], want["forgetting"][key], rtol=1e-4, atol=1e-6)
    for task in ("task_01", "task_02"):
        name = "pytorch_lora_weights.safetensors"
        a = load_file(tmp_path / "run" / "adapters" / task / name)
        b = load_file(straight / "adapters" / task / name)
        assert all(torch.allclose(a[k], b[k], rtol=1e-5, atol=1e-7) for k in b)
    # a single-LoRA method cannot be extended (its earlier states are gone), and says so
    base = dict(first, output_dir=str(tmp_path / "base"), method={"name": "baseline"})
    (tmp_path / "b1.json").write_text(json.dumps(base))
    assert main(["--config", str(tmp_path / "b1.json")]) == 0
    (tmp_path / "b2.json").write_text(json.dumps(dict(base, tasks=data["tasks"])))
    capsys.readouterr()
    assert main(["--config", str(tmp_path / "b2.json")]) == 2
    assert "needs one adapter per task" in capsys.readouterr().err
