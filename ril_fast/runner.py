"""The task loop: build the run, then for each task: begin -> train -> evaluate -> export -> checkpoint.

State machine saved in every checkpoint (``meta.json``): ``task`` (0-based) and ``phase``:
``train`` (``step`` optimizer steps of that task done), ``trained`` (training done, evaluation
pending) or ``done`` (evaluated and exported). Row 0 (the base model) is evaluated first and
stored as task -1 / ``done``. All randomness of a training step comes from
``step_seed(seed, task, step)``, so a resumed run replays the same batches.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import platform
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from ril_fast import checkpoint as ckpt
from ril_fast import engine as eng
from ril_fast import lora, report, rewards
from ril_fast.config import Config, ConfigError, read_prompts
from ril_fast.evaluate import eval_image_count, evaluate_all_tasks, structure_drift, structure_kept
from ril_fast.evaluate_metrics import ril_metrics
from ril_fast.methods.objective import compute_loss, latent_shape, make_batch, step_seed
from ril_fast.rewards.normalize import JointReward, Normalizer
from ril_fast.metrics_log import MetricsLog, read_metrics
from ril_fast.sampling import compile_unet

_log = logging.getLogger("ril_fast")

# Keys whose change between a saved run and the current config does not change what was trained.
_RESUME_NEUTRAL = {"overwrite", "deepspeed", "memory", "eval", "train.log_every", "train.checkpoint_every",
                   "train.keep_checkpoints", "model.device"}


class FatalRunError(RuntimeError):
    """A run that cannot go on (too many non-finite steps, corrupt checkpoints); checkpoints stay intact."""


def _diff_keys(a, b, prefix="") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for key in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(key), b.get(key), f"{prefix}.{key}" if prefix else key)
        return out
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):  # name the task that changed
        return [k for i, (x, y) in enumerate(zip(a, b)) for k in _diff_keys(x, y, f"{prefix}.{i}")]
    return [] if a == b else [prefix]


def _neutral(key: str) -> bool:
    return any(key == n or key.startswith(n + ".") for n in _RESUME_NEUTRAL)


def extends(old: dict, new: dict) -> bool:
    """``new`` is ``old`` with tasks appended and nothing else that changes training."""
    old_tasks, new_tasks = old.get("tasks") or [], new.get("tasks") or []
    if not (len(new_tasks) > len(old_tasks) and new_tasks[: len(old_tasks)] == old_tasks):
        return False
    return all(_neutral(k) for k in _diff_keys({**old, "tasks": None}, {**new, "tasks": None}))


def preflight(cfg: Config) -> None:
    """Checks that need no model: output dir writable with space, and not holding another config's run."""
    out = Path(cfg.output_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-probe-{os.getpid()}"  # per process: ranks run preflight at the same time
        probe.write_bytes(b"ok")
        probe.unlink()
    except (OSError, ValueError) as exc:
        why = getattr(exc, "strerror", None) or str(exc)
        raise ConfigError([f"output_dir: {cfg.output_dir!r} is not writable ({why}); give a writable folder"]) from None
    free_mib = shutil.disk_usage(out).free / 2**20
    if free_mib < 64:
        raise ConfigError([f"output_dir: only {free_mib:.0f} MiB free on {cfg.output_dir!r}; need at least 64 MiB"])
    saved = out / "config.json"
    if saved.is_file():
        try:
            old = json.loads(saved.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError):
            old = {}
        changed = [k for k in _diff_keys(old, cfg.to_dict()) if not _neutral(k)]
        if changed and extends(old, cfg.to_dict()) and not cfg.overwrite:
            if not cfg.method.adapter_per_task:
                raise ConfigError([f"tasks: {cfg.output_dir!r} holds a {cfg.method.name} run; appending tasks to it "
                                   "needs one adapter per task (method group or rid), so the model after each earlier "
                                   "task can be evaluated on the new ones; use another output_dir"])
            return  # appending tasks: the run goes on from its last checkpoint (extend_results)
        if changed and not cfg.overwrite:
            raise ConfigError([f"output_dir: {cfg.output_dir!r} holds a run of a different config (changed: "
                               f"{', '.join(changed[:5])}); use another output_dir or --set overwrite=true"])
        if changed and eng.rank() == 0:  # overwrite=true: nothing of the old run may leak into the new one
            remove_run_outputs(out)


# Everything a run writes under output_dir; overwrite removes exactly these (other files stay).
RUN_OUTPUTS = ("checkpoints", "adapters", "grids", "plots", "tensorboard", "eval", "metrics.jsonl", "results.json",
               "config.json")


def remove_run_outputs(out: Path) -> None:
    for name in RUN_OUTPUTS:
        path = out / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


@dataclass
class StopState:
    """What SIGINT/SIGTERM handling needs: where the run is, and whether a stop was asked for mid-step."""

    where: str = "while starting"  # "at task 2 step 11", "while evaluating after task 2", ...
    training: bool = False  # inside the step loop: finish the step, checkpoint, then stop
    signal: int | None = None  # the signal that asked for a stop at the next step boundary


@dataclass
class Run:
    cfg: Config
    device: torch.device
    models: object
    layers: list
    prompt_cache: object
    rewards: list
    train_prompts: list[list[str]]
    eval_prompts: list[list[str]]
    log: MetricsLog
    is_main: bool
    results: dict = field(default_factory=dict)
    base_images: dict = field(default_factory=dict)
    previous_images: tuple = (-1, {})  # (row, images) of the last evaluated row (structure kept)
    normalizers: dict = field(default_factory=dict)  # task index -> Normalizer with running statistics
    seq: int = 0  # checkpoint sequence number
    wall_before: float = 0.0  # seconds of work in earlier sessions, up to the checkpoint resumed from
    t_start: float = field(default_factory=time.time)  # this session's start
    stamp: dict = field(default_factory=dict)  # when and where the results were last changed (run_metadata)
    stop: StopState = field(default_factory=StopState)
    bad_in_a_row: int = 0  # non-finite steps in a row, carried across a resume
    adherence_fn: object = None

    @property
    def out(self) -> Path:
        return Path(self.cfg.output_dir)

    def shape(self, n: int):
        return latent_shape(self.models, self.cfg, n)


def _adherence_fn(cfg, models):
    """Prompt-adherence metric when the model folder ships the shapes classifier (the embedded model)."""
    folder = Path(models.path) / "classifier"
    if not cfg.eval.adherence or not folder.is_dir():
        return None
    from ril_fast.rewards.adherence import adherence_accuracy, load_classifier

    classifier = load_classifier(folder)
    return lambda images, prompts: adherence_accuracy(images, prompts, classifier=classifier)


def build_run(cfg: Config) -> Run:
    from ril_fast.config import check_available
    from ril_fast.models import load_models
    from ril_fast.models.text import PromptCache, free_text_encoders

    check_available(cfg)  # the model and reward weights are here: seconds, before minutes of planning
    threads = eng.cpu_threads(cfg)
    if threads is not None:
        torch.set_num_threads(threads)
    if cfg.memory.budget_gib is not None:
        from ril_fast import memory

        message = memory.check_budget(cfg, progress=eng.rank() == 0)  # planned on meta tensors, before any load
        if message:
            raise ConfigError([message])
    torch.manual_seed(cfg.seed)
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True)
    device = eng.pick_device(cfg)
    eng.init_process_group(cfg)
    # The VAE decodes in fp32: the SD/SDXL VAEs overflow in fp16 and lose detail in bf16.
    try:  # a broken weights file is a config problem (exit 2), not a traceback
        models = load_models(cfg.model.path, dtype=eng.DTYPES[cfg.model.dtype], device=device, vae_dtype=torch.float32)
    except ValueError as exc:
        raise ConfigError([str(exc)]) from None
    if cfg.memory.attention == "xformers":
        if device.type != "cuda":
            raise ConfigError(["memory.attention: xformers needs a CUDA device; use 'sdpa' on CPU"])
        models.unet.enable_xformers_memory_efficient_attention()
    from ril_fast import memory

    memory.apply_memory_features(models, cfg)  # the same switches the planner traced
    layers = lora.inject_adapter_group(models.unet, cfg.lora.targets)
    compile_unet(models, cfg)  # train.compile
    height = cfg.sampling.height or models.sample_size
    width = cfg.sampling.width or models.sample_size
    cache = PromptCache(models, device=device, height=height, width=width)
    train_prompts = [read_prompts(t.train_prompts, f"tasks.{i}.train_prompts") for i, t in enumerate(cfg.tasks)]
    eval_prompts = [read_prompts(t.eval_prompts, f"tasks.{i}.eval_prompts") for i, t in enumerate(cfg.tasks)]
    # Text encoders run once per unique prompt; afterwards they are moved off the device or freed.
    unique = sorted({p for ps in train_prompts + eval_prompts for p in ps} | {cfg.sampling.negative_prompt})
    cache.warm(unique)
    free_text_encoders(models, cfg.memory.text_encoders)
    try:
        reward_fns = [rewards.build(t.reward, **memory.reward_build_options(cfg, t)) for t in cfg.tasks]
    except (ValueError, ImportError, AttributeError) as exc:
        raise ConfigError([f"tasks: a reward cannot be built: {exc}"]) from None
    for fn in reward_fns if idle_reward_device(cfg, device) is not None else []:
        rewards.place(fn, "cpu")  # each comes to the device for its own task (stage_rewards) or scoring
    is_main = eng.rank() == 0
    return Run(cfg=cfg, device=device, models=models, layers=layers, prompt_cache=cache, rewards=reward_fns,
               train_prompts=train_prompts, eval_prompts=eval_prompts, log=MetricsLog(cfg.output_dir, is_main),
               is_main=is_main, adherence_fn=_adherence_fn(cfg, models))


