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
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ril_fast.checkpoint import write_bytes_atomic

GRID_PADDING = 4  # pixels between tiles, labels and the border
GRID_BACKGROUND = 255  # white, so labels (drawn in black) stay readable
GRID_MIN_TILE = 128  # smaller images (the embedded model draws 32 px) are enlarged, nearest-neighbour, to this
GRID_MAX_TILE = 512  # larger ones are shrunk to this, so an SDXL grid stays a few MB
GRID_MAX_ROWS = 8  # prompts shown per grid; the title says how many of how many
GRID_FONT_SIZE = 14
GRID_LABEL_WIDTH = 240  # the prompt column; longer prompts wrap onto more lines


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


def _font(size: int = GRID_FONT_SIZE):
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # Pillow >= 10.1 with FreeType: a scalable font
    except (TypeError, OSError, ImportError):
        return ImageFont.load_default()  # the small bitmap font


def _wrap(text: str, font, width: int) -> list[str]:
    """Greedy word wrap to ``width`` pixels; a word wider than a line is cut by characters."""
    lines: list[str] = []
    for word in str(text).split():
        trial = f"{lines[-1]} {word}" if lines else word
        if lines and font.getlength(trial) <= width:
            lines[-1] = trial
            continue
        while font.getlength(word) > width and len(word) > 1:
            cut = max(k for k in range(1, len(word) + 1) if font.getlength(word[:k]) <= width or k == 1)
            lines.append(word[:cut])
            word = word[cut:]
        lines.append(word)
    return lines or [""]


def _clip(text: str, font, width: int) -> str:
    """``text`` cut to ``width`` pixels with an ellipsis (a label longer than its tile is tall)."""
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def tile_scale(h: int, w: int) -> float:
    """How much a grid enlarges (integer, so pixels stay exact) or shrinks an h×w image."""
    side = max(h, w)
    if side < GRID_MIN_TILE:
        return float(math.ceil(GRID_MIN_TILE / side))
    return min(1.0, GRID_MAX_TILE / side)


@dataclass(frozen=True)
class GridLayout:
    """Pixel geometry of a labelled grid: a title band, a header row (column labels), a label column."""

    width: int
    height: int
    tile_h: int
    tile_w: int
    left: int  # x of the first tile column
    top: int  # y of the first tile row
    title_lines: tuple[str, ...] = ()
    label_lines: tuple[tuple[str, ...], ...] = ()
    line_h: int = 0

    def tile_box(self, row: int, col: int) -> tuple[int, int]:
        """(x, y) of the top-left pixel of the tile at ``row``, ``col``."""
        return self.left + col * (self.tile_w + GRID_PADDING), self.top + row * (self.tile_h + GRID_PADDING)


