"""Report artefacts from evaluation results: image grids, plots, the results table and JSON files.

Formatting only: every number shown here was computed elsewhere (``evaluate_metrics``, ``evaluate``).
Every file is written to a temporary name in the target folder, fsynced, then moved into place with
``os.replace``, so a crash never leaves a half-written artefact.
"""

from __future__ import annotations

import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from ril_fast.checkpoint import write_bytes_atomic

GRID_PADDING = 2  # pixels between tiles and around the border (torchvision's make_grid default)
GRID_BACKGROUND = 255  # white, so captions (drawn in black) stay readable


def _to_jsonable(obj):
    """Plain Python types for json: numpy/torch scalars and arrays become floats/lists, NaN/inf become None."""
    if isinstance(obj, dict):
        return {str(k): _to_jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_jsonable(v) for v in obj]
    if hasattr(obj, "detach"):  # torch tensor, without importing torch here
        obj = obj.detach().cpu().numpy()
    if isinstance(obj, np.ndarray):
        return _to_jsonable(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, Path):
        return str(obj)
    return obj


def write_json_atomic(path: str | os.PathLike, obj) -> Path:
    """Write ``obj`` as indented JSON atomically (temp file + fsync + ``os.replace``).

    numpy/torch values are converted to plain numbers and lists; NaN and ±inf are written as ``null``
    (JSON has no NaN). Returns the path written.

    Raises:
        ValueError: obj holds something json cannot encode (the message names its type).
    """
    try:
        text = json.dumps(_to_jsonable(obj), indent=2, allow_nan=False)
    except TypeError as e:
        raise ValueError(f"cannot write {path} as JSON: {e}; pass dicts/lists of numbers, strings, arrays") from e
    write_bytes_atomic(path, (text + "\n").encode())
    return Path(path)


