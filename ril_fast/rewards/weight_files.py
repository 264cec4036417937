"""Where reward-model weights come from, and the process-wide cache that loads each model once.

A weight option is either a local path (file or folder) or a Hugging Face Hub location that must
already be in the local HF cache (we never download: ``local_files_only=True``):

- a folder model (transformers ``from_pretrained`` layout): ``"owner/repo"``;
- one file inside a hub repo: ``"owner/repo/path/in/repo.ext"``.

A miss raises one ValueError that names the option, the value, and the exact command that fetches it.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path

import torch

_CACHE: dict[tuple, object] = {}
_LOCK = threading.Lock()


def _download_hint(repo_id: str, filename: str | None) -> str:
    cmd = f"hf download {repo_id}" + (f" {filename}" if filename else "")
    return (f"run `{cmd}` on a machine with internet (fills the HF cache; copy ~/.cache/huggingface here) "
            "or pass a local path")


def _looks_local(spec: str) -> bool:
    return spec.startswith(("/", "./", "../", "~")) or os.path.splitdrive(spec)[0] != ""


def _split_spec(spec: str) -> tuple[str, str | None]:
    parts = spec.strip("/").split("/")
    if len(parts) < 2 or any(not p for p in parts):
        raise ValueError(f"{spec!r} is neither an existing local path nor a hub location 'owner/repo[/file]'")
    repo_id = "/".join(parts[:2])
    filename = "/".join(parts[2:]) or None
    return repo_id, filename


def resolve_dir(spec: str | os.PathLike, option: str) -> Path:
    """A model folder: the local path ``spec`` or the cached snapshot of hub repo ``spec``."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"{option}={str(spec)!r} is a file; it must be a model folder (config.json + weights)")
    if _looks_local(str(spec)):
        raise ValueError(f"{option}={str(spec)!r}: no such folder; pass an existing model folder or a hub repo "
                         "'owner/repo' that is in the local HF cache")
    # legacy un-namespaced repos ("bert-base-uncased") are one component
    repo_id, filename = (str(spec), None) if "/" not in str(spec) else _split_spec(str(spec))
    if filename is not None:
        raise ValueError(f"{option}={str(spec)!r} names a file; give a folder or a hub repo 'owner/repo'")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception:  # noqa: BLE001 - every hub failure here means "not in the local cache"
        hint = _download_hint(repo_id, None)
        raise ValueError(f"{option}={str(spec)!r}: no such folder and not in the HF cache; {hint}") from None


def resolve_file(spec: str | os.PathLike, option: str) -> Path:
    """A weight file: the local path ``spec`` or the cached hub file ``owner/repo/filename``."""
    path = Path(spec).expanduser()
    if path.is_file():
        return path
    if path.is_dir():
        raise ValueError(f"{option}={str(spec)!r} is a folder; it must be a weight file (.safetensors or .pt/.pth)")
    if _looks_local(str(spec)):
        raise ValueError(f"{option}={str(spec)!r}: no such file; pass an existing weight file or a hub file "
                         "'owner/repo/filename' that is in the local HF cache")
    repo_id, filename = _split_spec(str(spec))
    if filename is None:
        raise ValueError(f"{option}={str(spec)!r}: no such file; give a local file or a hub file 'owner/repo/filename'")
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(repo_id, filename, local_files_only=True))
    except Exception:  # noqa: BLE001
        hint = _download_hint(repo_id, filename)
        raise ValueError(f"{option}={str(spec)!r}: no such file and not in the HF cache; {hint}") from None


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors from .safetensors, or from a .pt/.pth loaded with ``weights_only=True`` (no pickled code)."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001
        msg = f"cannot read {path} with torch.load(weights_only=True): {exc}; convert it to .safetensors"
        raise RuntimeError(msg) from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]  # HPSv2 / training checkpoints wrap the weights
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise RuntimeError(f"{path} does not hold a state dict of tensors (got {type(obj).__name__})")
    # DDP checkpoints prefix every key with "module."
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    table = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if isinstance(dtype, torch.dtype):
        if dtype in table.values():
            return dtype
    elif dtype in table:
        return table[dtype]
    raise ValueError(f"dtype {dtype!r} is not supported; use one of fp32, bf16, fp16")


def freeze(model: torch.nn.Module) -> torch.nn.Module:
    model.eval()
    model.requires_grad_(False)
    return model


def cached(key: tuple, build: Callable[[], object]):
    """Build once per process per ``key`` (paths, dtype, device, ...); later calls share the object."""
    with _LOCK:
        if key not in _CACHE:
            _CACHE[key] = build()
        return _CACHE[key]


def clear_cache() -> None:
    """Drop every cached reward model (frees their memory once no reward holds them)."""
    with _LOCK:
        _CACHE.clear()


def enable_checkpointing(model: torch.nn.Module) -> int:
    """Gradient-checkpoint every transformers layer of a frozen, eval-mode model; returns how many.

    transformers only checkpoints a layer when ``layer.training`` is True, and ``model.train()`` would also
    switch on dropout. So the flag is set on the layer object alone: its children (attention, dropout)
    stay in eval mode and the forward is unchanged.
    """
    from functools import partial

    from torch.utils.checkpoint import checkpoint
    from transformers.modeling_layers import GradientCheckpointingLayer

    n = 0
    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            module.gradient_checkpointing = True
            module._gradient_checkpointing_func = partial(checkpoint, use_reentrant=False)
            module.training = True
            n += 1
    return n
