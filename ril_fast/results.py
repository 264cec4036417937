"""A run's results: each row of the reward matrix evaluated (``evaluate_row``), ``results.json``, the
image grids and the plots. Rows: the base model, then the model after each task (docs/design.md §3).
"""

from __future__ import annotations

import datetime
import logging
import platform
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from ril_fast import checkpoint as ckpt
from ril_fast import engine as eng
from ril_fast import lora, report
from ril_fast.config import Config
from ril_fast.evaluate import eval_image_count, evaluate_all_tasks, structure_drift, structure_kept
from ril_fast.evaluate_metrics import ril_metrics
from ril_fast.metrics_log import read_metrics
from ril_fast.run_state import FatalRunError, Run, global_step, idle_reward_device, model_label, wall_total

_log = logging.getLogger("ril_fast")


def evaluate_row(run: Run, row: int) -> None:
    """Evaluate every task with the current model; row 0 is the base model."""
    cfg = run.cfg
    run.stop.where = f"while evaluating {model_label(cfg, row)}"
    with tqdm(total=eval_image_count(cfg, run.eval_prompts), desc=f"eval {model_label(cfg, row)}",
              disable=not run.is_main) as bar:
        result = evaluate_all_tasks(run.models, cfg, run.prompt_cache, run.eval_prompts, run.rewards, run.device,
                                    run.shape, adherence_fn=run.adherence_fn, progress=bar,
                                    idle_device=idle_reward_device(cfg, run.device))
    res = run.results
    res.setdefault("tasks", [t.name for t in cfg.tasks])
    res.setdefault("reward_matrix", []).append(result.rewards)
    if row == 0:
        res["reward_base_stats"] = base_stats(cfg, result)
        run.base_images = {k: v.clone() for k, v in result.images.items()}
        if run.is_main:
            (run.out / "eval").mkdir(parents=True, exist_ok=True)
            ckpt.save_tensors_atomic(run.out / "eval" / "base_images.safetensors", run.base_images)
    res.setdefault("structure_drift", []).append(structure_drift(result.images, run.base_images))
    structure = res.setdefault("structure", {"to_base": [], "to_previous": []})
    structure["to_base"].append(structure_kept(result.images, run.base_images))
    structure["to_previous"].append(structure_kept(result.images, row_images(run, row - 1)) if row else 1.0)
    run.previous_images = (row, {k: v.clone() for k, v in result.images.items()})
    if run.is_main:  # two slots, so a run killed while writing row r still holds row r − 1
        ckpt.save_tensors_atomic(_row_images_path(run, row),
                                 {**run.previous_images[1], "__row__": torch.tensor(row)})
    if result.adherence is not None:
        res.setdefault("prompt_adherence", []).append(result.adherence)
    if run.is_main:
        if cfg.eval.grid:
            save_eval_grid(run, row, result)
        run.log.write({"kind": "eval", "row": row, **{f"reward/{t.name}": r for t, r in zip(cfg.tasks, result.rewards)},
                       "structure_drift": res["structure_drift"][-1]}, tb_step=global_step(cfg, row - 1))
    ckpt.fault_point("eval")


def grid_title(cfg: Config, row: int) -> str:
    return (f"{model_label(cfg, row).removeprefix('the ')}: method {cfg.method.name}, {cfg.eval.steps or cfg.sampling.steps} DDIM steps, "
            f"CFG {cfg.sampling.guidance_scale}")