# ---------------------------------------------------------------------------------------------
# Adapters per task


def adapters_for_task(cfg: Config, task: int) -> int:
    """How many adapter pairs exist while training task ``task`` (0-based)."""
    return task + 1 if cfg.method.adapter_per_task else 1


def ensure_adapters(run: Run, n: int) -> None:
    have = run.layers[0].num_tasks if run.layers else 0
    for i in range(have, n):
        lora.add_task(run.layers, run.cfg.lora.rank, run.cfg.lora.alpha, seed=step_seed(run.cfg.seed, i, 0, "adapter"),
                      init=run.cfg.lora.init)


def begin_task(run: Run, task: int) -> None:
    """New pair (A random, B = 0) for group methods, a fresh one for ``independent``; the teacher's copy
    (EMA, LwF) and the L2 anchor start as the current model."""
    ensure_adapters(run, adapters_for_task(run.cfg, task))
    if run.cfg.method.name == "independent" and task > 0:
        lora.reinit_newest(run.layers, seed=step_seed(run.cfg.seed, task, 0, "adapter"), init=run.cfg.lora.init)
    lora.reset_ema(run.layers)


def reward_normalizer(run: Run, task: int) -> Normalizer | None:
    """``tasks[task].reward_norm`` as a callable raw reward -> normalised reward (None for ``none``)."""
    norm = run.cfg.tasks[task].reward_norm
    if norm.mode == "none":
        return None
    if norm.mode == "fixed":
        return Normalizer(norm.offset, norm.scale)
    if norm.mode == "running":
        return run.normalizers.setdefault(task, Normalizer(running_momentum=norm.momentum))
    stats = run.results["reward_base_stats"]  # row 0, evaluated before any training
    return Normalizer(stats["mean"][task], stats["std"][task])


