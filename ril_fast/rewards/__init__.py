"""Reward registry.

A reward is a callable ``(images[B,3,H,W] in [0,1], prompts: list[str]) -> Tensor[B]``, higher is
better, differentiable w.r.t. ``images``. Built-in rewards are registered by short name; a user's
own reward is named ``module:function`` (a factory or a reward with that signature) and imported
only when a config names it.
"""

from __future__ import annotations

import difflib
import importlib
import inspect
from collections.abc import Callable

import torch

Reward = Callable[[torch.Tensor, list], torch.Tensor]

# name -> (module path, factory name). Modules import lazily so that `names()` stays cheap.
_REGISTRY: dict[str, tuple[str, str]] = {
    "brightness": ("ril_fast.rewards.simple", "Brightness"),
    "colorfulness": ("ril_fast.rewards.simple", "Colorfulness"),
    "contrast": ("ril_fast.rewards.simple", "Contrast"),
    "prompt_adherence": ("ril_fast.rewards.adherence", "PromptAdherence"),
    "smoothness": ("ril_fast.rewards.simple", "Smoothness"),
    "jpeg_compressibility": ("ril_fast.rewards.jpeg", "JpegCompressibility"),
    "jpeg_incompressibility": ("ril_fast.rewards.jpeg", "JpegIncompressibility"),
    "aesthetic": ("ril_fast.rewards.clip_rewards", "AestheticReward"),
    "pickscore": ("ril_fast.rewards.clip_rewards", "PickScoreReward"),
    "hpsv2": ("ril_fast.rewards.clip_rewards", "HPSv2Reward"),
    "imagereward": ("ril_fast.rewards.imagereward", "ImageRewardReward"),
}


# Rewards with a model: they take ``memory.reward_dtype`` / ``memory.reward_checkpoint`` (build_options),
# and the memory planner builds each one's tower on meta from ``ril_fast/models/arch/<tower>.json``.
TOWERS = {"aesthetic": "clip_vit_l14", "hpsv2": "clip_vit_h14", "pickscore": "clip_vit_h14",
          "imagereward": "imagereward_blip"}


def register(name: str, module: str, factory: str) -> None:
    """Register a built-in reward factory by dotted module path and attribute name."""
    _REGISTRY[name] = (module, factory)


def names() -> list[str]:
    """Sorted names of the registered rewards."""
    return sorted(_REGISTRY)


def is_user_reward(name: str) -> bool:
    return ":" in name


def check_name(name: str) -> None:
    """Raise ValueError for a name that is neither registered nor ``module:function``."""
    if is_user_reward(name):
        module, _, attr = name.partition(":")
        if not module or not attr:
            raise ValueError(f"user reward {name!r} must be written 'module:function'")
        return
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, names(), n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown reward {name!r}{hint}; known rewards: {', '.join(names())}, or 'module:function'")


def place(reward, device) -> None:
    """Move a reward's model to ``device`` (rewards of idle tasks wait on the CPU).

    Rewards with a model implement ``to_device(device)``; model-free rewards, and user rewards
    without that method, stay where they are.
    """
    mover = getattr(reward, "to_device", None)
    if callable(mover):
        mover(torch.device(device))


def factory(name: str):
    """The class (or function) that builds the registered reward ``name``, imported on first use."""
    module, attr = _REGISTRY[name]
    return getattr(importlib.import_module(module), attr)


def build(name: str, **kwargs) -> Reward:
    """Build the reward ``name`` with options ``kwargs``.

    Raises:
        ValueError: unknown name, or options the reward does not take.
    """
    check_name(name)
    if is_user_reward(name):
        module, _, attr = name.partition(":")
        obj = getattr(importlib.import_module(module), attr)
        # A user reward is either the reward itself (no options) or a factory taking options.
        return CheckedReward(obj(**kwargs) if kwargs else obj, name)
    try:
        return factory(name)(**kwargs)
    except TypeError as exc:
        raise ValueError(f"reward {name!r} rejected its options {sorted(kwargs)}: {exc}") from None


