"""Crash-safe checkpoints: safetensors + a JSON sidecar, written atomically, verified on load.

Layout of one checkpoint folder ``output_dir/checkpoints/ckpt-<seq>/``:

    state.safetensors        adapter group (every task's pair + the EMA teacher)
    optimizer.safetensors    optimizer tensors (absent between tasks)
    rng-rank<r>.safetensors  RNG states of every rank
    meta.json                format version, task/step/phase, results so far, optimizer scalars,
                             sha256 of every file above

A checkpoint is written into a temporary folder, every file fsynced, then the folder is renamed
into place and the ``latest`` pointer replaced (``os.replace`` is atomic on POSIX). On load, the
newest folder whose checksums verify wins; a corrupt one is skipped with a warning.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import signal
import tempfile
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
_log = logging.getLogger(__name__)


_FAULT_COUNTS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Test hook: ``RIL_FAST_FAULT=<point>:<n>`` SIGKILLs this process the n-th time it reaches ``name``.

    Points: ``step`` (after a step is logged, before its checkpoint), ``eval`` (an evaluation row is
    logged, not yet checkpointed), ``ckpt_write`` (between the files of a checkpoint being written),
    ``task_boundary`` (a task is done and checkpointed, the next not begun). Unset in normal runs.
    """
    spec = os.environ.get("RIL_FAST_FAULT")
    if not spec or spec.partition(":")[0] != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] == int(spec.partition(":")[2] or 1):
        os.kill(os.getpid(), signal.SIGKILL)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (os.umask can only set it)."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o077)  # while it is swapped, nothing another thread creates is more open than 0600
    os.umask(mask)
    return mask


def temp_file(folder: str | Path, prefix: str, suffix: str = "") -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``folder``, with the mode a plain ``open`` would give (0666 minus the umask):
    mkstemp makes 0600 files, and the file keeps that mode when it is renamed into place."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
    os.fchmod(fd, 0o666 & ~current_umask())
    return fd, tmp


def save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path, metadata: dict | None = None) -> None:
    """safetensors' ``save_file``, leaving the file with the umask's mode (save_file makes it 0600)."""
    save_file(tensors, str(path), metadata=metadata)
    os.chmod(path, 0o666 & ~current_umask())


