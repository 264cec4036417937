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
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown reward {name!r}{hint} Known rewards: {', '.join(names())}, or 'module:function'")


def place(reward, device) -> None:
    """Move a reward's model to ``device`` (rewards of idle tasks wait on the CPU).

    Rewards with a model implement ``to_device(device)``; model-free rewards, and user rewards
    without that method, stay where they are.
    """
    mover = getattr(reward, "to_device", None)
    if callable(mover):
        mover(torch.device(device))


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
        return obj(**kwargs) if kwargs else obj
    module, attr = _REGISTRY[name]
    factory = getattr(importlib.import_module(module), attr)
    try:
        return factory(**kwargs)
    except TypeError as exc:
        raise ValueError(f"reward {name!r} rejected its options {sorted(kwargs)}: {exc}") from None


def missing_weights(name: str, options: dict) -> list[str]:
    """One line per weight file or folder the reward ``name`` would load with ``options`` that is neither
    a local path nor in the local HF cache (lookups only, nothing loads; empty for model-free rewards)."""
    if is_user_reward(name) or name not in _REGISTRY:
        return []
    module, attr = _REGISTRY[name]
    factory = getattr(importlib.import_module(module), attr)
    if not hasattr(factory, "weight_specs"):
        return []
    from ril_fast.rewards import weights

    bound = inspect.signature(factory).bind(**options)
    bound.apply_defaults()
    problems = []
    for option, spec, kind in factory.weight_specs(bound.arguments):
        try:
            (weights.resolve_file if kind == "file" else weights.resolve_dir)(spec, option)
        except ValueError as exc:
            problems.append(f"reward {name!r}: {exc}")
    return problems