def build_options(task, memory) -> dict:
    """The options :func:`build` gets for a config's ``task``: its ``reward_options``, plus the
    ``memory`` section's reward_dtype and reward_checkpoint for rewards with a model (explicit
    reward_options win). The trainer and the memory planner both build rewards with these."""
    options = dict(task.reward_options)
    if task.reward in TOWERS:
        options.setdefault("dtype", memory.reward_dtype)
        options.setdefault("gradient_checkpointing", memory.reward_checkpoint)
    return options


def missing_weights(name: str, options: dict) -> list[str]:
    """One line per weight file or folder the reward ``name`` would load with ``options`` that is neither
    a local path nor in the local HF cache (lookups only, nothing loads; empty for model-free rewards)."""
    if is_user_reward(name) or name not in _REGISTRY:
        return []
    reward_cls = factory(name)
    if not hasattr(reward_cls, "weight_specs"):
        return []
    from ril_fast.rewards import weight_files

    bound = inspect.signature(reward_cls).bind(**options)
    bound.apply_defaults()
    problems = []
    for option, spec, kind in reward_cls.weight_specs(bound.arguments):
        try:
            (weight_files.resolve_file if kind == "file" else weight_files.resolve_dir)(spec, option)
        except ValueError as exc:
            problems.append(f"reward {name!r}: {exc}")
    return problems


def check_prompts(name: str, prompts: list[str]) -> str | None:
    """Validation: a one-line problem when the registered reward ``name`` cannot read ``prompts``
    (rewards that parse their prompts define ``check_prompts``), else None."""
    if is_user_reward(name) or name not in _REGISTRY:
        return None
    check = getattr(factory(name), "check_prompts", None)
    return check(prompts) if check is not None else None


class CheckedReward:
    """A user reward that is checked the first time it runs: one finite score per image (shape [B]),
    and, the first time gradients are on, a score that depends on the images differentiably. A bad
    one stops the run with a config error naming it (not "element 0 of tensors does not require
    grad" from backward, or a broadcast loss that trains on nonsense). Attributes pass through.
    """

    def __init__(self, fn, name: str):
        self.fn, self.name = fn, name
        self._values_checked = self._grad_checked = False

    def __getattr__(self, attr):  # to_device and the like reach the user's object
        return getattr(self.fn, attr)

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        out = self.fn(images, prompts)
        if not self._values_checked:
            self._fail_unless(isinstance(out, torch.Tensor), f"returned {type(out).__name__}, not a tensor")
            batch = images.shape[0]
            self._fail_unless(tuple(out.shape) == (batch,), f"returned shape {list(out.shape)} for {batch} images; "
                              "return one score per image, shape [B]")
            self._fail_unless(out.is_floating_point(), f"returned dtype {out.dtype}; return floating-point scores")
            # Finite on the first evaluation call (the base row of a fresh run): a reward that is NaN
            # everywhere stops there. A non-finite training step is the bad-step streak's to handle
            # (train.max_bad_steps), also on the first call after a resume.
            if out.device.type != "meta" and not torch.is_grad_enabled():  # meta: the planner's trace
                self._fail_unless(bool(torch.isfinite(out.detach()).all()), "returned non-finite scores (nan/inf) "
                                  f"on its first call: {out.detach().flatten()[:4].tolist()}")
            self._values_checked = True
        if not self._grad_checked and torch.is_grad_enabled() and images.requires_grad:
            self._fail_unless(out.requires_grad, "returned scores with no gradient with respect to the images; "
                              "compute them from the images with differentiable torch ops (no .item(), .detach(), "
                              "numpy or PIL)")
            self._grad_checked = True
        return out

    def _fail_unless(self, ok: bool, what: str) -> None:
        if not ok:
            from ril_fast.errors import ConfigError

            raise ConfigError([f"reward {self.name!r} {what}"])
