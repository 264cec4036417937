"""Reward normalisation, so rewards whose scales differ by 100x can be mixed or compared.

Two modes, both ``(r - offset) / scale``:

- ``fixed``: offset and scale from the config (or ``TYPICAL[name]``, the documented typical centre and
  spread of each built-in reward on SD-class images; see docs/rewards.md).
- ``ema``: running mean and variance of the raw rewards, exponential moving average with ``momentum``
  (bias-corrected, so the first batch already gives its own mean/std). Statistics are updated from
  detached values only while ``update=True``; checkpoints carry them through ``state_dict``.

The gradient passes through as ``grad / scale``: the statistics are constants for the backward.
"""

from __future__ import annotations

import math

import torch
from torch import nn

# name -> (typical centre, typical spread). Starting points for `fixed`, from the published ranges.
TYPICAL: dict[str, tuple[float, float]] = {
    "aesthetic": (5.5, 0.5),  # LAION aesthetic v2, SD1.5 ~5-5.5, trained models ~6-7
    "hpsv2": (0.27, 0.02),  # HPS v2/v2.1 cosine, SD1.5 ~0.27
    "pickscore": (21.0, 1.0),  # PickScore v1, ~18-23
    "imagereward": (0.0, 1.0),  # ImageReward is already standardised
    # rough: q95 spends ~1-3 bits/pixel on photographic content, 512 px -> ~30-100 kB. Not measured on SD
    # samples here; prefer mode="ema" (or measure the base model) for the JPEG rewards.
    "jpeg_compressibility": (-60.0, 20.0),
    "jpeg_incompressibility": (60.0, 20.0),
}


class RunningNorm(nn.Module):
    """EMA mean/variance of a scalar stream. ``state_dict`` holds ``mean``, ``var``, ``weight``."""

    def __init__(self, momentum: float = 0.99, eps: float = 1e-6):
        super().__init__()
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"momentum must be in [0, 1); got {momentum}")
        self.momentum, self.eps = momentum, eps
        # raw (bias-uncorrected) EMAs of x and x^2 and of the weight 1, as in Adam's bias correction
        self.register_buffer("mean", torch.zeros((), dtype=torch.float64))
        self.register_buffer("sq", torch.zeros((), dtype=torch.float64))
        self.register_buffer("weight", torch.zeros((), dtype=torch.float64))

    @torch.no_grad()
    def update(self, x: torch.Tensor) -> None:
        x = x.detach().double().flatten()
        if x.numel() == 0 or not torch.isfinite(x).all():
            return  # a NaN batch must not poison the statistics forever
        m = self.momentum
        self.mean.mul_(m).add_((1 - m) * x.mean().to(self.mean.device))
        self.sq.mul_(m).add_((1 - m) * (x * x).mean().to(self.sq.device))
        self.weight.mul_(m).add_(1 - m)

    def stats(self) -> tuple[float, float]:
        """(mean, std); (0, 1) before the first update."""
        w = float(self.weight)
        if w == 0.0:
            return 0.0, 1.0
        mean = float(self.mean) / w
        var = max(float(self.sq) / w - mean * mean, 0.0)
        return mean, math.sqrt(var + self.eps)


class NormalizedReward(nn.Module):
    """Wrap a reward: ``(reward(images, prompts) - offset) / scale``.

    Args:
        reward: the raw reward callable.
        mode: "fixed" or "ema".
        offset, scale: for "fixed"; default ``TYPICAL[name]`` when ``name`` is given.
        momentum: for "ema".
        update: for "ema", whether calls update the statistics (turn off for evaluation).
    """

    def __init__(self, reward, mode: str = "fixed", name: str | None = None, offset: float | None = None,
                 scale: float | None = None, momentum: float = 0.99, update: bool = True):
        super().__init__()
        if mode not in ("fixed", "ema"):
            raise ValueError(f"normalisation mode must be 'fixed' or 'ema'; got {mode!r}")
        # not registered as a submodule: this module's state_dict is the statistics, not the reward model
        self.__dict__["reward"] = reward
        self.mode, self.update = mode, update
        if mode == "fixed":
            if offset is None or scale is None:
                if name not in TYPICAL:
                    raise ValueError(f"fixed normalisation needs offset and scale, or a name among {sorted(TYPICAL)}; "
                                     f"got name={name!r}")
                offset = TYPICAL[name][0] if offset is None else offset
                scale = TYPICAL[name][1] if scale is None else scale
            if not scale > 0:
                raise ValueError(f"scale must be > 0; got {scale}")
        self.offset, self.scale = offset, scale
        self.running = RunningNorm(momentum) if mode == "ema" else None

    def to_device(self, device: torch.device) -> None:
        """Move the wrapped reward's model (``rewards.place``); its running statistics stay put (they follow the reward's output device)."""
        from ril_fast.rewards import place

        place(self.reward, device)

    def forward(self, images: torch.Tensor, prompts) -> torch.Tensor:
        r = self.reward(images, prompts)
        if self.mode == "fixed":
            return (r - self.offset) / self.scale
        if self.update:
            self.running.update(r)
        mean, std = self.running.stats()
        return (r - mean) / std


class Normalizer:
    """``(r − offset) / scale`` for a task's loss: fixed offset and scale (``base_std``, ``fixed``), or the
    running statistics of the training batches (``running_momentum`` given). Gradients pass as ``grad / scale``."""

    def __init__(self, offset: float = 0.0, scale: float = 1.0, running_momentum: float | None = None):
        if not scale > 0:
            raise ValueError(f"reward scale must be > 0; got {scale}")
        self.offset, self.scale = float(offset), float(scale)
        self.running = RunningNorm(running_momentum) if running_momentum is not None else None

    def __call__(self, reward: torch.Tensor) -> torch.Tensor:
        offset, scale = self.offset, self.scale
        if self.running is not None:
            self.running.update(reward)
            offset, scale = self.running.stats()
        return (reward - offset) / scale

    def state(self) -> dict:
        """JSON-able running statistics (empty for fixed normalisation), for checkpoints."""
        if self.running is None:
            return {}
        return {k: float(v) for k, v in self.running.state_dict().items()}

    def load_state(self, state: dict) -> None:
        if self.running is not None and state:
            self.running.load_state_dict({k: torch.tensor(v, dtype=torch.float64) for k, v in state.items()})


class JointReward:
    """Sum of several tasks' normalised rewards on the same images (method ``joint``)."""

    def __init__(self, rewards: list, normalizers: list):
        if len(rewards) != len(normalizers) or not rewards:
            raise ValueError("JointReward needs one normaliser (or None) per reward, and at least one reward")
        self.rewards, self.normalizers = rewards, normalizers

    def __call__(self, images: torch.Tensor, prompts) -> torch.Tensor:
        total = None
        for reward, norm in zip(self.rewards, self.normalizers):
            r = reward(images, prompts).float()
            r = r if norm is None else norm(r)
            total = r if total is None else total + r
        return total