def task_objective(run: Run, task: int):
    """(reward callable, normaliser, training prompts) of a task's loss: its own reward, or for ``joint``
    the sum of the normalised rewards of tasks 1..t on the union of their training prompts."""
    if run.cfg.method.name != "joint":
        return run.rewards[task], reward_normalizer(run, task), run.train_prompts[task]
    seen = range(task + 1)
    joint = JointReward([run.rewards[i] for i in seen], [reward_normalizer(run, i) for i in seen])
    prompts = list(dict.fromkeys(p for i in seen for p in run.train_prompts[i]))
    return joint, None, prompts


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save(run: Run, task: int, phase: str, step: int, engine=None) -> None:
    run.seq += 1
    meta = {"task": task, "phase": phase, "step": step, "results": run.results, "config": run.cfg.to_dict(),
            "metrics_lines": run.log.lines(), "bad_in_a_row": run.bad_in_a_row, "wall_seconds": wall_total(run),
            "stamp": run.stamp, "reward_norm_state": {str(i): n.state() for i, n in run.normalizers.items()}}
    if not run.is_main and eng.dist_ready():  # every rank's RNG state goes into the checkpoint
        ckpt.stage_rank_rng(run.out, run.seq, eng.rank())
    eng.barrier_all()
    if run.is_main:
        state = lora.group_state_dict(run.layers) or {"_empty": torch.zeros(1)}
        try:
            ckpt.save_checkpoint(run.out, run.seq, state, meta, engine.optimizer_state() if engine else None,
                                 keep=run.cfg.train.keep_checkpoints)
        except OSError as exc:  # full disk, quota: the half-written folder stays hidden, older ones verify
            raise FatalRunError(f"cannot write checkpoint {run.seq} under {run.out} ({exc.strerror or exc}); the "
                                "previous checkpoint is intact: free space and rerun the same command") from None
    eng.barrier_all()