def save_eval_grid(run: Run, row: int, result) -> None:
    """``grids/base.png`` / ``grids/after_task_NN.png`` and TensorBoard's ``eval/images`` at the row's
    global step: each distinct (prompt, seed) once (tasks may share eval prompts), prompts down, seeds across."""
    cfg, seeds = run.cfg, run.cfg.eval.seeds
    pairs: dict[tuple[str, int], torch.Tensor] = {}
    for images, prompts in result.image_sets():  # images in (prompt, seed) order, seeds fastest
        for k, (image, prompt) in enumerate(zip(images, prompts)):
            pairs.setdefault((prompt, seeds[k % len(seeds)]), image)
    prompts = list(dict.fromkeys(p for p, _ in pairs))
    shown = prompts[: report.GRID_MAX_ROWS]
    title = grid_title(cfg, row) + (f"; {len(shown)} of {len(prompts)} prompts" if shown != prompts else "")
    grid = report.image_grid(torch.stack([pairs[(p, s)] for p in shown for s in seeds]), len(seeds),
                             row_labels=shown, col_labels=[f"seed {s}" for s in seeds], title=title)
    report.save_png(grid, run.out / "grids" / f"{'base' if row == 0 else f'after_task_{row:02d}'}.png")
    run.log.image("eval/images", np.asarray(grid), global_step(cfg, row - 1))


def _row_images_path(run: Run, row: int) -> Path:
    return run.out / "eval" / f"row_images_{row % 2}.safetensors"


def row_images(run: Run, row: int) -> dict:
    """Eval images of row ``row``: in memory, or (after a resume) from its slot on disk."""
    if run.previous_images[0] == row:
        return run.previous_images[1]
    from safetensors.torch import load_file

    path = _row_images_path(run, row)
    saved = load_file(path) if path.is_file() else {}
    if int(saved.pop("__row__", -1)) != row:
        raise FatalRunError(f"{path} does not hold the eval images of row {row}; rerun with --set overwrite=true")
    return saved


def base_stats(cfg: Config, result) -> dict:
    """Mean and std of each task's reward over the base model's eval images: the fixed scale that
    normalises every metric (and, with ``reward_norm: base_std``, the loss). A constant reward gets 1."""
    means, stds = [], []
    for task in cfg.tasks:
        scores = result.scores[task.name].double()
        std = float(scores.std()) if scores.numel() > 1 else 0.0
        means.append(float(scores.mean()))
        stds.append(std if std > 1e-12 else 1.0)
    return {"tasks": [t.name for t in cfg.tasks], "mean": means, "std": stds,
            "definition": "mean and std of each task's reward over the base model's eval images (row 0)"}


def extend_results(run: Run) -> None:
    """Tasks appended to a run's config: evaluate every earlier row on the new tasks, so the reward
    matrix stays complete. Row r is the model after task r, i.e. its first r adapters (later ones
    only trained after it; older ones are frozen), row 0 the base model; the new tasks' base images
    join those of structure drift."""
    cfg, res = run.cfg, run.results
    have = len(res["tasks"])
    rows = len(res["reward_matrix"])
    from dataclasses import replace

    sub = replace(cfg, tasks=cfg.tasks[have:])
    run.stop.where = "while evaluating the earlier models on the appended tasks"
    _log.info("config appends %d task(s) to this run: evaluating the %d models so far on them", len(sub.tasks), rows)
    n_images = eval_image_count(sub, run.eval_prompts[have:]) * rows
    with tqdm(total=n_images, desc="eval new tasks", disable=not run.is_main) as bar:
        for row in range(rows):
            lora.set_active_tasks(run.layers, row)
            try:
                result = evaluate_all_tasks(run.models, sub, run.prompt_cache, run.eval_prompts[have:],
                                            run.rewards[have:], run.device, run.shape, progress=bar,
                                            idle_device=idle_reward_device(cfg, run.device))
            finally:
                lora.set_active_tasks(run.layers, None)
            res["reward_matrix"][row] = res["reward_matrix"][row] + result.rewards
            if row == 0:
                new = base_stats(sub, result)
                stats = res["reward_base_stats"]
                for key in ("tasks", "mean", "std"):
                    stats[key] = stats[key][:have] + new[key]
                run.base_images.update({k: v.clone() for k, v in result.images.items()})
                if run.is_main:
                    ckpt.save_tensors_atomic(run.out / "eval" / "base_images.safetensors", run.base_images)
    res["tasks"] = [t.name for t in cfg.tasks]


