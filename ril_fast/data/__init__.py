"""Procedural data sets (the embedded default model's pretraining data)."""

from ril_fast.data.shapes import (
    BACKGROUNDS,
    COLOURS,
    SHAPES,
    all_prompts,
    caption,
    eval_prompts,
    parse_prompt,
    render,
    sample,
    sample_labels,
    train_prompts,
)

__all__ = [
    "BACKGROUNDS",
    "COLOURS",
    "SHAPES",
    "all_prompts",
    "caption",
    "eval_prompts",
    "parse_prompt",
    "render",
    "sample",
    "sample_labels",
    "train_prompts",
]
