"""Train a diffusion model through a sequence of reward tasks (Reward Incremental Learning).

    python -m ril_fast.train --config configs/tiny.json                 # embedded model, CPU
    deepspeed ril_fast/train.py --config configs/sdxl.json              # DeepSpeed launcher, 1..N GPUs
    python -m ril_fast.train --config configs/tiny.json --set method.name=baseline --set tasks.0.steps=5

Rerunning the same command with the same ``output_dir`` resumes from the newest good checkpoint.

Features and their switches: method (``method.name``: baseline | group | distill | rid), EMA teacher
(``method.ema_decay``), last-step or full-chain distillation (``method.distill_mode``) on x0 / eps /
image (``method.distill_target``), gradient window K (``sampling.grad_window[_max]``), UNet and VAE
checkpointing (``sampling.checkpoint_unet``, ``memory.vae_checkpoint``), 8-bit AdamW
(``train.optimizer``), DeepSpeed ZeRO and offload (``deepspeed.*``), checkpoints every N steps
(``train.checkpoint_every``), non-finite step skipping (``train.max_bad_steps``).

The recipe, top to bottom: ``build_run`` (model, adapters, cached prompt embeddings, rewards), then
``run_all`` (base row evaluated; per task: begin -> train -> evaluate -> export -> checkpoint), and
``train_task``, one step of which is the data flow of docs/design.md §4::

    prompts -> cached text embeddings -> noise -> sampler (no-grad prefix, K-step grad window)
      -> [last step: student + teacher] -> x0 -> VAE decode -> reward -> loss     (ril_fast/step.py)
      -> backward -> optimizer step (ril_fast/engine.py) -> EMA teacher update (ril_fast/methods/teacher.py)

Run state, checkpoints and resume live in ``ril_fast/run_state.py``; evaluation rows, results.json,
grids and plots in ``ril_fast/results.py``.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import sys
import time
from pathlib import Path

if __package__ in (None, ""):  # `deepspeed ril_fast/train.py` runs this file as a script
    # Python put this file's folder first on sys.path, where our `kernels`, `models`, `config` ...
    # would shadow top-level packages of the same name (bitsandbytes imports `kernels`): the
    # repository root takes its place.
    _here = os.path.dirname(os.path.abspath(__file__))
    sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _here]
    sys.path.insert(0, os.path.dirname(_here))

import torch  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402

from ril_fast import checkpoint as ckpt  # noqa: E402
from ril_fast import engine as eng  # noqa: E402
from ril_fast import logs, lora, report, rewards  # noqa: E402
from ril_fast.config import Config, ConfigError, check_available, load_config, read_prompts  # noqa: E402
from ril_fast.methods.teacher import ema_update, reset_ema  # noqa: E402
from ril_fast.metrics_log import MetricsLog  # noqa: E402
from ril_fast.results import (  # noqa: E402
    evaluate_row,
    extend_results,
    outputs_summary,
    plot_curves,
    run_metadata,
    table_view,
    write_results,
)
from ril_fast.rewards.normalize import JointReward  # noqa: E402
from ril_fast.run_state import (  # noqa: E402
    FatalRunError,
    Run,
    RunStopped,
    StopState,
    adapters_for_task,
    ensure_adapters,
    global_step,
    idle_reward_device,
    preflight,
    resume,
    reward_normalizer,
    save,
    stop_message,
    stop_on_signals,
    stop_requested,
)
from ril_fast.sampling import compile_unet  # noqa: E402
from ril_fast.step import compute_loss, image_size, make_batch, step_seed  # noqa: E402

_log = logging.getLogger("ril_fast")


# ---------------------------------------------------------------------------------------------
# Setup


def _adherence_fn(cfg, models):
    """Prompt-adherence metric when the model folder ships the shapes classifier (the embedded model)."""
    folder = Path(models.path) / "classifier"
    if not cfg.eval.adherence or not folder.is_dir():
        return None
    from ril_fast.rewards.adherence import adherence_accuracy, load_classifier

    classifier = load_classifier(folder)
    return lambda images, prompts: adherence_accuracy(images, prompts, classifier=classifier)


def build_run(cfg: Config) -> Run:
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
    models.apply_memory_features(cfg.memory)  # the same switches the planner traces
    layers = lora.inject_adapter_group(models.unet, cfg.lora.targets)
    compile_unet(models, cfg)  # train.compile
    height, width = image_size(models, cfg)
    cache = PromptCache(models, device=device, height=height, width=width)
    train_prompts = [read_prompts(t.train_prompts, f"tasks.{i}.train_prompts") for i, t in enumerate(cfg.tasks)]
    eval_prompts = [read_prompts(t.eval_prompts, f"tasks.{i}.eval_prompts") for i, t in enumerate(cfg.tasks)]
    # Text encoders run once per unique prompt; afterwards they are moved off the device or freed.
    unique = sorted({p for ps in train_prompts + eval_prompts for p in ps} | {cfg.sampling.negative_prompt})
    cache.warm(unique)
    free_text_encoders(models, cfg.memory.text_encoders)
    try:
        reward_fns = [rewards.build(t.reward, **rewards.build_options(t, cfg.memory)) for t in cfg.tasks]
    except (ValueError, ImportError, AttributeError) as exc:
        raise ConfigError([f"tasks: a reward cannot be built: {exc}"]) from None
    for fn in reward_fns if idle_reward_device(cfg, device) is not None else []:
        rewards.place(fn, "cpu")  # each comes to the device for its own task (stage_rewards) or scoring
    is_main = eng.rank() == 0
    return Run(cfg=cfg, device=device, models=models, layers=layers, prompt_cache=cache, rewards=reward_fns,
               train_prompts=train_prompts, eval_prompts=eval_prompts, log=MetricsLog(cfg.output_dir, is_main),
               is_main=is_main, adherence_fn=_adherence_fn(cfg, models))


# ---------------------------------------------------------------------------------------------
# The task sequence


def run_all(cfg: Config) -> dict:
    """Train and evaluate every task of ``cfg``, resuming from the newest checkpoint under ``output_dir``.

    Raises:
        RunStopped: SIGINT/SIGTERM (its message says where, and which checkpoint a rerun resumes from).
    """
    logs.setup()
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
            write_results(run)
            plot_curves(run, task)
        save(run, task, "done", cfg.tasks[task].steps)
        ckpt.fault_point("task_boundary")
        task, phase, step, optim = task + 1, "start", 0, None
    # a rerun with nothing left to do writes the same bytes: the stamp comes from the checkpoint
    res = write_results(run)
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
# One task


def begin_task(run: Run, task: int) -> None:
    """New pair (A random, B = 0) for group methods, a fresh one for ``independent``; the teacher's copy
    (EMA, LwF) and the L2 anchor start as the current model."""
    ensure_adapters(run, adapters_for_task(run.cfg, task))
    if run.cfg.method.name == "independent" and task > 0:  # (resets the EMA copy to the fresh pair too)
        lora.reinit_newest(run.layers, seed=step_seed(run.cfg.seed, task, 0, "adapter"), init=run.cfg.lora.init)
    else:
        reset_ema(run.layers)


def task_objective(run: Run, task: int):
    """(reward callable, normaliser, training prompts) of a task's loss: its own reward, or for ``joint``
    the sum of the normalised rewards of tasks 1..t on the union of their training prompts."""
    if run.cfg.method.name != "joint":
        return run.rewards[task], reward_normalizer(run, task), run.train_prompts[task]
    seen = range(task + 1)
    joint = JointReward([run.rewards[i] for i in seen], [reward_normalizer(run, i) for i in seen])
    prompts = list(dict.fromkeys(p for i in seen for p in run.train_prompts[i]))
    return joint, None, prompts


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
    """Steps ``start_step..`` of ``task``: per step, ``grad_accum`` micro-batches of loss and backward,
    one optimizer step, the EMA teacher update; metrics, and a checkpoint every ``checkpoint_every``."""
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
            # 1. prompts, noise and K drawn from step_seed; the prompts' cached text embeddings
            batch = make_batch(run.models, cfg, run.prompt_cache, prompts, task,
                               (step * cfg.train.grad_accum + micro) * eng.world_size() + eng.rank(), run.device)
            # 2. sampler (K-step grad window) -> teacher -> VAE decode -> reward -> loss
            out = compute_loss(run.models, run.layers, reward_fn, batch, cfg, use_distill, reward_norm=reward_norm,
                               use_l2=cfg.method.penalizes_on_task(task))
            if not engine.loss_is_finite(out.loss):
                finite = False
                break
            engine.backward(out.loss)  # 3. into the newest adapter pair only
            rewards_.append(out.reward.mean())
            if out.distill is not None:
                distills.append(out.distill)
        grad_norm, stepped = engine.step() if finite else (None, False)  # 4. clip, optimizer step
        if not finite:
            engine.zero_grad()
        if stepped and finite:
            bad = 0
            if cfg.method.teacher == "ema":  # 5. the momentum teacher follows the student
                ema_update(run.layers, cfg.method.decay(tcfg.steps))
        else:
            bad += 1
            _log.warning("task %d step %d: non-finite loss or gradient, step skipped (%d in a row)", task + 1, step + 1,
                         bad)
        run.bad_in_a_row = bad
        record = {"kind": "train", "task": task + 1, "step": step + 1, "skipped": not (stepped and finite),
                  "bad_in_a_row": bad, "step_seconds": time.perf_counter() - t0,
                  "global_step": global_step(cfg, task, step + 1)}
        if rewards_:  # the mean over every rank's batch (one host sync a step, for the progress bar)
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


# ---------------------------------------------------------------------------------------------
# Command line


def parse_args(argv=None, prog: str = "python -m ril_fast.train") -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="JSON config (configs/tiny.json is the embedded default)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, e.g. --set tasks.0.steps=5 (repeatable)")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # the deepspeed launcher
    return parser.parse_args(argv)


def main(argv=None, prog: str = "python -m ril_fast.train") -> int:
    args = parse_args(argv, prog)
    try:
        return _main(args)
    except KeyboardInterrupt as exc:  # one line, never a traceback; RunStopped says where and how to resume
        message = getattr(exc, "message", "") or "interrupted before training started; nothing to resume"
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"ril_fast: {message}", file=sys.stderr, flush=True)
        return 128 + getattr(exc, "signum", signal.SIGINT)


def _main(args) -> int:
    try:
        cfg = load_config(args.config, args.set)
        check_available(cfg)  # before the run folder exists and before any planning or loading
        preflight(cfg)
    except ConfigError as exc:
        for problem in exc.problems:
            print(f"ril_fast: config error: {problem}", file=sys.stderr)
        return 2
    try:
        run_all(cfg)
    except ConfigError as exc:  # found while loading the model or building rewards, before training
        for problem in exc.problems:
            print(f"ril_fast: config error: {problem}", file=sys.stderr)
        return 2
    except FatalRunError as exc:
        print(f"ril_fast: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:
        if exc.errno not in _DISK_FULL:
            raise
        # metrics, results.json, grids, plots, adapters: whatever filled the disk, the checkpoints are
        # written atomically and verified, so the same command resumes once there is space
        print(f"ril_fast: cannot write {exc.filename or 'under ' + str(cfg.output_dir)} ({exc.strerror or exc}); "
              "the last checkpoint is intact: free space and rerun the same command", file=sys.stderr)
        return 1
    return 0


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)


if __name__ == "__main__":
    sys.exit(main())