def _images_uint8(images) -> np.ndarray:
    """(N, 3, H, W) float in [0, 1] (tensor or array) -> (N, H, W, 3) uint8."""
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    arr = np.asarray(images, dtype=np.float64)
    if arr.ndim != 4 or arr.shape[1] != 3 or arr.shape[0] < 1:
        raise ValueError(f"image grid needs images of shape (N, 3, H, W) with N ≥ 1; got {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("image grid received NaN/inf pixels; images must be finite values in [0, 1]")
    return (np.clip(arr, 0.0, 1.0) * 255.0).round().astype(np.uint8).transpose(0, 2, 3, 1)


def grid_size(n: int, h: int, w: int, nrow: int, caption_height: int = 0) -> tuple[int, int]:
    """(width, height) in pixels of a grid of n tiles of h×w, ``nrow`` tiles per row."""
    cols = min(nrow, n)
    rows = math.ceil(n / nrow)
    return cols * (w + GRID_PADDING) + GRID_PADDING, rows * (h + caption_height + GRID_PADDING) + GRID_PADDING


def save_image_grid(images, path: str | os.PathLike, nrow: int, captions: Sequence[str] | None = None) -> Path:
    """Save images as one PNG grid, ``nrow`` images per row (torchvision's make_grid convention).

    Tile k sits at column ``k % nrow``, row ``k // nrow``; its top-left pixel is at
    ``x = P + col·(W + P)``, ``y = P + row·(H + Hc + P)`` with padding P = ``GRID_PADDING`` and caption band
    height Hc (0 without captions). Captions are drawn in the band under each tile, clipped to the tile width.

    Args:
        images: (N, 3, H, W) tensor or array, values in [0, 1] (clamped, then rounded to uint8).
        path: output PNG path; parent folders are created.
        nrow: images per row, ≥ 1.
        captions: optional N strings.

    Returns:
        The path written.

    Raises:
        ValueError: bad image shape, non-finite pixels, nrow < 1, or a caption count ≠ N.
    """
    from PIL import Image, ImageDraw, ImageFont

    tiles = _images_uint8(images)
    n, h, w, _ = tiles.shape
    if nrow < 1:
        raise ValueError(f"save_image_grid nrow is {nrow}; it must be ≥ 1 (images per row)")
    if captions is not None and len(captions) != n:
        raise ValueError(f"save_image_grid got {len(captions)} captions for {n} images; pass one per image or None")
    font = ImageFont.load_default() if captions is not None else None
    cap_h = 0
    if font is not None:
        top, bottom = font.getbbox("Ag")[1::2]
        cap_h = bottom - top + 4
    width, height = grid_size(n, h, w, nrow, cap_h)
    canvas = np.full((height, width, 3), GRID_BACKGROUND, dtype=np.uint8)
    for k in range(n):
        x = GRID_PADDING + (k % nrow) * (w + GRID_PADDING)
        y = GRID_PADDING + (k // nrow) * (h + cap_h + GRID_PADDING)
        canvas[y : y + h, x : x + w] = tiles[k]
    img = Image.fromarray(canvas, mode="RGB")
    if font is not None:
        draw = ImageDraw.Draw(img)
        for k, text in enumerate(captions):
            x = GRID_PADDING + (k % nrow) * (w + GRID_PADDING)
            y = GRID_PADDING + (k // nrow) * (h + cap_h + GRID_PADDING) + h
            text = str(text)
            while text and draw.textlength(text, font=font) > w:  # clip so captions never overwrite neighbours
                text = text[:-1]
            draw.text((x, y + 1), text, fill=(0, 0, 0), font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    write_bytes_atomic(path, buf.getvalue())
    return Path(path)


def _save_figure(fig, path: str | os.PathLike) -> Path:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
    return Path(path)


def plot_reward_curves(
    metrics: list[dict],
    path: str | os.PathLike,
    keys: Sequence[str] = ("reward", "loss"),
    step_key: str = "step",
    task_key: str = "task",
) -> Path:
    """Line plot of training metrics vs step, one panel per key, one colour per task, task boundaries dashed.

    Args:
        metrics: records as in metrics.jsonl; a record is plotted for key k when it has ``step_key`` and a
            numeric ``k`` (evaluation records without them are skipped). ``task_key`` (index or name)
            colours the line and marks a boundary where it changes.
        path: output PNG path.
        keys: metric names, one panel each.

    Returns:
        The path written.

    Raises:
        ValueError: keys is empty or no record has any of the keys.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = list(keys)
    if not keys:
        raise ValueError("plot_reward_curves got no keys; pass metric names such as ['reward', 'loss']")
    steps = [r for r in metrics if isinstance(r.get(step_key), (int, float))]
    found = {k for k in keys for r in steps if isinstance(r.get(k), (int, float))}
    if not found:
        raise ValueError(
            f"plot_reward_curves found none of {keys} in {len(metrics)} records with a {step_key!r} field; "
            "check the metric names in metrics.jsonl"
        )
    boundaries, prev = [], None
    for r in sorted(steps, key=lambda r: r[step_key]):
        t = r.get(task_key)
        if prev is not None and t != prev:
            boundaries.append(r[step_key])
        prev = t
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.6 * len(keys)), sharex=True, squeeze=False)
    tasks = list(dict.fromkeys(r.get(task_key) for r in steps))
    for ax, key in zip(axes[:, 0], keys):
        for i, t in enumerate(tasks):
            pts = sorted(
                (r[step_key], r[key])
                for r in steps
                if r.get(task_key) == t and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])
            )
            if pts:
                xs, ys = zip(*pts)
                ax.plot(xs, ys, color=f"C{i % 10}", lw=1.2, label=f"task {t}" if t is not None else None)
        for b in boundaries:
            ax.axvline(b, color="0.4", ls="--", lw=0.8)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
    axes[0, 0].legend(loc="best", fontsize=8)
    axes[-1, 0].set_xlabel(step_key)
    return _save_figure(fig, path)


def _row_labels(n: int, task_names: Sequence[str]) -> list[str]:
    return ["base"] + [f"after {task_names[i]}" for i in range(n)]


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    if isinstance(x, int):
        return str(x)
    return f"{x:.4g}"


def plot_reward_heatmap(R, task_names: Sequence[str], path: str | os.PathLike) -> Path:
    """Annotated heatmap of the reward matrix: rows base / after t1 …, columns tasks.

    Colours are min–max scaled per column (reward scales differ by 100×), so colour compares rows within a
    task only; each cell is annotated with its raw value. A constant column is drawn mid-scale.

    Args:
        R: reward matrix (n+1, n).
        task_names: n names.
        path: output PNG path.

    Returns:
        The path written.

    Raises:
        ValueError: R is not (n+1, n) or the name count ≠ n.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    M = np.asarray(R, dtype=np.float64)
    if M.ndim != 2 or M.shape[0] != M.shape[1] + 1 or M.shape[1] < 1:
        raise ValueError(f"reward matrix has shape {M.shape}; expected (n+1, n) with row 0 = base model")
    n = M.shape[1]
    if len(task_names) != n:
        raise ValueError(f"plot_reward_heatmap got {len(task_names)} task names for {n} columns; pass one per task")
    lo, hi = np.nanmin(M, axis=0), np.nanmax(M, axis=0)
    span = np.where(hi > lo, hi - lo, 1.0)
    colour = np.where(hi > lo, (M - lo) / span, 0.5)
    fig, ax = plt.subplots(figsize=(1.6 * n + 2.5, 0.6 * (n + 1) + 1.5))
    ax.imshow(colour, cmap="viridis", vmin=0.0, vmax=1.0, aspect="auto")
    for i in range(n + 1):
        for j in range(n):
            ax.text(
                j,
                i,
                _fmt(float(M[i, j])),
                ha="center",
                va="center",
                fontsize=9,
                color="black" if colour[i, j] > 0.6 else "white",
            )
    ax.set_xticks(range(n), [str(t) for t in task_names])
    ax.set_yticks(range(n + 1), _row_labels(n, task_names))
    ax.set_xlabel("evaluated task (colour: per-column min–max)")
    ax.set_title("reward matrix")
    return _save_figure(fig, path)


def _md_row(cells) -> str:
    return "| " + " | ".join(cells) + " |"


def results_table_markdown(results: dict) -> str:
    """Markdown summary of a run: reward matrix, continual-learning metrics, drift and wall time.

    Args:
        results: dict with
            ``task_names`` (n str), ``reward_matrix`` ((n+1)×n), and optionally
            ``title`` (str), ``metrics`` (a dict holding the keys of :func:`ril_fast.evaluate_metrics.ril_metrics`),
            ``drift`` ({metric name: list with one value per matrix row (n+1) or per trained row (n), or a
            scalar}), ``wall_time_s`` (float, or {"total": float, "per_task": [n floats]}).

    Returns:
        Markdown text, ending with a newline.

    Raises:
        ValueError: a required key is missing or shapes disagree.
    """
    for key in ("task_names", "reward_matrix"):
        if key not in results:
            raise ValueError(f"results_table_markdown needs key {key!r}; got keys {sorted(results)}")
    names = [str(t) for t in results["task_names"]]
    M = np.asarray(results["reward_matrix"], dtype=np.float64)
    n = len(names)
    if M.shape != (n + 1, n):
        raise ValueError(f"reward_matrix has shape {M.shape}; expected {(n + 1, n)} for {n} task names")
    rows = _row_labels(n, names)
    out = [f"## {results['title']}", ""] if results.get("title") else []
    out += ["**Reward matrix** (row = model after training, column = evaluated task; raw rewards)", ""]
    out += [_md_row(["model", *names]), _md_row(["---"] * (n + 1))]
    out += [_md_row([rows[i], *(_fmt(float(v)) for v in M[i])]) for i in range(n + 1)]

    m = results.get("metrics")
    if m and m.get("plasticity"):
        out += ["", "**Continual-learning metrics** (raw reward units; normalised = divided by the std of the task's "
                "reward over the base model's eval images)", ""]
        trained = m["plasticity"]["tasks"]
        old = m["forgetting"]["tasks"]
        cells = {name: ["–"] * 5 for name in trained}
        for name, p, pn in zip(trained, m["plasticity"]["per_task"], m["normalized"]["plasticity"]["per_task"]):
            cells[name][0], cells[name][1] = _fmt(p), _fmt(pn)
        for name, f, fn, r in zip(old, m["forgetting"]["per_task"], m["forgetting"]["normalized_per_task"],
                                  m["retention"]["per_task"]):
            cells[name][2], cells[name][3], cells[name][4] = _fmt(f), _fmt(fn), _fmt(r)
        out += [_md_row(["task", "plasticity", "normalised", "forgetting", "normalised", "retention"]),
                _md_row(["---"] * 6)]
        out += [_md_row([name, *cells[name]]) for name in trained]
        out += ["", "plasticity P_j = R[j][j] − R[j−1][j]; forgetting F_j = max over rows j..n−1 − final; "
                "retention = (final − R[j−1][j]) / P_j", ""]
        for label, value in (
            ("backward transfer (raw)", m.get("bwt")),
            ("backward transfer (normalised)", m["normalized"].get("bwt")),
            ("average final reward (raw)", m.get("average_final_reward")),
            ("average final reward (normalised)", m["normalized"].get("average_final_reward")),
        ):
            out.append(f"- {label}: {_fmt(value)}")

    drift = results.get("drift")
    if drift:
        out += ["", "**Structure drift** (fixed seeds, compared with the base model's images)", ""]
        lists = {k: v for k, v in drift.items() if isinstance(v, (list, tuple, np.ndarray))}
        for k, v in drift.items():
            if k not in lists:
                out.append(f"- {k}: {_fmt(v)}")
        if lists:
            out += ["", _md_row(["metric", *rows]), _md_row(["---"] * (n + 2))]
            for k, v in lists.items():
                v = list(v)
                if len(v) == n:  # one value per trained model: the base row is not compared with itself
                    v = [None, *v]
                if len(v) != n + 1:
                    raise ValueError(f"drift[{k!r}] has {len(v)} values; expected {n} (after each task) or {n + 1}")
                out.append(_md_row([k, *(_fmt(None if x is None else float(x)) for x in v)]))

    wt = results.get("wall_time_s")
    if wt is not None:
        out.append("")
        if isinstance(wt, dict):
            out.append(f"**Wall time**: {_fmt(wt.get('total'))} s total")
            per = wt.get("per_task")
            if per:
                out.append("; ".join(f"{t}: {_fmt(float(s))} s" for t, s in zip(names, per)))
        else:
            out.append(f"**Wall time**: {_fmt(float(wt))} s")
    return "\n".join(out) + "\n"
