"""Export one task's adapter in the diffusers LoRA format, and load a run back as a stock pipeline.

File layout, per task: ``<dir>/pytorch_lora_weights.safetensors`` with PEFT-style UNet keys
``unet.<module path>.lora_A.weight`` (r, d_in) and ``unet.<module path>.lora_B.weight`` (d_out, r),
which ``pipe.load_lora_weights(dir, adapter_name=...)`` reads as is. diffusers gives a file without
alpha values the scale alpha = r, i.e. 1.0, so the task's scale ``alpha / r`` is folded into B.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from ril_fast.lora.group import LoRAGroupLinear

WEIGHT_NAME = "pytorch_lora_weights.safetensors"  # diffusers' LORA_WEIGHT_NAME_SAFE


def adapter_dir(run_dir: str | os.PathLike, task: int) -> Path:
    """``run_dir/adapters/task_{task:02d}``: where the trainer writes task ``task``'s adapter."""
    return Path(run_dir) / "adapters" / f"task_{task:02d}"


def task_adapter_state_dict(
    layers: Sequence[LoRAGroupLinear], task: int, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The diffusers-format state dict of task ``task`` (1-based), scale folded into B.

    Raises:
        ValueError: if ``task`` is outside 1..num_tasks or a layer has no name.
    """
    sd: dict[str, torch.Tensor] = {}
    for layer in layers:
        if not 1 <= task <= layer.num_tasks:
            raise ValueError(
                f"task={task} but layer {layer.name!r} has {layer.num_tasks} adapters; use 1..{layer.num_tasks}"
            )
        if not layer.name:
            raise ValueError(
                "a LoRAGroupLinear without a module name cannot be exported; build layers with inject_adapter_group"
            )
        a = layer.lora_a[task - 1].detach().float()
        b = layer.lora_b[task - 1].detach().float() * layer.scales[task - 1]
        out = dtype or layer.lora_a[task - 1].dtype
        sd[f"unet.{layer.name}.lora_A.weight"] = a.to(out).cpu().contiguous()
        sd[f"unet.{layer.name}.lora_B.weight"] = b.to(out).cpu().contiguous()
    return sd


def sort_metadata_keys(path) -> bool:
    """Rewrite a safetensors header in place with its ``__metadata__`` keys sorted.

    safetensors serialises the metadata from a Rust HashMap, whose order changes from call to call,
    so two exports of the same tensors differed in bytes. Sorting keeps the header's length (same
    content) and the tensor entries' order, so the data offsets stay valid. Returns False (file
    untouched) if the rewritten header would not have the same length.
    """
    import struct

    with open(path, "r+b") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        raw = f.read(n)
        header = json.loads(raw)
        meta = header.get("__metadata__")
        if not meta:
            return True
        ordered = {"__metadata__": dict(sorted(meta.items())), **{k: v for k, v in header.items() if k != "__metadata__"}}
        text = json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) != len(raw.rstrip(b" ")):  # not the writer's compact form: leave it alone
            return False
        f.seek(8)
        f.write(text + b" " * (n - len(text)))
    return True


def export_task_adapter(
    model: nn.Module,
    layers: Sequence[LoRAGroupLinear],
    task: int,
    path: str | os.PathLike,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write task ``task``'s adapter (1-based) as ``path/pytorch_lora_weights.safetensors``.

    The write is atomic (temporary file + ``os.replace``). Load it with
    ``pipe.load_lora_weights(path, adapter_name=...)``.

    Args:
        model: the UNet the layers were injected into (checked to hold them).
        layers: the group layers, from :func:`ril_fast.lora.inject_adapter_group`.
        task: 1-based task index.
        path: output folder (created).
        dtype: dtype written (default: the adapters' dtype).
    Returns:
        the path of the written file.
    Raises:
        ValueError: bad task index, or layers that are not in ``model``.
    """
    from ril_fast.checkpoint import save_safetensors

    owned = {id(m) for m in model.modules()}
    stray = [layer.name for layer in layers if id(layer) not in owned]
    if stray:
        raise ValueError(f"{len(stray)} layers (e.g. {stray[0]!r}) are not modules of the model given; "
                         "pass the UNet they were injected into")
    sd = task_adapter_state_dict(layers, task, dtype)
    layer0 = layers[0]
    info = {"task": task, "rank": int(layer0.lora_a[task - 1].shape[0]), "scale": layer0.scales[task - 1],
            "scale_folded_into_B": True, "num_layers": len(layers)}
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".safetensors")
    os.close(fd)
    try:
        save_safetensors(sd, tmp, metadata={"format": "pt", "ril_fast": json.dumps(info)})
        sort_metadata_keys(tmp)
        os.replace(tmp, folder / WEIGHT_NAME)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return folder / WEIGHT_NAME


