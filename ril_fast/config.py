"""Typed run configuration: JSON loading, ``--set`` overrides, all-errors-at-once validation.

Every default lives in a dataclass below; code reads ``cfg.section.key`` and never ``dict.get``.
Validation collects every problem and raises one :class:`ConfigError` whose lines each name the
key path, the value received and what is allowed. ``train.py`` turns it into exit code 2.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import inspect
import json
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

from ril_fast.errors import ConfigError  # raised here; importers also name it ril_fast.config.ConfigError

METHODS = ("baseline", "group", "distill", "rid", "lwf", "l2", "kl_base", "joint", "independent")

# What each method switches on (docs/design.md §2). teacher: whose outputs the student is distilled
# toward at the last step: "ema" (momentum teacher), "previous" (frozen at the model before the task,
# LwF), "base" (the base model, DRaFT+-style), or None.
_ADAPTER_PER_TASK = ("group", "rid")
_TEACHER = {"distill": "ema", "rid": "ema", "lwf": "previous", "kl_base": "base"}


@dataclass
class ModelConfig:
    """The frozen base model."""

    path: str = "ril_fast/assets/embedded"  # local diffusers folder (model_index.json) or a hub id when online
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # frozen base weights
    device: str = "auto"  # auto = cuda:<local_rank> when available, else cpu


@dataclass
class MethodConfig:
    """How the task sequence is learnt: adapters, teacher, distillation (docs/design.md §2)."""

    # baseline: one LoRA trained task after task; group: a new adapter per task, older ones frozen;
    # distill: one LoRA + EMA-teacher distillation; rid: both (the method); lwf (teacher frozen at the
    # previous model), l2 (penalty toward it), kl_base (distil toward the base model), joint (all rewards
    # at once, an upper bound), independent (one adapter per task from the base, a per-task oracle)
    name: Literal["baseline", "group", "distill", "rid", "lwf", "l2", "kl_base", "joint", "independent"] = "rid"
    # momentum teacher: θ_ema ← m·θ_ema + (1−m)·θ after every optimizer step. None: m = 1 − 1/steps of the
    # task, a time constant of one task, so the teacher still holds the previous model for most of it;
    # 1.0 freezes the teacher at the previous model (rid with 1.0 = adapter group + LwF).
    ema_decay: Optional[float] = None
    reward_weight: float = 1.0  # α in L = −α·reward + λ·distill + μ·l2 (the reward normalised per task.reward_norm)
    # λ, in ε units: the last-step loss is the MSE of the two predicted noises, whatever the scheduler or
    # prediction type (x0 targets are weighted by ᾱ/(1−ᾱ)), so one λ means the same on every model
    distill_weight: float = 1.0
    distill_mode: Literal["last", "full"] = "last"  # last denoising step only, or the teacher's own full chain
    distill_target: Literal["x0", "eps", "image"] = "x0"  # x0 and eps are the same loss; image: decoded pixels
    # last mode: distil on the student's own last-step input z_1, or on its final latent re-noised to a
    # timestep of the schedule drawn per batch (one more UNet call with grad; covers every noise level)
    distill_on: Literal["z1", "renoised"] = "z1"
    distill_first_task: bool = False  # on task 1 the teacher is the base model; distilling there slows learning
    l2_weight: float = 1.0  # μ of method l2: penalty on the trained adapter's change ||s·(BA − B₀A₀)||² per layer

    @property
    def adapter_per_task(self) -> bool:
        """A new adapter pair per task, earlier ones frozen (the adapter group)."""
        return self.name in _ADAPTER_PER_TASK

    @property
    def teacher(self) -> Optional[str]:
        """Distillation teacher: "ema", "previous", "base", or None."""
        return _TEACHER.get(self.name)

    @property
    def distill(self) -> bool:
        return self.teacher is not None

    def regularizes_on_task(self, task: int) -> bool:
        """Whether task ``task`` (0-based) has the method's pull toward the previous model (distillation or the
        L2 penalty): on task 1 the previous model is the base model, so only with ``distill_first_task``;
        kl_base pulls toward the base model on every task."""
        return task > 0 or self.distill_first_task or self.teacher == "base"

    def distills_on_task(self, task: int) -> bool:
        return self.distill and self.regularizes_on_task(task)

    def penalizes_on_task(self, task: int) -> bool:
        return self.name == "l2" and self.regularizes_on_task(task)

    def decay(self, task_steps: int) -> float:
        """The EMA decay for a task of ``task_steps`` optimizer steps (``ema_decay`` or its default)."""
        if self.ema_decay is not None:
            return self.ema_decay
        return 1.0 - 1.0 / max(task_steps, 1)


@dataclass
class LoRAConfig:
    """The adapter each task trains."""

    rank: int = 4  # r of every adapter pair; memory and step time grow with it
    alpha: float = 4.0  # scale s = alpha / rank
    targets: Union[Literal["attn", "attn_ff"], list[str]] = "attn"  # presets or Linear name suffixes
    init: Literal["kaiming", "gaussian"] = "kaiming"  # of A (B starts at 0): PEFT's kaiming-uniform, or std 1/r


@dataclass
class SamplingConfig:
    """The differentiable sampler of a training step."""

    steps: int = 10  # DDIM steps per training sample
    guidance_scale: float = 5.0  # classifier-free guidance; 1.0 disables the unconditional branch
    eta: float = 0.0  # DDIM stochasticity; 0 = deterministic given the starting noise
    grad_window: int = 1  # K: gradients flow through the last K denoising steps (DRaFT-K)
    grad_window_max: Optional[int] = None  # if set, K ~ U[grad_window, grad_window_max], drawn once per batch
    height: Optional[int] = None  # pixels; None = the model's default sample size
    width: Optional[int] = None  # pixels; None = the model's default sample size
    checkpoint_unet: bool = True  # gradient checkpointing of every UNet call in the window
    negative_prompt: str = ""  # the unconditional branch of classifier-free guidance (training and evaluation)


@dataclass
class TrainConfig:
    """Optimizer, logging, checkpoints."""

    batch_size: int = 2  # prompts per optimizer step per rank
    grad_accum: int = 1  # micro-batches per optimizer step
    lr: float = 1e-3  # LoRA learning rate (tasks.N.lr overrides it per task)
    weight_decay: float = 0.0  # AdamW's decoupled weight decay of the adapters
    optimizer: Literal["adamw", "adamw8bit"] = "adamw"  # adamw8bit (bitsandbytes) keeps the moments in 8 bits
    grad_clip: float = 1.0  # 0 disables clipping
    log_every: int = 1  # optimizer steps between metrics.jsonl / TensorBoard lines (skipped steps always logged)
    # optimizer steps between mid-task checkpoints (0 = only at task ends). A hard crash loses at most
    # this many steps (about 2 min of SDXL at 5 s a step); a LoRA checkpoint writes in well under a second.
    # SIGINT/SIGTERM checkpoint the step in flight whatever this is.
    checkpoint_every: int = 25
    keep_checkpoints: int = 2  # newest checkpoints kept; more than one survives a corrupt newest
    max_bad_steps: int = 5  # consecutive non-finite losses/grads before the run stops
    deterministic: bool = False  # torch.use_deterministic_algorithms; bitwise resume on CPU
    # torch.compile the UNet calls (sampling, gradient window, teacher); see docs/kernels.md for what
    # it costs and buys per device
    compile: bool = False
    # torch CPU threads (None = torch's default). Tiny models are latency-bound: with 2 threads on a
    # 2-core machine that has any other load, a 1M-parameter UNet call went from 35 ms to 4 s.
    cpu_threads: Optional[int] = None


@dataclass
class RewardNormConfig:
    """How a task's reward is normalised in the loss: ``(r − offset) / scale``, so one λ serves rewards whose
    scales differ 100× (aesthetic ≈ 5.5, HPS ≈ 0.27, JPEG ≈ 60 kB)."""

    # base_std: offset/scale = mean/std of the reward over the base model's eval images (row 0, stored in
    # results.json as reward_scales); fixed: offset and scale below; running: EMA statistics of the
    # training batches; none: the raw reward
    mode: Literal["base_std", "fixed", "running", "none"] = "base_std"
    offset: Optional[float] = None  # fixed mode
    scale: Optional[float] = None  # fixed mode
    momentum: float = 0.99  # running mode


@dataclass
class TaskConfig:
    """One task of the sequence (``tasks`` is a list of them, trained in order)."""

    name: str = ""  # unique; labels results, grids, plots and logs
    reward: str = ""  # a registered reward name or module:function
    reward_options: dict = field(default_factory=dict)  # keyword arguments of the reward's factory
    reward_norm: RewardNormConfig = field(default_factory=RewardNormConfig)  # how the loss scales the reward
    train_prompts: Union[list[str], str] = field(default_factory=list)  # list, or a UTF-8 file with one per line
    eval_prompts: Union[list[str], str] = field(default_factory=list)  # held out; a list or a file, as above
    steps: int = 10  # optimizer steps
    lr: Optional[float] = None  # overrides train.lr for this task


@dataclass
class EvalConfig:
    """Held-out evaluation of every task after every task (the reward matrix)."""

    seeds: list[int] = field(default_factory=lambda: [0, 1])  # fixed seeds per eval prompt
    steps: Optional[int] = None  # DDIM steps; None = sampling.steps
    batch_size: int = 8  # images sampled at once (with several ranks, per rank)
    grid: bool = True  # write grids/<row>.png and TensorBoard images
    adherence: bool = True  # prompt-adherence metric when the model ships a classifier


@dataclass
class MemoryConfig:
    """Memory switches; ``python -m ril_fast.memory`` plans the peak they give (docs/memory.md)."""

    budget_gib: Optional[float] = None  # refuse configs whose planned peak exceeds this (GPU runs)
    text_encoders: Literal["keep", "cpu", "free"] = "cpu"  # after caching prompt embeddings
    # where the reward models of the tasks not being trained wait: "cpu" keeps only the current task's
    # reward on the GPU during training (each moves over for its evaluation), "device" keeps all there
    idle_rewards: Literal["cpu", "device"] = "cpu"
    vae_checkpoint: bool = True  # decode under gradient checkpointing
    vae_slice: bool = False  # decode one sample at a time
    unet_block_checkpoint: bool = False  # checkpoint blocks inside each UNet call too
    reward_dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # of model-based rewards' weights
    reward_checkpoint: bool = False  # gradient checkpointing inside model-based rewards
    attention: Literal["sdpa", "xformers"] = "sdpa"  # UNet attention; xformers needs CUDA and the [gpu] extra


@dataclass
class DeepSpeedConfig:
    """DeepSpeed engine options (used under the ``deepspeed`` launcher or with ``enabled: on``)."""

    enabled: Literal["auto", "on", "off"] = "auto"  # auto = on under the deepspeed launcher
    zero_stage: int = 0  # 0-2: partition optimizer state (1) and gradients (2) over ranks
    offload_optimizer: bool = False  # optimizer state and step on the CPU (needs zero_stage >= 1)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"  # DeepSpeed mixed precision of the training step


@dataclass
class Config:
    """A run: everything ``python -m ril_fast.train --config`` reads (top-level keys)."""

    output_dir: str = "runs/tiny"  # everything the run writes; rerunning with the same folder resumes
    seed: int = 0  # adapters' init and every training batch derive from it (step_seed); eval uses eval.seeds
    # an output_dir holding a run of a different config is cleared (its outputs only) and the run starts
    # fresh; with the same config the run resumes, so a requeued job that passes it loses nothing
    overwrite: bool = False
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    lora: LoRAConfig = field(default_factory=LoRAConfig)
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    tasks: list[TaskConfig] = field(default_factory=list)
    eval: EvalConfig = field(default_factory=EvalConfig)
    memory: MemoryConfig = field(default_factory=MemoryConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# Generic typed loading


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin is Union:
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"list of {_type_name(typing.get_args(tp)[0])}"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value: Any, tp, path: str, errors: list[str]) -> Any:
    """Convert a JSON value to ``tp``, appending a message to ``errors`` on mismatch."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            errors.append(f"{path}: expected an object, got {type(value).__name__} {value!r}")
            return tp()
        return _from_dict(tp, value, path, errors)
    if origin is Literal:
        if value not in typing.get_args(tp):
            errors.append(f"{path}: {value!r} is not one of {_type_name(tp)}")
        return value
    if origin is Union:
        for arg in typing.get_args(tp):
            trial: list[str] = []
            out = _convert(value, arg, path, trial)
            if not trial:
                return out
        errors.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return value
    if origin is list:
        if not isinstance(value, list):
            errors.append(f"{path}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
            return []
        (item,) = typing.get_args(tp)
        return [_convert(v, item, f"{path}.{i}", errors) for i, v in enumerate(value)]
    if tp is type(None):
        if value is not None:
            errors.append(f"{path}: expected null, got {value!r}")
        return None
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            errors.append(f"{path}: expected a number, got {type(value).__name__} {value!r}")
            return value
        if not math.isfinite(value):  # json.loads accepts NaN and Infinity
            errors.append(f"{path}: expected a finite number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            errors.append(f"{path}: expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp in (bool, str, dict):
        if not isinstance(value, tp):
            errors.append(f"{path}: expected {tp.__name__}, got {type(value).__name__} {value!r}")
        return value
    return value


def _from_dict(cls, data: dict, path: str, errors: list[str]):
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        where = f"{path}.{key}" if path else key
        if key not in hints:
            close = difflib.get_close_matches(key, names, n=1, cutoff=0.5)
            hint = f"; did you mean {'.'.join(filter(None, [path, close[0]]))!r}?" if close else ""
            errors.append(f"unknown key {where!r}{hint} (valid: {', '.join(names)})")
            continue
        kwargs[key] = _convert(value, hints[key], where, errors)
    try:
        return cls(**kwargs)
    except TypeError as exc:  # only reachable through type errors already reported
        errors.append(f"{path or 'config'}: {exc}")
        return cls()


# ----------------------------------------------------------------------------------------------
# Overrides


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text  # bare strings need no quotes: --set model.path=/data/sdxl


def apply_override(data: dict, assignment: str) -> None:
    """Apply ``a.b.0.c=value`` to the raw config dict (list items are reached by index)."""
    if "=" not in assignment:
        raise ConfigError([f"--set {assignment!r}: expected KEY=VALUE, e.g. --set train.lr=1e-4"])
    key, _, text = assignment.partition("=")
    parts = [p for p in key.strip().split(".") if p]
    if not parts:
        raise ConfigError([f"--set {assignment!r}: empty key"])
    node: Any = data
    for i, part in enumerate(parts[:-1]):
        node = _step_into(node, part, parts[: i + 1], assignment, create=True)
    last = parts[-1]
    if not isinstance(node, (dict, list)):  # e.g. train.lr.x=1: train.lr holds a number
        raise ConfigError([f"--set {assignment!r}: {'.'.join(parts[:-1])} is not an object"])
    if isinstance(node, list):
        idx = _index(last, node, assignment)
        node[idx] = _parse_value(text)
    else:
        node[last] = _parse_value(text)


def _index(part: str, node: list, assignment: str) -> int:
    if not part.lstrip("-").isdigit():
        raise ConfigError([f"--set {assignment!r}: {part!r} must be a list index (0..{len(node) - 1})"])
    idx = int(part)
    if not -len(node) <= idx < len(node):
        raise ConfigError([f"--set {assignment!r}: index {idx} out of range, the list has {len(node)} items"])
    return idx


def _step_into(node, part, prefix, assignment, create):
    if isinstance(node, list):
        return node[_index(part, node, assignment)]
    if not isinstance(node, dict):
        raise ConfigError([f"--set {assignment!r}: {'.'.join(prefix[:-1])} is not an object"])
    if part not in node:
        node[part] = {} if create else None
    return node[part]


# ----------------------------------------------------------------------------------------------
# Loading and validation


def load_config(path: str | os.PathLike | None, overrides: list[str] = (), base_dir: str | None = None) -> Config:
    """Load, override and validate a config. Raises ConfigError listing every problem.

    Relative paths in it (``model.path`` when it is a local folder, prompt files) are read from the
    config file's folder (or ``base_dir``), else from the working directory, so a config and its
    prompt files can move together; ``--set`` values follow the same rule.
    """
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {str(path)!r} not found"])
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ConfigError([f"config file {str(path)!r} is not valid UTF-8 JSON: {exc}"]) from None
        if not isinstance(data, dict):
            raise ConfigError([f"config file {str(path)!r} must hold a JSON object, got {type(data).__name__}"])
    for assignment in overrides:
        apply_override(data, assignment)
    folder = base_dir if base_dir is not None else (Path(path).parent if path is not None else None)
    if folder is not None:
        resolve_relative_paths(data, Path(folder))
    return config_from_dict(data)


def _next_to(spec, folder: Path):
    """``spec`` as the config file's folder resolves it, when it names something there; the text as
    written when the working directory reaches the same thing (a rerun's config stays the same) or
    when it names nothing there (a hub id, or a path of the working directory)."""
    if not isinstance(spec, str) or not spec or Path(spec).expanduser().is_absolute() or spec.startswith("~"):
        return spec
    there = folder / spec
    if not there.exists():
        return spec
    here = Path(spec)
    return spec if here.exists() and here.resolve() == there.resolve() else str(there.resolve())


def resolve_relative_paths(data: dict, folder: Path) -> None:
    """Rewrite, in the raw config ``data``, the relative paths that resolve next to the config file."""
    model = data.get("model")
    if isinstance(model, dict) and "path" in model:
        model["path"] = _next_to(model["path"], folder)
    tasks = data.get("tasks")
    for task in tasks if isinstance(tasks, list) else []:  # a malformed value is validation's to report
        if isinstance(task, dict):
            for key in ("train_prompts", "eval_prompts"):
                if key in task:
                    task[key] = _next_to(task[key], folder)


def config_from_dict(data: dict) -> Config:
    errors: list[str] = []
    cfg = _from_dict(Config, data, "", errors)
    if errors:
        raise ConfigError(errors)
    validate(cfg)
    return cfg


def read_prompts(spec: list[str] | str, where: str) -> list[str]:
    """Prompts from a list or a UTF-8 text file (one per line, blank lines ignored)."""
    if isinstance(spec, list):
        prompts = [p for p in spec if isinstance(p, str)]
    else:
        try:
            text = Path(spec).read_text(encoding="utf-8")
        except FileNotFoundError:
            looked = "" if Path(spec).is_absolute() else " (relative paths are read from the config file's folder, " \
                "then the working directory)"
            raise ConfigError([f"{where}: prompts file {spec!r} not found{looked}"]) from None
        except UnicodeDecodeError:
            raise ConfigError([f"{where}: prompts file {spec!r} is not UTF-8 text"]) from None
        except (OSError, ValueError) as exc:  # ValueError: a NUL byte in the path
            why = getattr(exc, "strerror", None) or str(exc)
            raise ConfigError([f"{where}: prompts file {spec!r} cannot be read ({why})"]) from None
        prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ConfigError([f"{where}: no prompts (give a non-empty list or a file with one prompt per line)"])
    return prompts


def _check_reward_target(name: str, options: dict) -> None:
    """Up front: a user reward's module imports and has the function; options fit the factory."""
    from ril_fast import rewards

    if rewards.is_user_reward(name):
        module, _, attr = name.partition(":")
        try:  # only the module the config names is imported; the config itself is never executed
            obj = getattr(importlib.import_module(module), attr, None)
        except Exception as exc:  # noqa: BLE001 - any import failure of user code is a config error
            raise ValueError(f"cannot import module {module!r} of {name!r} ({type(exc).__name__}: {exc}); "
                             "put it on PYTHONPATH") from None
        if not callable(obj):
            raise ValueError(f"module {module!r} has no callable {attr!r}; give 'module:function'")
        return
    if options:
        module, attr = rewards._REGISTRY[name]
        factory = getattr(importlib.import_module(module), attr)
        try:
            inspect.signature(factory).bind(**options)
        except TypeError as exc:
            raise ValueError(f"reward {name!r} does not take the options {sorted(options)} ({exc})") from None


def check_available(cfg: Config) -> None:
    """What the run loads is on this machine: the model (a complete local folder, a complete cached hub
    snapshot, or a hub id the hub serves) and every reward's weights. Seconds (lookups, at most one hub
    request), so ``train`` runs it before planning, building or creating the run folder; a missing
    model used to cost minutes of hub retries first. Raises ConfigError, one line per missing item."""
    from ril_fast import rewards
    from ril_fast.models import check_model_available

    problem = check_model_available(cfg.model.path)
    problems = [problem] if problem else []
    seen = set()
    for i, task in enumerate(cfg.tasks):
        for line in rewards.missing_weights(task.reward, task.reward_options):
            if line not in seen:  # tasks sharing a reward share its weights
                seen.add(line)
                problems.append(f"tasks.{i}.reward_options: {line}")
    if problems:
        raise ConfigError(problems)


def _positive(errors, where, value, allow_zero=False):
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        errors.append(f"{where}: must be {'>= 0' if allow_zero else '> 0'}, got {value!r}")


def _adherence_metric(cfg: Config) -> bool:
    """The evaluation scores prompt adherence: the model folder ships the shapes classifier (train.py)."""
    return cfg.eval.adherence and (Path(cfg.model.path).expanduser() / "classifier").is_dir()


def _check_precision(cfg: Config, errors: list[str]) -> None:
    """Under DeepSpeed, ``deepspeed.precision`` names the frozen base's dtype and must agree with
    ``model.dtype`` (adapters, their optimizer state and the EMA are fp32 either way; engine.py)."""
    from ril_fast.engine import PRECISION_DTYPE, use_deepspeed

    want = PRECISION_DTYPE[cfg.deepspeed.precision]
    if use_deepspeed(cfg) and want != cfg.model.dtype:
        errors.append(f"deepspeed.precision: {cfg.deepspeed.precision!r} means a {want} frozen base but model.dtype "
                      f"is {cfg.model.dtype!r}; set both the same (e.g. model.dtype=bfloat16 with "
                      "deepspeed.precision=bf16); the adapters train in fp32 either way")


def validate(cfg: Config) -> None:
    """Cross-field checks that need no heavy imports. Raises ConfigError with every problem."""
    from ril_fast import rewards
    from ril_fast.models import check_model_path

    errors: list[str] = []
    problem = check_model_path(cfg.model.path)
    if problem:
        errors.append(problem)
    if not cfg.tasks:
        errors.append("tasks: the run needs at least one task ({'name', 'reward', 'train_prompts', ...})")
    seen = set()
    for i, task in enumerate(cfg.tasks):
        where = f"tasks.{i}"
        if not task.name:
            errors.append(f"{where}.name: give each task a name")
        elif task.name in seen:
            errors.append(f"{where}.name: {task.name!r} is used by an earlier task; names must be unique")
        seen.add(task.name)
        if not task.reward:
            errors.append(f"{where}.reward: name a reward ({', '.join(rewards.names())} or module:function)")
        else:
            try:
                rewards.check_name(task.reward)
                _check_reward_target(task.reward, task.reward_options)
            except ValueError as exc:
                errors.append(f"{where}.reward: {exc}")
        for key in ("train_prompts", "eval_prompts"):
            try:
                prompts = read_prompts(getattr(task, key), f"{where}.{key}")
            except ConfigError as exc:
                errors.extend(exc.problems)
                continue
            problem = rewards.check_prompts(task.reward, prompts)  # rewards that read their prompts
            if problem:
                errors.append(f"{where}.{key}: reward {task.reward!r} cannot read them: {problem}")
            elif key == "eval_prompts" and _adherence_metric(cfg):
                problem = rewards.check_prompts("prompt_adherence", prompts)
                if problem:
                    errors.append(f"{where}.eval_prompts: the prompt-adherence metric (eval.adherence, on for this "
                                  f"model) cannot read them: {problem}; or set eval.adherence=false")
        norm = task.reward_norm
        if norm.mode == "fixed" and (norm.offset is None or norm.scale is None):
            errors.append(f"{where}.reward_norm: mode 'fixed' needs offset and scale")
        _positive(errors, f"{where}.reward_norm.scale", norm.scale)
        if not 0.0 <= norm.momentum < 1.0:
            errors.append(f"{where}.reward_norm.momentum: must be in [0, 1), got {norm.momentum}")
        _positive(errors, f"{where}.steps", task.steps, allow_zero=True)
        _positive(errors, f"{where}.lr", task.lr)
    s = cfg.sampling
    _positive(errors, "sampling.steps", s.steps)
    if s.grad_window < 1 or s.grad_window > s.steps:
        errors.append(f"sampling.grad_window: must be in 1..sampling.steps ({s.steps}), got {s.grad_window}")
    if s.grad_window_max is not None and not s.grad_window <= s.grad_window_max <= s.steps:
        errors.append(f"sampling.grad_window_max: must be in grad_window..steps ({s.grad_window}..{s.steps}), "
                      f"got {s.grad_window_max}")
    for key in ("height", "width"):
        v = getattr(s, key)
        if v is not None and (v <= 0 or v % 8):
            errors.append(f"sampling.{key}: must be a positive multiple of 8, got {v}")
    _positive(errors, "lora.rank", cfg.lora.rank)
    _positive(errors, "lora.alpha", cfg.lora.alpha)
    if cfg.method.ema_decay is not None and not 0.0 <= cfg.method.ema_decay <= 1.0:
        errors.append(f"method.ema_decay: must be in [0, 1] or null (1 − 1/task steps), got {cfg.method.ema_decay}")
    _positive(errors, "method.distill_weight", cfg.method.distill_weight, allow_zero=True)
    _positive(errors, "method.l2_weight", cfg.method.l2_weight, allow_zero=cfg.method.name != "l2")
    t = cfg.train
    for key in ("batch_size", "grad_accum", "lr", "log_every"):
        _positive(errors, f"train.{key}", getattr(t, key))
    for key in ("checkpoint_every", "grad_clip", "weight_decay"):
        _positive(errors, f"train.{key}", getattr(t, key), allow_zero=True)
    _positive(errors, "train.keep_checkpoints", t.keep_checkpoints)
    _positive(errors, "train.cpu_threads", t.cpu_threads)
    _positive(errors, "train.max_bad_steps", t.max_bad_steps)
    if not cfg.eval.seeds:
        errors.append("eval.seeds: give at least one seed")
    for where, seed in [("seed", cfg.seed)] + [(f"eval.seeds.{i}", v) for i, v in enumerate(cfg.eval.seeds)]:
        if isinstance(seed, int) and not 0 <= seed < 2**63:  # torch generators take 0 .. 2**63 - 1 here
            errors.append(f"{where}: must be in 0 .. 2**63 - 1, got {seed}")
    _positive(errors, "eval.batch_size", cfg.eval.batch_size)
    _positive(errors, "memory.budget_gib", cfg.memory.budget_gib)
    if cfg.deepspeed.zero_stage == 3:
        # Tried on CPU (gloo): ZeRO-3 partitions the frozen UNet weights, and the checkpointed window
        # recompute reads them outside DeepSpeed's gather hooks; backward fails on size-0 tensors.
        errors.append("deepspeed.zero_stage: 3 is not supported yet (partitioned frozen weights break the "
                      "checkpointed sampler's backward); use 2 with deepspeed.offload_optimizer=true")
    elif cfg.deepspeed.zero_stage not in (0, 1, 2):
        errors.append(f"deepspeed.zero_stage: must be 0, 1 or 2, got {cfg.deepspeed.zero_stage}")
    _check_precision(cfg, errors)
    if cfg.deepspeed.offload_optimizer and cfg.deepspeed.zero_stage == 0:
        errors.append("deepspeed.offload_optimizer: needs deepspeed.zero_stage >= 1")
    if cfg.train.optimizer == "adamw8bit" and cfg.deepspeed.offload_optimizer:
        errors.append("train.optimizer: adamw8bit cannot be combined with deepspeed.offload_optimizer "
                      "(DeepSpeed's CPU Adam replaces it); pick one")
    if not cfg.output_dir:
        errors.append("output_dir: give a directory for the run")
    if errors:
        raise ConfigError(errors)
