"""Report artefacts: grid geometry and content, plots written as valid PNGs, the markdown table, atomic JSON."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from ril_fast.evaluate_metrics import ril_metrics
from ril_fast.report import (
    GRID_MAX_TILE,
    GRID_MIN_TILE,
    GRID_PADDING,
    grid_layout,
    image_grid,
    plot_reward_curves,
    plot_reward_heatmap,
    results_table_markdown,
    save_png,
    tile_scale,
    write_json_atomic,
)

R = [[5.0, 1.0, 0.0], [3.0, 4.0, 0.0], [2.0, 6.0, 1.0], [1.0, 5.0, 8.0]]
NAMES = ["aesthetic", "hps", "compress"]


def _read_rgb(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        return np.asarray(im.convert("RGB"))


def test_grid_geometry_and_tiles(tmp_path):
    """Small images are enlarged by an integer factor, nearest neighbour: every pixel an exact square."""
    P, H, W = GRID_PADDING, 8, 10
    imgs = torch.rand(5, 3, H, W)
    grid = image_grid(imgs, ncol=3)
    k = int(tile_scale(H, W))
    assert k == 13 and k * W >= GRID_MIN_TILE > (k - 1) * W  # the smallest integer factor reaching the minimum
    arr = _read_rgb(save_png(grid, tmp_path / "sub" / "grid.png"))
    assert arr.shape == (2 * (k * H + P) + P, 3 * (k * W + P) + P, 3)
    want = (imgs.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    layout = grid_layout(5, H, W, 3)
    for i in range(5):
        x, y = layout.tile_box(i // 3, i % 3)
        assert (x, y) == (P + (i % 3) * (k * W + P), P + (i // 3) * (k * H + P))
        big = want[i].repeat(k, axis=0).repeat(k, axis=1)
        np.testing.assert_array_equal(arr[y : y + k * H, x : x + k * W], big, err_msg=f"tile {i}")
    assert (arr[:P] == 255).all() and (arr[:, :P] == 255).all()  # border padding
    x, y = layout.tile_box(1, 2)
    assert (arr[y : y + k * H, x : x + k * W] == 255).all()  # the sixth slot is empty
    assert [p.name for p in (tmp_path / "sub").iterdir()] == ["grid.png"]  # no temp file left behind


def test_large_images_shrink_to_the_maximum_tile():
    assert tile_scale(1024, 1024) * 1024 == GRID_MAX_TILE and tile_scale(256, 256) == 1.0
    grid = image_grid(np.full((1, 3, 1024, 768), 0.5), ncol=1)
    assert grid.size == (round(768 * GRID_MAX_TILE / 1024) + 2 * GRID_PADDING, GRID_MAX_TILE + 2 * GRID_PADDING)


def _dark(region) -> bool:
    return bool((region < 128).any())


def test_grid_labels_title_and_wrapping():
    """Row labels left of their row (long ones wrapped, never over a tile), column labels above, a title on top."""
    imgs = np.full((4, 3, 32, 32), 0.8)
    long = "a purple triangle on a gray background with many more words than one line holds " * 4
    rows, cols = ["a cat", long], ["seed 0", "seed 1"]
    arr = np.asarray(image_grid(imgs, 2, row_labels=rows, col_labels=cols, title="after task 1 (contrast)"))
    layout = grid_layout(4, 32, 32, 2, rows, cols, "after task 1 (contrast)")
    P, th, tw = GRID_PADDING, layout.tile_h, layout.tile_w
    assert arr.shape[:2] == (layout.height, layout.width) and th == 128
    x0, y0 = layout.tile_box(0, 0)
    for r in range(2):
        for c in range(2):
            x, y = layout.tile_box(r, c)
            assert (arr[y : y + th, x : x + tw] == 204).all()  # tiles untouched by any text
    assert _dark(arr[P : layout.line_h + P, :])  # title band
    assert _dark(arr[y0 - layout.line_h - P : y0, x0 : x0 + tw])  # "seed 0" over column 0
    assert _dark(arr[y0 : y0 + layout.line_h, : x0 - P])  # "a cat" left of row 0
    assert not _dark(arr[y0 + layout.line_h : y0 + th, : x0 - P])  # ... on one line
    _, y1 = layout.tile_box(1, 0)
    lines = layout.label_lines[1]
    assert 1 < len(lines) <= th // layout.line_h and lines[-1].endswith("…")  # wrapped, cut to the tile height
    shown = " ".join(lines)[:-1].split()  # the label's first words, the last one possibly cut
    assert shown[:-1] == long.split()[: len(shown) - 1] and long.split()[len(shown) - 1].startswith(shown[-1])
    assert _dark(arr[y1 + (len(lines) - 1) * layout.line_h : y1 + len(lines) * layout.line_h, : x0 - P])
    assert not _dark(arr[:, x0 - P : x0])  # no label spills into the gap before the tiles


def test_grid_rejects_bad_input():
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\)"):
        image_grid(torch.rand(2, 1, 8, 8), ncol=2)
    with pytest.raises(ValueError, match="1 row labels for 2 rows"):
        image_grid(torch.rand(4, 3, 8, 8), ncol=2, row_labels=["a"])
    with pytest.raises(ValueError, match="3 column labels for 2 columns"):
        image_grid(torch.rand(4, 3, 8, 8), ncol=2, col_labels=["a", "b", "c"])
    with pytest.raises(ValueError, match="ncol"):
        image_grid(torch.rand(2, 3, 8, 8), ncol=0)
    with pytest.raises(ValueError, match="NaN"):
        image_grid(torch.full((1, 3, 8, 8), float("nan")), ncol=1)


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


def test_interference_notes_name_the_conflict():
    """The tiny demo's matrix (README, RID): contrast training drags adherence down before it is trained."""
    from ril_fast.report import interference_notes

    R = [[0.124, -0.091, -1.040], [0.164, -1.030, -1.105], [0.154, -0.659, -1.092], [0.153, -0.657, -1.088]]
    notes = interference_notes(R, ["contrast", "adherence", "compressibility"])
    # adherence first (it lost 91 % of its magnitude), then compressibility (6 %); the contrast column's
    # 0.164 -> 0.154 is a quarter of its range: not flagged
    assert len(notes) == 2 and "lowered the compressibility reward from -1.04 to -1.105" in notes[1], notes
    assert "training contrast (task 1) lowered the adherence reward from -0.091 to -1.03" in notes[0]
    assert "before task 2 was trained" in notes[0] and "not a broken trainer" in notes[0]
    # the baseline forgets contrast: an earlier task's reward falls after a later task
    forgot = interference_notes([[0.124, -0.09], [0.164, -1.03], [0.13, -0.02]], ["contrast", "adherence"])
    assert any("training adherence (task 2) lowered the contrast reward from 0.164 to 0.13" in n and "forgetting" in n
               for n in forgot)
    # noise in a flat column says nothing
    assert interference_notes([[0.1240, 1.0], [0.1247, 2.0], [0.1238, 3.0]], ["a", "b"]) == []