def _model_path(run_dir: Path, cfg: dict) -> Path:
    model_cfg = cfg.get("model") if isinstance(cfg, dict) else None
    raw = model_cfg.get("path") if isinstance(model_cfg, dict) else None
    if not raw:
        raise ValueError(f"{run_dir / 'config.json'} has no model.path (got {raw!r}); load_pipeline needs the base "
                         "model as a local diffusers folder: set model.path in the run's config")
    path = Path(raw).expanduser()
    if not path.is_absolute() and not path.exists():
        # Relative paths in a config are written from the repo root (e.g. ril_fast/assets/embedded).
        repo_root = Path(__file__).resolve().parents[2]
        for root in (run_dir, repo_root):
            if (root / path).is_dir():
                path = root / path
                break
    if not path.is_dir():
        raise ValueError(f"model.path={raw!r} is not a folder; point it at a diffusers pipeline folder "
                         "(with model_index.json)")
    return path


def _adapter_per_task(cfg: dict) -> bool:
    method = cfg.get("method") if isinstance(cfg, dict) else None
    name = method.get("name", "rid") if isinstance(method, dict) else "rid"
    return name in ("group", "rid")


def load_pipeline(run_dir: str | os.PathLike, task: int, torch_dtype: torch.dtype | None = None):
    """A stock diffusers pipeline with the adapters of tasks 1..``task`` loaded and active.

    Reads ``run_dir/config.json`` (``model.path`` = a local diffusers folder), loads the base with
    ``DiffusionPipeline.from_pretrained``, then ``run_dir/adapters/task_{i:02d}`` as adapter
    ``task_{i}`` for i = 1..task, and activates them all with weight 1.0. ``task=0`` gives the base.
    Methods with a single LoRA (``method.name`` baseline / distill) load only ``task_{task:02d}``,
    which holds that LoRA as it was after task ``task``.

    Raises:
        ValueError: missing config, model path or adapter folder, or a negative task.
    """
    from diffusers import DiffusionPipeline

    run_dir = Path(run_dir)
    cfg_path = run_dir / "config.json"
    if not cfg_path.is_file():
        raise ValueError(f"{cfg_path} not found; pass the folder of a finished run (it holds config.json)")
    if not (isinstance(task, int) and task >= 0):
        raise ValueError(f"task must be an int >= 0 (0 = base model), got {task!r}")
    cfg = json.loads(cfg_path.read_text())
    folders = [adapter_dir(run_dir, i) for i in range(1, task + 1)]
    names = [f"task_{i}" for i in range(1, task + 1)]
    if not _adapter_per_task(cfg):
        # baseline/distill train one LoRA throughout: task_{t:02d} holds that LoRA after task t, whole.
        folders, names = folders[-1:], names[-1:]
    missing = [f for f in folders if not (f / WEIGHT_NAME).is_file()]
    if missing:
        raise ValueError(f"task={task} needs {missing[0]}/{WEIGHT_NAME}, which is missing; "
                         "pick a task the run has finished")
    kwargs = {"local_files_only": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    pipe = DiffusionPipeline.from_pretrained(str(_model_path(run_dir, cfg)), **kwargs)
    for folder, name in zip(folders, names):
        pipe.load_lora_weights(str(folder), adapter_name=name)
    if names:
        pipe.set_adapters(names, adapter_weights=[1.0] * len(names))
    return pipe
