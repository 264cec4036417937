"""The LoRA adapter group: layer, injection into a UNet, per-task control, diffusers export.

The teacher copy of the trainable pair (EMA, swap-in, L2 anchor) is driven by :mod:`ril_fast.methods.teacher`."""

from ril_fast.lora.group import LoRAGroupLinear
from ril_fast.lora.inject import (
    PRESETS,
    add_task,
    group_layers,
    group_state_dict,
    inject_adapter_group,
    load_group_state_dict,
    reinit_newest,
    set_active_tasks,
    trainable_parameters,
)


def export_task_adapter(model, layers, task, path, dtype=None):
    """See :func:`ril_fast.lora.export.export_task_adapter` (imported lazily: it pulls in diffusers)."""
    from ril_fast.lora.export import export_task_adapter as _export

    return _export(model, layers, task, path, dtype=dtype)


def load_pipeline(run_dir, task, torch_dtype=None):
    """See :func:`ril_fast.lora.export.load_pipeline`."""
    from ril_fast.lora.export import load_pipeline as _load

    return _load(run_dir, task, torch_dtype=torch_dtype)


__all__ = [
    "LoRAGroupLinear",
    "PRESETS",
    "add_task",
    "export_task_adapter",
    "group_layers",
    "group_state_dict",
    "inject_adapter_group",
    "load_group_state_dict",
    "load_pipeline",
    "reinit_newest",
    "set_active_tasks",
    "trainable_parameters",
]
