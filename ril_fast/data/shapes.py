"""Procedural captioned images: one coloured shape on a plain background.

The embedded default model (``ril_fast/assets/embedded``) is pretrained on this data, and its
prompt-adherence classifier judges images against the same labels. Everything is deterministic:
a batch is a pure function of ``(n, seed, split)``.

Captions read ``"a red triangle on a blue background"``. Labels are index triples
``(shape, colour, background)`` into ``SHAPES``, ``COLOURS`` and ``BACKGROUNDS``.
"""

from __future__ import annotations

import re

import torch
import torch.nn.functional as F

SHAPES = ("circle", "square", "triangle", "cross")
# Shape colours and background colours; a shape never has its background's colour.
COLOURS = ("red", "green", "blue", "yellow", "purple", "white")
BACKGROUNDS = ("black", "gray", "white", "blue")
RGB = {
    "red": (0.90, 0.12, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.12, 0.25, 0.92),
    "yellow": (0.95, 0.88, 0.10),
    "purple": (0.58, 0.15, 0.78),
    "white": (0.95, 0.95, 0.95),
    "black": (0.05, 0.05, 0.05),
    "gray": (0.50, 0.50, 0.50),
}
RESOLUTION = 32
_SUPERSAMPLE = 4  # render at 4x and average-pool: anti-aliased edges the VAE can reproduce
_JITTER = 0.05  # per-image colour jitter, so "red" is a neighbourhood and not one RGB point
# Seeds of the eval split live in a disjoint range, so train and eval images never coincide.
_EVAL_SEED_OFFSET = 1_000_003
_PROMPT_RE = re.compile(r"^\s*an? (\w+) (\w+) on an? (\w+) background\s*$")


def combos() -> list[tuple[int, int, int]]:
    """Every valid ``(shape, colour, background)`` label triple, in a fixed order."""
    return [
        (s, c, b)
        for s in range(len(SHAPES))
        for c in range(len(COLOURS))
        for b in range(len(BACKGROUNDS))
        if COLOURS[c] != BACKGROUNDS[b]
    ]


def caption(shape: int, colour: int, background: int) -> str:
    """Caption of one label triple, e.g. ``caption(2, 0, 3) == "a red triangle on a blue background"``."""
    return f"a {COLOURS[colour]} {SHAPES[shape]} on a {BACKGROUNDS[background]} background"


def parse_prompt(prompt: str) -> tuple[int, int, int]:
    """Label triple of a caption; inverse of :func:`caption`.

    Raises:
        ValueError: the prompt is not of the form "a <colour> <shape> on a <background> background".
    """
    m = _PROMPT_RE.match(prompt.lower())
    if m is None or m.group(2) not in SHAPES or m.group(1) not in COLOURS or m.group(3) not in BACKGROUNDS:
        raise ValueError(
            f"prompt {prompt!r} is not a shapes caption; write 'a <colour> <shape> on a <background> background' "
            f"with colour in {COLOURS}, shape in {SHAPES}, background in {BACKGROUNDS}"
        )
    return SHAPES.index(m.group(2)), COLOURS.index(m.group(1)), BACKGROUNDS.index(m.group(3))


def all_prompts() -> list[str]:
    return [caption(*t) for t in combos()]


def eval_prompts() -> list[str]:
    """Held-out prompts for RIL evaluation: every 4th combo (22 of 88), never in :func:`train_prompts`.

    The base model was pretrained on all combos; the split keeps RIL's reward fine-tuning and its
    evaluation on different prompts.
    """
    return [p for i, p in enumerate(all_prompts()) if i % 4 == 3]


def train_prompts() -> list[str]:
    """Prompts for RIL training: the 66 combos not in :func:`eval_prompts`."""
    return [p for i, p in enumerate(all_prompts()) if i % 4 != 3]


def vocabulary() -> list[str]:
    """Every word a caption can contain (the embedded tokenizer's word list)."""
    return ["a", "an", "on", "background", *SHAPES, *dict.fromkeys(COLOURS + BACKGROUNDS)]


def _generator(seed: int, split: str) -> torch.Generator:
    if split not in ("train", "eval"):
        raise ValueError(f"split {split!r} is not allowed; use 'train' or 'eval'")
    g = torch.Generator().manual_seed(seed + (_EVAL_SEED_OFFSET if split == "eval" else 0))
    return g


def sample_labels(n: int, seed: int = 0, split: str = "train") -> torch.Tensor:
    """``n`` label triples drawn uniformly over :func:`combos`, as a long tensor ``[n, 3]``."""
    table = torch.tensor(combos())
    idx = torch.randint(len(table), (n,), generator=_generator(seed, split))
    return table[idx]


def render(labels: torch.Tensor, seed: int = 0, split: str = "train", resolution: int = RESOLUTION) -> torch.Tensor:
    """Draw one image per label triple; size, position and colour jitter come from ``(seed, split)``.

    Args:
        labels: long tensor ``[n, 3]`` of ``(shape, colour, background)`` indices.
    Returns:
        float tensor ``[n, 3, resolution, resolution]`` in [0, 1].
    """
    labels = torch.as_tensor(labels, dtype=torch.long)
    if labels.ndim != 2 or labels.shape[1] != 3:
        raise ValueError(f"labels must have shape [n, 3], got {tuple(labels.shape)}")
    n, res = labels.shape[0], resolution
    g = _generator(seed, split)
    # Geometry in units of the image side, so every resolution draws the same picture.
    r = (0.19 + 0.16 * torch.rand(n, generator=g)) * res  # half-size: 6 to 11.5 px at 32 px
    cx = r + 1 + torch.rand(n, generator=g) * (res - 2 * r - 2)
    cy = r + 1 + torch.rand(n, generator=g) * (res - 2 * r - 2)
    jitter = (torch.rand(n, 2, 3, generator=g) * 2 - 1) * _JITTER

    s = _SUPERSAMPLE
    coords = (torch.arange(res * s, dtype=torch.float32) + 0.5) / s
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx = x[None] - cx[:, None, None]
    dy = y[None] - cy[:, None, None]
    rr = r[:, None, None]
    circle = dx**2 + dy**2 <= rr**2
    square = (dx.abs() <= 0.85 * rr) & (dy.abs() <= 0.85 * rr)
    # Upward triangle: apex at cy - r, base at cy + 0.8 r, half-width r at the base.
    triangle = (dy <= 0.8 * rr) & (dx.abs() <= (dy + rr) * (1.0 / 1.8))
    arm = 0.33 * rr
    cross = ((dx.abs() <= arm) & (dy.abs() <= rr)) | ((dy.abs() <= arm) & (dx.abs() <= rr))
    masks = torch.stack([circle, square, triangle, cross], 1).float()  # [n, 4, H*s, W*s]
    mask = masks[torch.arange(n), labels[:, 0]]
    cover = F.avg_pool2d(mask[:, None], s)  # [n, 1, H, W], fractional coverage

    palette = torch.tensor([RGB[c] for c in COLOURS])
    bg_palette = torch.tensor([RGB[c] for c in BACKGROUNDS])
    fg = (palette[labels[:, 1]] + jitter[:, 0]).clamp(0, 1)[:, :, None, None]
    bg = (bg_palette[labels[:, 2]] + jitter[:, 1]).clamp(0, 1)[:, :, None, None]
    return bg * (1 - cover) + fg * cover


def sample(n: int, seed: int = 0, split: str = "train") -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """A deterministic batch: ``(images [n,3,32,32] in [0,1], labels [n,3], captions)``."""
    labels = sample_labels(n, seed, split)
    images = render(labels, seed, split)
    return images, labels, [caption(*t) for t in labels.tolist()]
