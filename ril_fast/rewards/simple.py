"""Model-free differentiable rewards: images (B, 3, H, W) in [0, 1] -> (B,), higher is better.

Cheap stand-ins for the field's rewards that run anywhere: brightness and contrast (aesthetic-like
global statistics), colorfulness (Hasler & Süsstrunk 2003, eq. 3), and smoothness (negative total
variation: a compressibility surrogate, since JPEG spends its bits on high-frequency detail).
"""

from __future__ import annotations

import torch

# ITU-R BT.601 luma weights.
_LUMA = (0.299, 0.587, 0.114)


def _luma(images: torch.Tensor) -> torch.Tensor:
    r, g, b = images.unbind(1)
    return _LUMA[0] * r + _LUMA[1] * g + _LUMA[2] * b  # (B, H, W)


def _check(images: torch.Tensor) -> None:
    if images.dim() != 4 or images.shape[1] != 3:
        raise ValueError(f"rewards take images of shape (B, 3, H, W), got {tuple(images.shape)}")


class Brightness:
    """Mean luma in [0, 1]."""

    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        _check(images)
        return _luma(images.float()).flatten(1).mean(1)


class Contrast:
    """Standard deviation of luma (RMS contrast), in [0, 0.5]."""

    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        _check(images)
        return _luma(images.float()).flatten(1).std(1, unbiased=False)


class Colorfulness:
    """Hasler & Süsstrunk colorfulness M = σ_rgyb + 0.3·μ_rgyb on [0, 1] RGB (×255 gives the paper's scale)."""

    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        _check(images)
        r, g, b = images.float().flatten(2).unbind(1)  # each (B, H·W)
        rg = r - g
        yb = 0.5 * (r + g) - b
        std = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False) + 1e-12).sqrt()
        mean = (rg.mean(1).square() + yb.mean(1).square() + 1e-12).sqrt()
        return std + 0.3 * mean


class Smoothness:
    """Negative mean absolute difference between neighbouring pixels (anisotropic total variation)."""

    def __call__(self, images: torch.Tensor, prompts=None) -> torch.Tensor:
        _check(images)
        x = images.float()
        dx = (x[..., :, 1:] - x[..., :, :-1]).abs().flatten(1).mean(1)
        dy = (x[..., 1:, :] - x[..., :-1, :]).abs().flatten(1).mean(1)
        return -(dx + dy)
