"""The teacher copy of the trainable pair: how RID, LwF and the L2 baseline use it (docs/design.md §2).

Every LoRAGroupLinear holds one copy of its newest (trainable) pair in the buffers ``ema_a`` /
``ema_b``. At the start of a task it is set to the current pair (:func:`reset_ema`). RID then moves
it toward the student after every optimizer step (:func:`ema_update`, the momentum teacher); LwF
leaves it frozen (the model before the task); the L2 baseline measures the student's distance from
it (:func:`l2_penalty`). :func:`teacher_mode` runs a forward as the teacher: the pair swapped for its
copy, or (``base``) no adapter at all. The copy costs one adapter pair of memory, no second UNet.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from ril_fast.lora.group import LoRAGroupLinear


@contextlib.contextmanager
def teacher_mode(layers: Sequence[LoRAGroupLinear], teacher: str = "ema") -> Iterator[None]:
    """Run the forward as the teacher inside the block; restores the previous state.

    ``ema`` and ``previous``: the newest pair swapped for its copy in ``ema_a`` / ``ema_b`` (a momentum
    copy, or one frozen at the start of the task). ``base``: no adapter at all (the base model).
    """
    if teacher not in ("ema", "previous", "base"):
        raise ValueError(f"teacher must be 'ema', 'previous' or 'base', got {teacher!r}")
    previous = [(layer.use_teacher, layer.active_tasks) for layer in layers]
    for layer in layers:
        if teacher == "base":
            layer.active_tasks = 0
        else:
            layer.use_teacher = True
    try:
        yield
    finally:
        for layer, (flag, active) in zip(layers, previous):
            layer.use_teacher, layer.active_tasks = flag, active


@torch.no_grad()
def ema_update(layers: Sequence[LoRAGroupLinear], decay: float) -> None:
    """θ_ema ← m·θ_ema + (1−m)·θ for the newest pair of every layer (one foreach call)."""
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
    ema, params = [], []
    for layer in layers:
        ema.extend(layer.ema_pair())
        params.extend(p.detach() for p in layer.trainable_pair())
    if ema:
        # lerp(ema, θ, 1−m) = ema + (1−m)(θ − ema) = m·ema + (1−m)·θ
        torch._foreach_lerp_(ema, params, 1.0 - decay)


def reset_ema(layers: Sequence[LoRAGroupLinear]) -> None:
    """Set every EMA copy to the current trainable pair (start of a task)."""
    for layer in layers:
        layer.reset_ema()


def l2_penalty(layers: Sequence[LoRAGroupLinear]) -> torch.Tensor:
    """Mean over layers of ``||s·(B A − B₀ A₀)||²_F``: how far the trainable pair's weight update moved from
    its copy at the start of the task (held in ``ema_a`` / ``ema_b``, never updated for method l2).

    Computed from rank × rank Gram matrices, never forming the d_out × d_in product:
    ``||BA − B₀A₀||² = Σ(BᵀB ∘ AAᵀ) − 2 Σ(BᵀB₀ ∘ AA₀ᵀ) + Σ(B₀ᵀB₀ ∘ A₀A₀ᵀ)``.
    """
    total = None
    for layer in layers:
        a, b = (t.float() for t in layer.trainable_pair())
        a0, b0 = (t.float() for t in layer.ema_pair())
        s2 = layer.scales[-1] ** 2
        sq = ((b.T @ b) * (a @ a.T)).sum() - 2 * ((b.T @ b0) * (a @ a0.T)).sum() + ((b0.T @ b0) * (a0 @ a0.T)).sum()
        term = s2 * sq
        total = term if total is None else total + term
    if total is None:
        raise ValueError("l2_penalty needs at least one LoRAGroupLinear layer")
    return total / len(layers)
