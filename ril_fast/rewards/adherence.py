"""Prompt-adherence reward for the embedded shapes model.

A small CNN with three heads (shape, colour, background) trained on ``ril_fast.data.shapes``
judges whether an image shows what its caption asks for. ``PromptAdherence`` turns that into a
differentiable reward: the mean over the three heads of log p(prompted label | image).
``adherence_accuracy`` is the matching evaluation metric (fraction of images with the prompted
shape / colour / background as the classifier's top choice).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ril_fast.data import shapes

DEFAULT_DIR = Path(__file__).resolve().parent.parent / "assets" / "embedded" / "classifier"
HEADS = ("shape", "colour", "background")


class ShapeClassifier(nn.Module):
    """Conv net on 32x32 RGB in [0, 1]; returns one logit tensor per head ``[B, n_classes]``."""

    def __init__(self, width: int = 32, n_shapes: int = len(shapes.SHAPES), n_colours: int = len(shapes.COLOURS),
                 n_backgrounds: int = len(shapes.BACKGROUNDS)):
        super().__init__()
        self.config = {"width": width, "n_shapes": n_shapes, "n_colours": n_colours, "n_backgrounds": n_backgrounds}
        w = width

        def block(cin, cout, stride):
            return [nn.Conv2d(cin, cout, 3, stride, 1), nn.GroupNorm(8, cout), nn.SiLU()]

        self.features = nn.Sequential(
            *block(3, w, 1), *block(w, w, 1), *block(w, 2 * w, 2), *block(2 * w, 2 * w, 1),
            *block(2 * w, 4 * w, 2), *block(4 * w, 4 * w, 2),
        )
        # Global max and mean pooling: shape evidence is local and its position varies.
        self.heads = nn.ModuleDict({
            "shape": nn.Linear(8 * w, n_shapes),
            "colour": nn.Linear(8 * w, n_colours),
            "background": nn.Linear(8 * w, n_backgrounds),
        })

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        if images.shape[-1] != shapes.RESOLUTION or images.shape[-2] != shapes.RESOLUTION:
            images = F.interpolate(images, size=(shapes.RESOLUTION,) * 2, mode="bilinear", antialias=True,
                                   align_corners=False)
        h = self.features(images * 2 - 1)
        h = torch.cat([h.amax((2, 3)), h.mean((2, 3))], 1)
        return {k: head(h) for k, head in self.heads.items()}


def save_classifier(model: ShapeClassifier, folder: str | os.PathLike) -> None:
    """Write ``model.safetensors`` + ``config.json`` into ``folder`` atomically (temp + replace)."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / "model.safetensors.tmp"
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(tmp))
    os.replace(tmp, folder / "model.safetensors")
    tmp = folder / "config.json.tmp"
    tmp.write_text(json.dumps(model.config, indent=2))
    os.replace(tmp, folder / "config.json")


def load_classifier(folder: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> ShapeClassifier:
    """Load the shipped classifier (or one saved with :func:`save_classifier`), frozen, in eval mode."""
    from safetensors.torch import load_file

    folder = Path(folder) if folder is not None else DEFAULT_DIR
    weights = folder / "model.safetensors"
    if not weights.is_file():
        raise RuntimeError(f"no classifier weights at {weights}; rebuild them with `python scripts/build_embedded.py`")
    model = ShapeClassifier(**json.loads((folder / "config.json").read_text()))
    model.load_state_dict(load_file(str(weights)))
    model.requires_grad_(False).eval()
    return model.to(device)


def prompt_labels(prompts: list[str], device: str | torch.device = "cpu") -> torch.Tensor:
    """Long tensor ``[B, 3]`` of the (shape, colour, background) each prompt asks for."""
    return torch.tensor([shapes.parse_prompt(p) for p in prompts], dtype=torch.long, device=device)


class PromptAdherence(nn.Module):
    """Reward: mean over the shape/colour/background heads of log p(prompted label | image).

    Higher is better; 0 is a perfectly confident correct image. Differentiable in ``images``.

    Args:
        folder: classifier folder. Default: the one shipped with the embedded model.
        use_prob: return the mean probability (in [0, 1]) instead of the mean log-probability.
            Default: False.
        heads: which heads to average. Default: all three.
    """

    @staticmethod
    def check_prompts(prompts: list[str]) -> str | None:
        """Validation: None when every prompt is a shapes caption, else what is wrong with the first
        that is not (with how many more), so a config is refused before training, not in task 1."""
        bad = []
        for prompt in prompts:
            try:
                shapes.parse_prompt(prompt)
            except ValueError as exc:
                bad.append(str(exc))
        if not bad:
            return None
        return bad[0] + (f" ({len(bad) - 1} more prompts like it)" if len(bad) > 1 else "")

    def __init__(self, folder: str | None = None, use_prob: bool = False, heads: tuple[str, ...] = HEADS):
        super().__init__()
        bad = [h for h in heads if h not in HEADS]
        if bad or not heads:
            raise ValueError(f"heads {tuple(heads)} not allowed; choose a non-empty subset of {HEADS}")
        self.classifier = load_classifier(folder)
        self.use_prob = use_prob
        self.heads = tuple(heads)

    def forward(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        if images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W], got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"got {images.shape[0]} images but {len(prompts)} prompts; pass one prompt per image")
        self.classifier.to(images.device)
        labels = prompt_labels(prompts, images.device)
        logits = self.classifier(images.float())
        scores = []
        for h in self.heads:
            logp = F.log_softmax(logits[h], -1).gather(1, labels[:, HEADS.index(h), None])[:, 0]
            scores.append(logp.exp() if self.use_prob else logp)
        return torch.stack(scores, 0).mean(0)


@torch.no_grad()
def adherence_accuracy(images: torch.Tensor, prompts: list[str], classifier: ShapeClassifier | None = None) -> dict:
    """Fraction of images whose top-1 shape / colour / background match the prompt, and all three."""
    classifier = classifier if classifier is not None else load_classifier()
    classifier.to(images.device)
    labels = prompt_labels(prompts, images.device)
    logits = classifier(images.float())
    hits = torch.stack([logits[h].argmax(-1) == labels[:, i] for i, h in enumerate(HEADS)], 1)
    out = {h: hits[:, i].float().mean().item() for i, h in enumerate(HEADS)}
    out["all"] = hits.all(1).float().mean().item()
    out["n"] = int(images.shape[0])
    return out