def grid_layout(n: int, h: int, w: int, ncol: int, row_labels: Sequence[str] | None = None,
                col_labels: Sequence[str] | None = None, title: str | None = None) -> GridLayout:
    """Where everything of :func:`image_grid` goes (also for readers of a saved grid: tests, tools)."""
    P = GRID_PADDING
    scale = tile_scale(h, w)
    th, tw = max(1, round(h * scale)), max(1, round(w * scale))
    rows = math.ceil(n / ncol)
    font = _font()
    top_px, bottom_px = font.getbbox("Ag")[1::2]
    line_h = bottom_px + 3
    label_w = 0
    label_lines: tuple = ()
    if row_labels is not None:
        widest = max((font.getlength(str(t)) for t in row_labels), default=0)
        label_w = int(min(GRID_LABEL_WIDTH, math.ceil(widest))) + P
        fit = max(1, th // line_h)
        wrapped = [_wrap(t, font, label_w - P) for t in row_labels]
        label_lines = tuple(tuple(ls if len(ls) <= fit else ls[: fit - 1] + [_clip(" ".join(ls[fit - 1 :]), font,
                                                                                    label_w - P)]) for ls in wrapped)
    width = P + label_w + ncol * (tw + P)
    title_lines = tuple(_wrap(title, font, width - 2 * P)) if title else ()
    top = P + (len(title_lines) * line_h + P if title_lines else 0) + (line_h + P if col_labels is not None else 0)
    return GridLayout(width=width, height=top + rows * (th + P), tile_h=th, tile_w=tw, left=P + label_w, top=top,
                      title_lines=title_lines, label_lines=label_lines, line_h=line_h)


def image_grid(images, ncol: int, row_labels: Sequence[str] | None = None, col_labels: Sequence[str] | None = None,
               title: str | None = None):
    """A PIL image of ``images`` in rows of ``ncol``, each row labelled on the left, each column on top,
    a title above; images smaller than ``GRID_MIN_TILE`` are enlarged by an integer factor (nearest
    neighbour: every pixel becomes an exact square), larger than ``GRID_MAX_TILE`` shrunk.

    Args:
        images: (N, 3, H, W) tensor or array, values in [0, 1] (clamped, then rounded to uint8).
        ncol: images per row, ≥ 1.
        row_labels: one per row (ceil(N / ncol)), wrapped to fit the label column.
        col_labels: ncol strings.
        title: one line (wrapped if wider than the grid).

    Raises:
        ValueError: bad image shape, non-finite pixels, ncol < 1, or a label count that does not fit.
    """
    from PIL import Image, ImageDraw

    tiles = _images_uint8(images)
    n, h, w, _ = tiles.shape
    if ncol < 1:
        raise ValueError(f"image_grid ncol is {ncol}; it must be ≥ 1 (images per row)")
    rows = math.ceil(n / ncol)
    if row_labels is not None and len(row_labels) != rows:
        raise ValueError(f"image_grid got {len(row_labels)} row labels for {rows} rows; pass one per row or None")
    if col_labels is not None and len(col_labels) != ncol:
        raise ValueError(f"image_grid got {len(col_labels)} column labels for {ncol} columns; pass one per column")
    layout = grid_layout(n, h, w, ncol, row_labels, col_labels, title)
    canvas = Image.new("RGB", (layout.width, layout.height), (GRID_BACKGROUND,) * 3)
    for k in range(n):
        tile = Image.fromarray(tiles[k], mode="RGB")
        if (layout.tile_h, layout.tile_w) != (h, w):
            enlarge = layout.tile_h > h
            tile = tile.resize((layout.tile_w, layout.tile_h), Image.NEAREST if enlarge else Image.LANCZOS)
        canvas.paste(tile, layout.tile_box(k // ncol, k % ncol))
    draw, font, P = ImageDraw.Draw(canvas), _font(), GRID_PADDING
    for i, line in enumerate(layout.title_lines):
        draw.text((P, P + i * layout.line_h), line, fill=(0, 0, 0), font=font)
    for c, text in enumerate(col_labels or []):
        x, _ = layout.tile_box(0, c)
        x += max(0, (layout.tile_w - font.getlength(str(text))) / 2)
        draw.text((x, layout.top - layout.line_h - P // 2), str(text), fill=(0, 0, 0), font=font)
    for r, lines in enumerate(layout.label_lines):
        _, y = layout.tile_box(r, 0)
        for i, line in enumerate(lines):
            draw.text((P, y + i * layout.line_h), line, fill=(0, 0, 0), font=font)
    return canvas


def save_png(image, path: str | os.PathLike) -> Path:
    """Write a PIL image as PNG atomically."""
    buf = io.BytesIO()
    image.save(buf, format="PNG")
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
    task_names: Mapping | None = None,
    boundaries: Sequence[float] | None = None,
    title: str | None = None,
) -> Path:
    """Line plot of training metrics vs step, one panel per key, one colour per task, task boundaries dashed.

    Args:
        metrics: records as in metrics.jsonl; a record is plotted for key k when it has ``step_key`` and a
            numeric ``k`` (evaluation records without them are skipped). ``task_key`` picks the colour.
        path: output PNG path.
        keys: metric names, one panel each.
        step_key: the x axis; ``global_step`` puts a whole task sequence side by side.
        task_names: legend label per ``task_key`` value (default "task <value>").
        boundaries: x of each task boundary; default half way between the last step of one task and
            the first of the next.
        title: above the first panel.

    Returns:
        The path written.

    Raises:
        ValueError: keys is empty or no record has any of the keys.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    keys = list(keys)
    if not keys:
        raise ValueError("plot_reward_curves got no keys; pass metric names such as ['reward', 'loss']")
    steps = sorted((r for r in metrics if isinstance(r.get(step_key), (int, float))), key=lambda r: r[step_key])
    found = {k for k in keys for r in steps if isinstance(r.get(k), (int, float))}
    if not found:
        raise ValueError(
            f"plot_reward_curves found none of {keys} in {len(metrics)} records with a {step_key!r} field; "
            "check the metric names in metrics.jsonl"
        )
    if boundaries is None:
        boundaries = [(a[step_key] + b[step_key]) / 2 for a, b in zip(steps, steps[1:])
                      if a.get(task_key) != b.get(task_key)]
    names = dict(task_names or {})
    fig, axes = plt.subplots(len(keys), 1, figsize=(8, 2.6 * len(keys)), sharex=True, squeeze=False)
    tasks = list(dict.fromkeys(r.get(task_key) for r in steps))
    for ax, key in zip(axes[:, 0], keys):
        for i, t in enumerate(tasks):
            pts = [(r[step_key], r[key]) for r in steps
                   if r.get(task_key) == t and isinstance(r.get(key), (int, float)) and math.isfinite(r[key])]
            if pts:
                xs, ys = zip(*pts)
                label = names.get(t, f"task {t}") if t is not None else None
                ax.plot(xs, ys, color=f"C{i % 10}", lw=1.2, marker="." if len(xs) < 30 else None, label=label)
        for b in boundaries:
            ax.axvline(b, color="0.4", ls="--", lw=0.8)
        ax.set_ylabel(key)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(loc="best", fontsize=8)
    axes[-1, 0].xaxis.set_major_locator(MaxNLocator(integer=True))
    axes[-1, 0].set_xlabel(step_key.replace("_", " "))
    if title:
        axes[0, 0].set_title(title)
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


def interference_notes(R, task_names: Sequence[str], limit: int = 3) -> list[str]:
    """Sentences for the terminal when training one task clearly lowered another task's reward.

    A newcomer reads a column that falls as a broken trainer; it is the conflict between rewards that
    reward-incremental learning is about. A drop counts when it is at least half the column's range
    over all rows and 5 % of its largest magnitude (so noise in a flat column says nothing). Largest
    drops first, at most ``limit``.
    """
    M = np.asarray(R, dtype=np.float64)
    names = [str(t) for t in task_names]
    found = []
    for i in range(M.shape[0] - 1):  # row i + 1: the model after training task i (0-based)
        for j in range(M.shape[1]):
            col = M[:, j]
            drop = col[i] - col[i + 1]
            if j == i or not np.isfinite(drop) or drop <= 0.5 * (np.nanmax(col) - np.nanmin(col)):
                continue
            if drop <= 0.05 * np.nanmax(np.abs(col)):
                continue
            what = (f"training {names[i]} (task {i + 1}) lowered the {names[j]} reward from {_fmt(col[i])} to "
                    f"{_fmt(col[i + 1])}")
            if j > i:
                why = (f"before task {j + 1} was trained: these rewards pull the images in different directions, "
                       f"so {names[j]} starts from a worse model. That conflict is what reward-incremental "
                       "learning is about, not a broken trainer.")
            else:
                why = ("after that task had been learnt: forgetting. method.distill_weight (λ) trades how much of "
                       "an earlier reward is kept against how much later tasks can learn.")
            found.append((drop / max(np.nanmax(np.abs(col)), 1e-12), f"Note: {what} {why}"))
    return [text for _, text in sorted(found, key=lambda f: -f[0])[:limit]]


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