def write_bytes_atomic(path: str | Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = temp_file(path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def save_tensors_atomic(path: str | Path, tensors: dict[str, torch.Tensor]) -> None:
    path = Path(path)
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    fd, tmp = temp_file(path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        save_safetensors(tensors, tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Optimizer state <-> (tensors, JSON)


def flatten_optimizer_state(state: dict) -> tuple[dict[str, torch.Tensor], dict]:
    tensors, scalars = {}, {}
    for pid, entry in state["state"].items():
        for key, value in entry.items():
            name = f"{pid}/{key}"
            if torch.is_tensor(value):
                tensors[name] = value
            else:
                scalars[name] = value
    return tensors, {"param_groups": state["param_groups"], "scalars": scalars}


def unflatten_optimizer_state(tensors: dict[str, torch.Tensor], info: dict) -> dict:
    state: dict = {}
    for name, value in list(tensors.items()) + list(info["scalars"].items()):
        pid, key = name.split("/", 1)
        state.setdefault(int(pid), {})[key] = value
    return {"state": state, "param_groups": info["param_groups"]}


# ---------------------------------------------------------------------------------------------
# RNG


def rng_tensors() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state()
    return out


def restore_rng(tensors: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(tensors["torch"])
    if "cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["cuda"])


# ---------------------------------------------------------------------------------------------
# Save / load


class CheckpointError(RuntimeError):
    """No checkpoint under the run folder verifies, or one cannot be read."""


def save_checkpoint(root: str | Path, seq: int, state: dict[str, torch.Tensor], meta: dict,
                    optimizer_state: dict | None = None, keep: int = 2, rank: int = 0) -> Path:
    """Write checkpoint number ``seq`` under ``root/checkpoints`` atomically; keep the newest ``keep``.

    Only rank 0 writes model and optimizer files; every rank writes its RNG file first (the caller
    puts a barrier between the two calls under DeepSpeed).
    """
    ckroot = Path(root) / "checkpoints"
    ckroot.mkdir(parents=True, exist_ok=True)
    final = ckroot / f"ckpt-{seq:06d}"
    tmp = ckroot / f".tmp-ckpt-{seq:06d}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    files = {}
    save_tensors_atomic(tmp / "state.safetensors", state)
    files["state.safetensors"] = sha256(tmp / "state.safetensors")
    fault_point("ckpt_write")
    meta = dict(meta)
    if optimizer_state is not None:
        tensors, info = flatten_optimizer_state(optimizer_state)
        save_tensors_atomic(tmp / "optimizer.safetensors", tensors)
        files["optimizer.safetensors"] = sha256(tmp / "optimizer.safetensors")
        meta["optimizer"] = info
        fault_point("ckpt_write")
    save_tensors_atomic(tmp / f"rng-rank{rank}.safetensors", rng_tensors())
    files[f"rng-rank{rank}.safetensors"] = sha256(tmp / f"rng-rank{rank}.safetensors")
    staged = ckroot / f".rng-{seq:06d}"  # other ranks' RNG files, written by stage_rank_rng before a barrier
    for path in sorted(staged.glob("rng-rank*.safetensors")) if staged.is_dir() else []:
        os.replace(path, tmp / path.name)
        files[path.name] = sha256(tmp / path.name)
    shutil.rmtree(staged, ignore_errors=True)
    meta.update(format_version=FORMAT_VERSION, seq=seq, files=files)
    fault_point("ckpt_write")
    write_bytes_atomic(tmp / "meta.json", (json.dumps(meta, indent=2) + "\n").encode("utf-8"))
    fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(ckroot)
    write_bytes_atomic(ckroot / "latest", final.name.encode())
    for old in sorted(ckroot.glob("ckpt-*"))[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def stage_rank_rng(root: str | Path, seq: int, rank: int) -> None:
    """A rank other than 0 leaves its RNG state for rank 0's ``save_checkpoint(seq)`` to pick up."""
    staged = Path(root) / "checkpoints" / f".rng-{seq:06d}"
    staged.mkdir(parents=True, exist_ok=True)
    save_tensors_atomic(staged / f"rng-rank{rank}.safetensors", rng_tensors())


def _verify(folder: Path) -> dict:
    meta_path = folder / "meta.json"
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{meta_path}: unreadable ({exc})") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{folder}: format_version {meta.get('format_version')} != {FORMAT_VERSION}")
    for name, digest in meta.get("files", {}).items():
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing")
        if sha256(path) != digest:
            raise CheckpointError(f"{path}: checksum mismatch (truncated or corrupt)")
    return meta


def list_checkpoints(root: str | Path) -> list[Path]:
    return sorted((Path(root) / "checkpoints").glob("ckpt-*"), reverse=True)


def load_latest(root: str | Path, rank: int = 0) -> tuple[dict, dict[str, torch.Tensor], dict | None, dict | None] | None:
    """Newest checkpoint that verifies: (meta, state tensors, optimizer state or None, rng tensors or None).

    Returns None if there is no checkpoint at all; raises CheckpointError if there are some but
    none verifies.
    """
    folders = list_checkpoints(root)
    if not folders:
        return None
    problems = []
    for folder in folders:
        try:
            meta = _verify(folder)
        except CheckpointError as exc:
            _log.warning("skipping checkpoint %s: %s", folder.name, exc)
            problems.append(str(exc))
            continue
        state = load_file(folder / "state.safetensors")
        optim = None
        if "optimizer" in meta:
            optim = unflatten_optimizer_state(load_file(folder / "optimizer.safetensors"), meta["optimizer"])
        rng_path = folder / f"rng-rank{rank}.safetensors"
        rng = load_file(rng_path) if rng_path.is_file() else None
        return meta, state, optim, rng
    raise CheckpointError("no checkpoint verifies: " + "; ".join(problems))
