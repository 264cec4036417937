"""What a run is and where it stands: the :class:`Run` record, checkpoints and resume, the output
folder's config check, and stopping on signals. The loop that drives it is ``ril_fast/train.py``.

State machine saved in every checkpoint (``meta.json``): ``task`` (0-based) and ``phase``:
``train`` (``step`` optimizer steps of that task done), ``trained`` (training done, evaluation
pending) or ``done`` (evaluated and exported). Row 0 (the base model) is evaluated first and
stored as task -1 / ``done``. All randomness of a training step comes from
``step_seed(seed, task, step)``, so a resumed run replays the same batches.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ril_fast import checkpoint as ckpt
from ril_fast import engine as eng
from ril_fast import lora
from ril_fast.config import Config, ConfigError
from ril_fast.metrics_log import MetricsLog
from ril_fast.rewards.normalize import Normalizer
from ril_fast.step import latent_shape, step_seed

_log = logging.getLogger("ril_fast")


class FatalRunError(RuntimeError):
    """A run that cannot go on (too many non-finite steps, corrupt checkpoints); checkpoints stay intact."""


class RunStopped(KeyboardInterrupt):
    """SIGINT or SIGTERM stopped the run; ``message`` says where and how to resume."""

    def __init__(self, signum: int, message: str = ""):
        super().__init__(message)
        self.signum, self.message = signum, message


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


# ---------------------------------------------------------------------------------------------
# Where a run stands


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
# Per task: adapters, reward normalisers, where idle rewards wait


def adapters_for_task(cfg: Config, task: int) -> int:
    """How many adapter pairs exist while training task ``task`` (0-based)."""
    return task + 1 if cfg.method.adapter_per_task else 1


def ensure_adapters(run: Run, n: int) -> None:
    have = run.layers[0].num_tasks if run.layers else 0
    for i in range(have, n):
        lora.add_task(run.layers, run.cfg.lora.rank, run.cfg.lora.alpha, seed=step_seed(run.cfg.seed, i, 0, "adapter"),
                      init=run.cfg.lora.init)


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


def idle_reward_device(cfg: Config, device: torch.device) -> torch.device | None:
    """Where rewards of tasks not being trained wait: the CPU with ``memory.idle_rewards = cpu`` on
    a GPU run (planned that way by ``ril_fast.memory``), else None (they stay on the device)."""
    return torch.device("cpu") if cfg.memory.idle_rewards == "cpu" and device.type != "cpu" else None


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


# ---------------------------------------------------------------------------------------------
# The output folder: which config it holds


# Keys whose change between a saved run and the current config does not change what was trained.
_RESUME_NEUTRAL = {"overwrite", "deepspeed", "memory", "eval", "train.log_every", "train.checkpoint_every",
                   "train.keep_checkpoints", "model.device"}


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


# ---------------------------------------------------------------------------------------------
# Stopping on signals


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
