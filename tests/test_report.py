"""Report artefacts: grid geometry and content, plots written as valid PNGs, the markdown table, atomic JSON."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ril_fast.evaluate_metrics import ril_metrics
from ril_fast.report import (
    GRID_PADDING,
    plot_reward_curves,
    plot_reward_heatmap,
    results_table_markdown,
    save_image_grid,
    write_json_atomic,
)

R = [[5.0, 1.0, 0.0], [3.0, 4.0, 0.0], [2.0, 6.0, 1.0], [1.0, 5.0, 8.0]]
NAMES = ["aesthetic", "hps", "compress"]


def _read_rgb(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_grid_geometry_and_tiles(tmp_path):
    P, H, W = GRID_PADDING, 8, 10
    imgs = torch.rand(5, 3, H, W)
    path = save_image_grid(imgs, tmp_path / "sub" / "grid.png", nrow=3)
    arr = _read_rgb(path)
    assert arr.shape == (2 * (H + P) + P, 3 * (W + P) + P, 3)
    want = (imgs.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for k in range(5):
        y, x = P + (k // 3) * (H + P), P + (k % 3) * (W + P)
        np.testing.assert_array_equal(arr[y : y + H, x : x + W], want[k], err_msg=f"tile {k}")
    assert (arr[:P] == 255).all() and (arr[:, :P] == 255).all()  # border padding
    y, x = P + (H + P), P + 2 * (W + P)
    assert (arr[y : y + H, x : x + W] == 255).all()  # the sixth slot is empty
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["grid.png"]  # no temp file left behind


def test_grid_with_captions(tmp_path):
    imgs = np.full((2, 3, 16, 40), 0.5)
    plain = _read_rgb(save_image_grid(imgs, tmp_path / "a.png", nrow=2))
    cap = _read_rgb(save_image_grid(imgs, tmp_path / "b.png", nrow=2, captions=["cat", "a very long caption here"]))
    assert cap.shape[1] == plain.shape[1] and cap.shape[0] > plain.shape[0]
    P = GRID_PADDING
    np.testing.assert_array_equal(cap[P : P + 16, P : P + 40], 128)  # tile untouched by the caption
    band = cap[P + 16 : cap.shape[0] - P, P : P + 40]
    assert (band < 128).any()  # dark caption text was drawn under the tile
    gap = cap[:, P + 40 : 2 * P + 40]
    assert (gap == 255).all()  # the clipped long caption never spills into the gap between tiles


def test_grid_rejects_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        save_image_grid(torch.rand(2, 1, 8, 8), tmp_path / "x.png", nrow=2)
    with pytest.raises(ValueError, match="1 captions for 2 images"):
        save_image_grid(torch.rand(2, 3, 8, 8), tmp_path / "x.png", nrow=2, captions=["a"])
    with pytest.raises(ValueError, match="nrow"):
        save_image_grid(torch.rand(2, 3, 8, 8), tmp_path / "x.png", nrow=0)
    with pytest.raises(ValueError, match="NaN"):
        save_image_grid(torch.full((1, 3, 8, 8), float("nan")), tmp_path / "x.png", nrow=1)
    assert not (tmp_path / "x.png").exists()


def test_heatmap_png(tmp_path):
    path = plot_reward_heatmap(R, NAMES, tmp_path / "heat.png")
    arr = _read_rgb(path)
    assert arr.shape[0] > 50 and arr.shape[1] > 50
    assert arr.std() > 10  # not a blank canvas
    with pytest.raises(ValueError, match="2 task names for 3 columns"):
        plot_reward_heatmap(R, NAMES[:2], tmp_path / "bad.png")
    # A constant column must not divide by zero.
    plot_reward_heatmap([[1.0, 2.0], [1.0, 3.0], [1.0, 4.0]], ["a", "b"], tmp_path / "const.png")


def test_reward_curves_png(tmp_path):
    metrics = [{"step": s, "task": s // 5, "reward": float(s % 5), "loss": -float(s % 5)} for s in range(10)]
    metrics.append({"kind": "eval", "task": 0, "rewards": [1.0, 2.0]})  # eval record without step: skipped
    arr = _read_rgb(plot_reward_curves(metrics, tmp_path / "curves.png", keys=["reward", "loss"]))
    assert arr.shape[0] > 100 and arr.std() > 10
    with pytest.raises(ValueError, match="found none of"):
        plot_reward_curves(metrics, tmp_path / "none.png", keys=["kl"])
    assert not (tmp_path / "none.png").exists()


def _table_rows(md: str, first_cell: str) -> list[str]:
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and cells[0] == first_cell:
            return cells[1:]
    raise AssertionError(f"no row {first_cell!r} in\n{md}")


def test_results_table_markdown():
    results = {
        "title": "rid on tiny",
        "task_names": NAMES,
        "reward_matrix": R,
        "metrics": ril_metrics(R, NAMES, [1.0, 2.0, 4.0]),
        "drift": {"ssim_to_base": [0.9, 0.8, 0.7], "classifier_acc": [1.0, 0.95, 0.9, 0.85], "mean_ssim": 0.8},
        "wall_time_s": {"total": 123.4, "per_task": [40.0, 41.0, 42.4]},
    }
    md = results_table_markdown(results)
    assert md.startswith("## rid on tiny")
    assert _table_rows(md, "model") == NAMES
    assert _table_rows(md, "base") == ["5", "1", "0"]
    assert _table_rows(md, "after hps") == ["2", "6", "1"]
    assert _table_rows(md, "after compress") == ["1", "5", "8"]
    # by hand: P = (3-5, 6-4, 8-1); F = (max(3,2)-1, 6-5) over rows after each task only; retention of hps
    # (5-4)/2, of aesthetic undefined (P < 0); normalised by the scales 1, 2, 4
    assert _table_rows(md, "task") == ["plasticity", "normalised", "forgetting", "normalised", "retention"]
    assert _table_rows(md, "aesthetic") == ["-2", "-2", "2", "2", "–"]
    assert _table_rows(md, "hps") == ["2", "1", "1", "0.5", "0.5"]
    assert _table_rows(md, "compress") == ["7", "1.75", "–", "–", "–"]
    assert _table_rows(md, "ssim_to_base") == ["–", "0.9", "0.8", "0.7"]
    assert _table_rows(md, "classifier_acc") == ["1", "0.95", "0.9", "0.85"]
    assert "- mean_ssim: 0.8" in md
    assert "- backward transfer (raw): -1.5" in md
    assert "123.4 s total" in md and "compress: 42.4 s" in md


def test_results_table_minimal_and_errors():
    md = results_table_markdown({"task_names": ["a"], "reward_matrix": [[0.25], [0.5]]})
    assert _table_rows(md, "after a") == ["0.5"]
    assert "Continual-learning metrics" not in md
    with pytest.raises(ValueError, match="needs key 'reward_matrix'"):
        results_table_markdown({"task_names": ["a"]})
    with pytest.raises(ValueError, match=r"expected \(3, 2\)"):
        results_table_markdown({"task_names": ["a", "b"], "reward_matrix": [[0.0], [1.0]]})
    with pytest.raises(ValueError, match="drift"):
        results_table_markdown({"task_names": ["a"], "reward_matrix": [[0.0], [1.0]], "drift": {"s": [1, 2, 3]}})


def test_write_json_atomic(tmp_path):
    path = tmp_path / "out" / "results.json"
    obj = {"R": np.arange(4.0).reshape(2, 2), "t": torch.tensor([1.5]), "x": np.float32(0.5), "nan": float("nan")}
    write_json_atomic(path, obj)
    assert json.loads(path.read_text()) == {"R": [[0.0, 1.0], [2.0, 3.0]], "t": [1.5], "x": 0.5, "nan": None}
    # A failed write leaves the previous file intact and no temp file behind.
    with pytest.raises(ValueError, match="cannot write"):
        write_json_atomic(path, {"bad": object()})
    assert json.loads(path.read_text())["x"] == 0.5
    assert os.listdir(path.parent) == ["results.json"]