def resume(run: Run):
    """Restore from the newest good checkpoint. Returns (task, phase, step, optimizer state) or None."""
    try:
        loaded = ckpt.load_latest(run.out, rank=eng.rank())
    except ckpt.CheckpointError as exc:
        raise FatalRunError(f"cannot resume from {run.out}: {exc}") from None
    if loaded is None:  # killed before the first checkpoint: start over, metrics included
        run.log.truncate(0)
        return None
    meta, state, optim, rng = loaded
    task, phase = meta["task"], meta["phase"]
    if task >= 0:
        ensure_adapters(run, adapters_for_task(run.cfg, task))
        lora.load_group_state_dict(run.layers, state)
    if rng is not None:
        ckpt.restore_rng(rng)
    run.results = meta["results"]
    # older checkpoints kept the wall clock inside the results
    run.wall_before = meta.get("wall_seconds", run.results.pop("wall_seconds_so_far", 0.0))
    run.stamp = meta.get("stamp") or {}
    run.seq = meta["seq"]
    run.bad_in_a_row = meta.get("bad_in_a_row", 0)
    run.log.truncate(meta["metrics_lines"])
    run.log.resume_at(global_step(run.cfg, task, meta["step"] if phase == "train" else None))
    for i, state in meta.get("reward_norm_state", {}).items():
        if run.cfg.tasks[int(i)].reward_norm.mode == "running":
            reward_normalizer(run, int(i)).load_state(state)
    from safetensors.torch import load_file

    base = run.out / "eval" / "base_images.safetensors"
    if base.is_file():
        run.base_images = load_file(base)
    _log.info("resuming from checkpoint %d: %s", run.seq, describe_position(run.cfg, task, phase, meta["step"]))
    return task, phase, meta["step"], optim


def wall_total(run: Run) -> float:
    """Seconds of work so far, over every session (time before a crash's last checkpoint included)."""
    return run.wall_before + time.time() - run.t_start


def global_step(cfg: Config, task: int, step: int | None = None) -> int:
    """Optimizer steps of the whole sequence done at ``step`` of ``task`` (0-based); None = the task's end."""
    done = sum(t.steps for t in cfg.tasks[: max(task, 0)])
    return done + (step if step is not None else cfg.tasks[task].steps if task >= 0 else 0)


def model_label(cfg: Config, row: int) -> str:
    """Row ``row`` of the reward matrix in words: the base model, or the model after task ``row``."""
    return "the base model" if row == 0 else f"after task {row} ({cfg.tasks[row - 1].name})"


def describe_position(cfg: Config, task: int, phase: str, step: int) -> str:
    """Where a checkpoint stands, for people: tasks 1-based and named (``task`` is the 0-based state)."""
    if task < 0:
        return "base model evaluated"
    name = f"task {task + 1} ({cfg.tasks[task].name})" if task < len(cfg.tasks) else f"task {task + 1}"
    if phase == "train":
        return f"{name} at step {step} of {cfg.tasks[task].steps}"
    return f"{name} trained, not yet evaluated" if phase == "trained" else f"{name} done"


# ---------------------------------------------------------------------------------------------
# Train and evaluate


def idle_reward_device(cfg: Config, device: torch.device) -> torch.device | None:
    """Where rewards of tasks not being trained wait: the CPU with ``memory.idle_rewards = cpu`` on
    a GPU run (planned that way by ``ril_fast.memory``), else None (they stay on the device)."""
    return torch.device("cpu") if cfg.memory.idle_rewards == "cpu" and device.type != "cpu" else None