def write_results(run: Run) -> dict:
    res = dict(run.results)
    trained = len(res["reward_matrix"]) - 1  # mid-run: rows 0..t over the t tasks trained so far
    if trained >= 1:
        metrics = ril_metrics([r[:trained] for r in res["reward_matrix"]], res["tasks"][:trained],
                              res["reward_base_stats"]["std"][:trained])
        res.update({k: v for k, v in metrics.items() if k != "tasks"})
    res["wall_seconds"] = run.stamp.get("wall_seconds", wall_total(run))  # the last task boundary's stamp
    res.update(run_metadata_fields(run, res))
    res["method"] = run.cfg.method.name
    res["config"] = run.cfg.to_dict()
    if run.is_main:
        report.write_json_atomic(run.out / "results.json", res)
    return res


def run_metadata(run: Run) -> dict:
    """When and where the results were made: total wall time of the work so far, a UTC timestamp,
    library versions and the device. Taken when a task's results are complete and kept in the
    checkpoint, so a rerun with nothing left to do writes the same results.json."""
    from importlib import metadata

    versions = {"python": platform.python_version()}
    for name in ("ril_fast", "torch", "diffusers", "transformers", "peft", "deepspeed", "triton"):
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    device = torch.cuda.get_device_name(run.device) if run.device.type == "cuda" else run.device.type
    return {"wall_seconds": round(wall_total(run), 3),
            "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "versions": versions, "device": f"{eng.world_size()} x {device}" if eng.world_size() > 1 else device}


def run_metadata_fields(run: Run, res: dict) -> dict:
    """Labels that make results.json readable without the code, and the run's stamp (run_metadata)."""
    rows = len(res["reward_matrix"])
    return {"rows": ["base"] + [f"after {name}" for name in res["tasks"][: rows - 1]], "columns": list(res["tasks"]),
            **{k: v for k, v in run.stamp.items() if k != "wall_seconds"}}


def plot_curves(run: Run, task: int) -> None:
    """This task's reward curve, and all tasks so far with boundaries marked (skipped if nothing was logged)."""
    cfg = run.cfg
    train = [m for m in read_metrics(run.out) if m.get("kind") == "train" and "reward" in m]
    this = [m for m in train if m["task"] == task + 1]
    names = {i + 1: f"{i + 1}. {t.name}" for i, t in enumerate(cfg.tasks)}
    if this:
        report.plot_reward_curves(this, run.out / "plots" / f"reward_curve_task_{task + 1:02d}.png",
                                  keys=["reward", "distill"], task_names=names,
                                  title=f"task {task + 1} ({cfg.tasks[task].name}): training reward")
    if train:
        report.plot_reward_curves(train, run.out / "plots" / "reward_curves.png", keys=["reward", "distill"],
                                  step_key="global_step", task_names=names,
                                  boundaries=[global_step(cfg, t) + 0.5 for t in range(task)],
                                  title="training reward over the task sequence (dashed: task boundaries)")


def table_view(res: dict) -> dict:
    """The results in the shape ``report.results_table_markdown`` takes."""
    return {"title": f"method {res['method']}", "task_names": res["tasks"], "reward_matrix": res["reward_matrix"],
            "metrics": res, "drift": {"SSIM to base": res["structure_drift"],
                                      "structure kept vs base": res["structure"]["to_base"],
                                      "structure kept vs previous row": res["structure"]["to_previous"]},
            "wall_time_s": res["wall_seconds"]}


def outputs_summary(run: Run) -> str:
    out, n = run.out, len(run.cfg.tasks)
    return "\n".join([
        f"outputs in {out}/",
        "  results.json       reward matrix (rows: base, after each task; columns: tasks), forgetting, drift",
        "  grids/             evaluation images of each model (base, after each task)",
        "  plots/             reward curves over the whole sequence, reward-matrix heatmap",
        f"  adapters/          one diffusers LoRA per task: ril_fast.load_pipeline({str(out)!r}, task={n})",
        f"  tensorboard/       tensorboard --logdir {out / 'tensorboard'}",
        "  metrics.jsonl      one line per logged step and evaluation",
    ])
