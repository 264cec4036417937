"""Put LoRAGroupLinear layers into a diffusers UNet and drive them as one group, task by task.

The functions here take the list returned by :func:`inject_adapter_group` (stable order: the
model's ``named_modules`` order), so every per-task operation is deterministic across runs and ranks.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ril_fast.lora.group import LoRAGroupLinear, init_lora_a

PRESETS: dict[str, tuple[str, ...]] = {
    "attn": ("to_q", "to_k", "to_v", "to_out.0"),
    "attn_ff": ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2"),
}


def resolve_targets(target_modules: str | Sequence[str]) -> tuple[str, ...]:
    """A preset name (``attn``, ``attn_ff``) or a list of module-name suffixes -> tuple of suffixes."""
    if isinstance(target_modules, str):
        if target_modules not in PRESETS:
            raise ValueError(
                f"target_modules={target_modules!r} is not a preset; use one of {sorted(PRESETS)} or a list of names"
            )
        return PRESETS[target_modules]
    targets = tuple(target_modules)
    if not targets or not all(isinstance(t, str) and t for t in targets):
        raise ValueError(f"target_modules must be a non-empty list of module names, got {target_modules!r}")
    return targets


def _matches(name: str, targets: tuple[str, ...]) -> bool:
    # PEFT's rule: the full name equals the target or ends with "." + target.
    return any(name == t or name.endswith("." + t) for t in targets)


def _short_name(name: str) -> str:
    # "…attn1.to_out.0" -> "to_out.0", "…attn1.to_q" -> "to_q": the suffixes a user would target.
    parts = name.split(".")
    return ".".join(parts[-2:]) if parts[-1].isdigit() and len(parts) > 1 else parts[-1]


def group_layers(model: nn.Module) -> list[LoRAGroupLinear]:
    """Every LoRAGroupLinear in ``model``, in ``named_modules`` order."""
    return [m for m in model.modules() if isinstance(m, LoRAGroupLinear)]


def inject_adapter_group(
    model: nn.Module,
    target_modules: str | Sequence[str] = ("to_q", "to_k", "to_v", "to_out.0"),
    dtype: torch.dtype = torch.float32,
) -> list[LoRAGroupLinear]:
    """Replace the matching ``nn.Linear`` modules of ``model`` by LoRAGroupLinear and freeze the model.

    Args:
        model: a diffusers UNet (SD or SDXL) or any module.
        target_modules: a preset (``attn``, ``attn_ff``) or module-name suffixes matched like PEFT.
        dtype: dtype of the adapters and EMA copies (default float32).
    Returns:
        the new layers, in the model's ``named_modules`` order. They have no adapters yet.
    Raises:
        ValueError: if nothing matched (the message lists the available linear names) or if the
            model already holds LoRAGroupLinear layers.
    """
    targets = resolve_targets(target_modules)
    if group_layers(model):
        raise ValueError("model already holds LoRAGroupLinear layers; inject once and reuse group_layers(model)")
    model.requires_grad_(False)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and _matches(n, targets)]
    if not names:
        linear = sorted({_short_name(n) for n, m in model.named_modules() if isinstance(m, nn.Linear)})
        raise ValueError(
            f"no nn.Linear in {type(model).__name__} matches target_modules={list(targets)}; "
            f"available linear names: {linear}; pick from those"
        )
    layers = []
    for name in names:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = LoRAGroupLinear(getattr(parent, child), dtype=dtype, name=name)
        setattr(parent, child, layer)
        layers.append(layer)
    return layers


def add_task(layers: Sequence[LoRAGroupLinear], rank: int, alpha: float, seed: int, init: str = "kaiming") -> None:
    """Add a new adapter pair to every layer (A drawn from one CPU generator seeded with ``seed``)."""
    generator = torch.Generator().manual_seed(int(seed))
    for layer in layers:
        layer.add_task(rank, alpha, generator=generator, init=init)


def trainable_parameters(layers: Sequence[LoRAGroupLinear]) -> list[nn.Parameter]:
    """[A_t, B_t] of every layer, in order: the only parameters the optimizer should see."""
    return [p for layer in layers for p in layer.trainable_pair()]


def set_active_tasks(layers: Sequence[LoRAGroupLinear], n: int | None) -> None:
    """Use only the first ``n`` adapters (None = all, 0 = the base model)."""
    for layer in layers:
        layer.active_tasks = n


@torch.no_grad()
def reinit_newest(layers: Sequence[LoRAGroupLinear], seed: int, init: str = "kaiming") -> None:
    """Draw the newest pair afresh (A random, B = 0), as :func:`add_task` would: the model is the base
    model plus the frozen adapters again (method ``independent`` starts every task from the base)."""
    generator = torch.Generator().manual_seed(int(seed))
    for layer in layers:
        a, b = layer.trainable_pair()
        a.copy_(init_lora_a(a.shape[0], layer.in_features, generator, init))
        b.zero_()
        layer.reset_ema()


def _prefix(layer: LoRAGroupLinear, index: int) -> str:
    return layer.name or f"layer{index}"


def group_state_dict(layers: Sequence[LoRAGroupLinear]) -> dict[str, torch.Tensor]:
    """Flat ``name -> tensor`` dict of every adapter, scale and EMA copy (for checkpoints)."""
    sd: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(layers):
        p = _prefix(layer, i)
        for t in range(layer.num_tasks):
            sd[f"{p}.lora_a.{t}"] = layer.lora_a[t].detach()
            sd[f"{p}.lora_b.{t}"] = layer.lora_b[t].detach()
            sd[f"{p}.scale.{t}"] = torch.tensor(layer.scales[t], dtype=torch.float64)
        if layer.ema_a is not None:
            sd[f"{p}.ema_a"] = layer.ema_a.detach()
            sd[f"{p}.ema_b"] = layer.ema_b.detach()
    return sd


@torch.no_grad()
def load_group_state_dict(layers: Sequence[LoRAGroupLinear], sd: dict[str, torch.Tensor]) -> None:
    """Copy a :func:`group_state_dict` into layers that already have the same number of tasks and ranks.

    Raises:
        ValueError: on missing/unexpected keys or shape mismatches (the group must be rebuilt with
            the same tasks and ranks first, e.g. by calling ``add_task`` once per saved task).
    """
    expected = group_state_dict(layers)
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"group state dict does not fit the layers: missing {missing[:4]} ({len(missing)}), unexpected "
            f"{unexpected[:4]} ({len(unexpected)}); rebuild the group with the saved number of tasks first"
        )
    for key, dst in expected.items():
        if tuple(sd[key].shape) != tuple(dst.shape):
            raise ValueError(f"{key}: saved shape {tuple(sd[key].shape)} != layer shape {tuple(dst.shape)}; "
                             "rebuild the group with the saved ranks")
    for i, layer in enumerate(layers):
        p = _prefix(layer, i)
        for t in range(layer.num_tasks):
            layer.lora_a[t].copy_(sd[f"{p}.lora_a.{t}"])
            layer.lora_b[t].copy_(sd[f"{p}.lora_b.{t}"])
            layer.scales[t] = float(sd[f"{p}.scale.{t}"])
        if layer.ema_a is not None:
            layer.ema_a.copy_(sd[f"{p}.ema_a"])
            layer.ema_b.copy_(sd[f"{p}.ema_b"])