def stage_rewards(run: Run, task: int) -> None:
    """Only this task's reward model on the device while it trains (idle first: tasks may share one)."""
    idle = idle_reward_device(run.cfg, run.device)
    if idle is None:
        return
    for i, fn in enumerate(run.rewards):
        if i != task:
            rewards.place(fn, idle)
    rewards.place(run.rewards[task], run.device)


def train_task(run: Run, task: int, start_step: int, optimizer_state: dict | None) -> None:
    cfg, tcfg = run.cfg, run.cfg.tasks[task]
    stage_rewards(run, task)
    params = lora.trainable_parameters(run.layers)
    engine = eng.Engine(run.models.unet, params, cfg, lr=tcfg.lr or cfg.train.lr)
    if optimizer_state is not None:
        engine.load_optimizer_state(optimizer_state)
    use_distill = cfg.method.distills_on_task(task)
    reward_fn, reward_norm, prompts = task_objective(run, task)
    bad = run.bad_in_a_row if start_step > 0 else 0  # a streak of skipped steps survives a resume
    bar = tqdm(range(start_step, tcfg.steps), desc=f"task {task + 1}/{len(cfg.tasks)} {tcfg.name}",
               disable=not run.is_main, initial=start_step, total=tcfg.steps)
    run.stop.training = True  # from here a SIGINT/SIGTERM finishes the step and checkpoints first
    for step in bar:
        run.stop.where = f"at task {task + 1} step {step}"
        t0 = time.perf_counter()
        rewards_, distills, finite = [], [], True
        for micro in range(cfg.train.grad_accum):
            batch = make_batch(run.models, cfg, run.prompt_cache, prompts, task,
                               (step * cfg.train.grad_accum + micro) * eng.world_size() + eng.rank(), run.device)
            out = compute_loss(run.models, run.layers, reward_fn, batch, cfg, use_distill, reward_norm=reward_norm,
                               use_l2=cfg.method.penalizes_on_task(task))
            if not engine.loss_is_finite(out.loss):
                finite = False
                break
            engine.backward(out.loss)
            rewards_.append(out.reward.mean())
            if out.distill is not None:
                distills.append(out.distill)
        grad_norm, stepped = engine.step() if finite else (None, False)
        if not finite:
            engine.zero_grad()
        if stepped and finite:
            bad = 0
            if cfg.method.teacher == "ema":
                lora.ema_update(run.layers, cfg.method.decay(tcfg.steps))
        else:
            bad += 1
            _log.warning("task %d step %d: non-finite loss or gradient, step skipped (%d in a row)", task + 1, step + 1,
                         bad)
        run.bad_in_a_row = bad
        record = {"kind": "train", "task": task + 1, "step": step + 1, "skipped": not (stepped and finite),
                  "bad_in_a_row": bad, "step_seconds": time.perf_counter() - t0,
                  "global_step": global_step(cfg, task, step + 1)}
        if rewards_:  # host sync at the log point only; the mean over every rank's batch
            record["reward"] = eng.mean_over_ranks(torch.stack(rewards_).mean())
        if distills:
            record["distill"] = eng.mean_over_ranks(torch.stack(distills).mean())
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if eng.dist_ready() and cfg.deepspeed.zero_stage < 3:  # ZeRO-3 ranks hold shards, not replicas
            record["replica_fingerprints"] = eng.replica_fingerprints(params)
        if (step + 1) % cfg.train.log_every == 0 or record["skipped"] or "replica_fingerprints" in record:
            run.log.write(record, tb_step=record["global_step"])
        if len(set(record.get("replica_fingerprints", [0]))) > 1:
            raise FatalRunError(f"ranks hold different adapters after step {step + 1} of task {task + 1} "
                                f"(fingerprints {record['replica_fingerprints']}); the run is not data-parallel")
        ckpt.fault_point("step")
        bar.set_postfix({k: f"{record[k]:.4g}" for k in ("reward", "distill") if k in record})
        if bad >= cfg.train.max_bad_steps:
            raise FatalRunError(f"{bad} non-finite steps in a row in task {task + 1} ({tcfg.name}) at step {step + 1};"
                                " stopping. The last good checkpoint is intact; lower train.lr or check the reward")
        last = step + 1 == tcfg.steps  # the "trained" checkpoint follows the loop
        periodic = cfg.train.checkpoint_every and (step + 1) % cfg.train.checkpoint_every == 0
        if periodic and not last:
            save(run, task, "train", step + 1, engine)
        run.stop.where = f"at task {task + 1} step {step + 1}"
        if not last and stop_requested(run):
            if not periodic:
                save(run, task, "train", step + 1, engine)
            bar.close()
            raise RunStopped(run.stop.signal)
    bar.close()
    save(run, task, "trained", tcfg.steps)
    if stop_requested(run):
        raise RunStopped(run.stop.signal)
    run.stop.training = False


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
    model = "base model" if row == 0 else f"after task {row} ({cfg.tasks[row - 1].name})"
    return (f"{model}: method {cfg.method.name}, {cfg.eval.steps or cfg.sampling.steps} DDIM steps, "
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
    n_images = sum(len(p) for p in run.eval_prompts[have:]) * len(cfg.eval.seeds) * rows
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


def write_results(run: Run, wall: float) -> dict:
    res = dict(run.results)
    trained = len(res["reward_matrix"]) - 1  # mid-run: rows 0..t over the t tasks trained so far
    if trained >= 1:
        metrics = ril_metrics([r[:trained] for r in res["reward_matrix"]], res["tasks"][:trained],
                              res["reward_base_stats"]["std"][:trained])
        res.update({k: v for k, v in metrics.items() if k != "tasks"})
    res["wall_seconds"] = wall
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


def run_all(cfg: Config) -> dict:
    """Train and evaluate every task of ``cfg``, resuming from the newest checkpoint under ``output_dir``.

    Raises:
        RunStopped: SIGINT/SIGTERM (its message says where, and which checkpoint a rerun resumes from).
    """
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    stop = StopState(where="while loading the model")
    with logging_redirect_tqdm(), stop_on_signals(stop):  # log lines print above the progress bars
        try:
            return _run_all(cfg, stop)
        except KeyboardInterrupt as exc:  # RunStopped, or a second Ctrl-C
            signum = getattr(exc, "signum", signal.SIGINT)
            raise RunStopped(signum, stop_message(Path(cfg.output_dir), stop, signum)) from None


def _run_all(cfg: Config, stop: StopState) -> dict:
    t_start = time.time()
    run = build_run(cfg)
    run.stop, run.t_start = stop, t_start
    if run.is_main:
        report.write_json_atomic(run.out / "config.json", cfg.to_dict())
    resumed = resume(run)
    print_header(run)
    if resumed is None:
        evaluate_row(run, 0)
        save(run, -1, "done", 0)
        task, phase, step, optim = 0, "start", 0, None
    else:
        task, phase, step, optim = resumed
        if len(run.results.get("tasks", cfg.tasks)) < len(cfg.tasks):  # tasks were appended to the config
            extend_results(run)
            if phase != "train":  # mid-task the next checkpoint (with the optimizer) will hold it
                save(run, task, phase, step)
        if phase == "done":
            task, phase, step, optim = task + 1, "start", 0, None
    n = len(cfg.tasks)
    while task < n:
        if phase == "start":
            begin_task(run, task)
        if phase in ("start", "train"):
            train_task(run, task, step, optim)
        evaluate_row(run, task + 1)
        run.stamp = run_metadata(run)  # results change here, and only here
        if run.is_main:
            stop.where = f"while exporting task {task + 1}"
            lora.export_task_adapter(run.models.unet, run.layers, adapters_for_task(cfg, task) if cfg.method.adapter_per_task
                                     else 1, run.out / "adapters" / f"task_{task + 1:02d}")
            write_results(run, run.stamp["wall_seconds"])
            plot_curves(run, task)
        save(run, task, "done", cfg.tasks[task].steps)
        ckpt.fault_point("task_boundary")
        task, phase, step, optim = task + 1, "start", 0, None
    # a rerun with nothing left to do writes the same bytes: the stamp comes from the checkpoint
    res = write_results(run, run.stamp.get("wall_seconds", wall_total(run)))
    if run.is_main:
        report.plot_reward_heatmap(res["reward_matrix"], res["tasks"], run.out / "plots" / "reward_matrix.png")
        print(report.results_table_markdown(table_view(res)))
        for note in report.interference_notes(res["reward_matrix"], res["tasks"]):
            print(note)
        print()
        print(outputs_summary(run), flush=True)
    run.log.close()
    return res


# ---------------------------------------------------------------------------------------------
# Stopping on signals


class RunStopped(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; ``message`` says where and how to resume."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum, self.message = signum, message


@contextlib.contextmanager
def stop_on_signals(state: StopState):
    """SIGINT / SIGTERM (Ctrl-C, a cluster preempting the job): inside the step loop the step
    finishes and a checkpoint is written before the run stops; elsewhere it stops at once and the
    last checkpoint stands. A second Ctrl-C stops at once; a second SIGTERM is ignored (a
    scheduler escalates with SIGKILL, and the DeepSpeed launcher forwards a Ctrl-C as SIGTERM)."""
    if threading.current_thread() is not threading.main_thread():  # signal.signal works there only
        yield
        return

    def handler(signum, frame):
        if state.signal is None and state.training:
            state.signal = signum
            os.write(2, f"\nril_fast: {signal.Signals(signum).name}: finishing this step, writing a checkpoint, "
                        "then stopping (Ctrl-C again stops at once)\n".encode())
            return
        if signum == signal.SIGTERM and state.signal is not None:
            return
        raise RunStopped(signum)

    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def stop_requested(run: Run) -> bool:
    """A stop was asked for on any rank (all ranks must stop at the same step: save() has barriers)."""
    asked = run.stop is not None and run.stop.signal is not None
    if eng.dist_ready():
        asked = eng.mean_over_ranks(torch.tensor(float(asked))) > 0
        if asked and run.stop.signal is None:
            run.stop.signal = signal.SIGTERM
    return asked


def stop_message(out: Path, state: StopState, signum: int) -> str:
    verb = "interrupted" if signum == signal.SIGINT else f"stopped by {signal.Signals(signum).name}"
    newest = ckpt.list_checkpoints(out)
    then = f"resume from checkpoint {int(newest[0].name.split('-')[1])}" if newest else "start again"
    return f"{verb} {state.where}; rerun the same command to {then}"


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


def print_header(run: Run) -> None:
    if not run.is_main:
        return
    cfg = run.cfg
    from ril_fast.kernels import select_backend

    trainable = sum(cfg.lora.rank * (layer.in_features + layer.out_features) for layer in run.layers)
    frozen = sum(p.numel() for p in run.models.unet.parameters() if not p.requires_grad)
    lines = [
        "***** ril_fast *****",
        f"  model: {cfg.model.path} ({run.models.kind}, base {cfg.model.dtype}) on {run.device}",
        f"  output: {cfg.output_dir}/ (rerun the same command to resume)",
        f"  method: {cfg.method.name} (adapter per task: {cfg.method.adapter_per_task}, distill: {cfg.method.distill}"
        f" {cfg.method.distill_mode}/{cfg.method.distill_target}, teacher {cfg.method.teacher},"
        f" ema decay {'1 − 1/steps' if cfg.method.ema_decay is None else cfg.method.ema_decay})",
        f"  tasks: {' -> '.join(f'{t.name}[{t.reward}]x{t.steps}' for t in cfg.tasks)}",
        f"  batch: {cfg.train.batch_size} per rank x {eng.world_size()} ranks x {cfg.train.grad_accum} accumulation",
        f"  sampling: {cfg.sampling.steps} DDIM steps, CFG {cfg.sampling.guidance_scale}, K = {cfg.sampling.grad_window}"
        + (f"..{cfg.sampling.grad_window_max}" if cfg.sampling.grad_window_max else ""),
        f"  LoRA: rank {cfg.lora.rank} on {len(run.layers)} layers; {trainable:,} trainable per task / {frozen:,} frozen",
        f"  engine: {'deepspeed zero' + str(cfg.deepspeed.zero_stage) if eng.use_deepspeed(cfg) else 'plain'},"
        f" optimizer {cfg.train.optimizer}; kernels: {select_backend('lora_group_linear', run.device)}",
    ]
    print("\n".join(lines), flush=True)
