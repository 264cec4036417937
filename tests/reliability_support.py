"""Shared by the reliability tests: one tiny model per process, run configs, a forked CLI runner, and
a user reward (``reliability_support:flaky_brightness``) that turns its loss or gradient non-finite on
chosen training calls.

The CLI runs in a forked child of the test process: it starts in milliseconds because the parent
already imported torch/diffusers (a fresh ``python -m ril_fast.train`` spends a minute importing on
a loaded 2-core machine), and a SIGKILL from ``RIL_FAST_FAULT`` ends only the child.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch

_MODEL_DIR: dict[str, str] = {}
_TRAIN_CALLS = [0]


def tiny_model_dir(kind: str = "sd") -> str:
    """A tiny random diffusers pipeline saved once per process."""
    if kind not in _MODEL_DIR:
        from ril_fast.models.tiny import save_tiny_pipeline

        path = Path(tempfile.mkdtemp(prefix="ril-rel-model-")) / f"tiny_{kind}"
        save_tiny_pipeline(path, kind=kind)
        _MODEL_DIR[kind] = str(path)
    return _MODEL_DIR[kind]


def make_config(model: str, out: str | Path, steps=(2, 2), rewards=("brightness", "smoothness"), **train) -> dict:
    """Two tasks of ``steps`` optimizer steps, 3 DDIM steps, batch 1, one eval image per task; the tasks'
    rewards alternate through ``rewards``."""
    return {
        "output_dir": str(out),
        "seed": 0,
        "model": {"path": model},
        "method": {"name": "rid", "distill_first_task": True},
        "sampling": {"steps": 3, "guidance_scale": 1.0},
        "train": {"batch_size": 1, "lr": 1e-2, "deterministic": True, "checkpoint_every": 1, **train},
        "tasks": [
            {"name": f"t{i}", "reward": rewards[i % len(rewards)], "train_prompts": ["a red circle", "a blue square"],
             "eval_prompts": ["a green circle"], "steps": n}
            for i, n in enumerate(steps)
        ],
        "eval": {"seeds": [0], "grid": False},
    }


def write_config(cfg: dict, path: str | Path) -> str:
    Path(path).write_text(json.dumps(cfg), encoding="utf-8")
    return str(path)


def run_forked(argv: list[str], log: str | Path, fault: str | None = None, env: dict | None = None) -> int:
    """``ril_fast.train.main(argv)`` in a forked child; its exit code, or -9 when SIGKILLed.

    stdout and stderr of the child are appended to ``log``.
    """
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        rc = 99
        try:
            fd = os.open(str(log), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
            os.dup2(fd, 1)
            os.dup2(fd, 2)
            sys.stdout = os.fdopen(1, "w", buffering=1)
            sys.stderr = os.fdopen(2, "w", buffering=1)
            os.environ.pop("RIL_FAST_FAULT", None)
            if fault:
                os.environ["RIL_FAST_FAULT"] = fault
            os.environ.update(env or {})
            torch.set_num_threads(1)  # OpenMP pools do not survive fork
            logging.root.handlers.clear()  # pytest's capture handlers; run_all's basicConfig logs to stderr
            from ril_fast.train import main

            rc = main(argv)
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else 98
        except BaseException:  # noqa: BLE001 - report anything, then leave the child
            traceback.print_exc()
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(rc)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status)


def flaky_brightness(images: torch.Tensor, prompts=None) -> torch.Tensor:
    """Mean brightness; on the training calls listed in ``RIL_TEST_BAD`` (``loss:2,grad:3``, 1-based,
    counted only while gradients are enabled, i.e. not in evaluation) the loss or only the gradient is NaN."""
    value = images.float().mean(dim=(1, 2, 3))
    if not torch.is_grad_enabled():
        return value
    _TRAIN_CALLS[0] += 1
    for item in filter(None, os.environ.get("RIL_TEST_BAD", "").split(",")):
        kind, _, call = item.partition(":")
        if int(call) != _TRAIN_CALLS[0]:
            continue
        if kind == "loss":
            return value * float("nan")
        # forward stays finite (0 added), backward of sqrt at 0 gives 0 * inf = NaN
        return value + (images * 0).pow(0.5).sum(dim=(1, 2, 3)) * 0
    return value


def jittered_brightness(images: torch.Tensor, prompts=None) -> torch.Tensor:
    """Brightness under random per-pixel weights drawn from the global RNG on training calls (as a reward with
    random crops or dropout would draw): the gradient, hence the adapters, depend on the RNG state, so a
    resumed run equals an uninterrupted one only if the checkpoint's RNG state is restored."""
    luma = images.float().mean(dim=1)
    if not torch.is_grad_enabled():
        return luma.mean(dim=(1, 2))
    weights = torch.rand(luma.shape)
    return (luma * weights).sum(dim=(1, 2)) / weights.sum(dim=(1, 2))


def read_metrics(out: str | Path) -> list[dict]:
    path = Path(out) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def comparable_results(out: str | Path) -> dict:
    """results.json without wall time and timestamp (the only entries that may differ between equal runs)."""
    res = json.loads((Path(out) / "results.json").read_text(encoding="utf-8"))
    for key in ("wall_seconds", "timestamp"):
        res.pop(key, None)
    res.pop("config", None)  # holds output_dir
    return res


def comparable_metrics(out: str | Path) -> list[dict]:
    return [{k: v for k, v in m.items() if k != "step_seconds"} for m in read_metrics(out)]


def adapter_bytes(out: str | Path) -> dict[str, tuple[dict, dict[str, bytes]]]:
    """Per exported task: (header metadata, exact bytes of every tensor).

    Not the raw file bytes: safetensors writes its metadata map in hash order, which differs
    between processes; the tensors and the metadata contents are what must be equal.
    """
    from safetensors import safe_open

    out_map = {}
    for f in sorted(Path(out, "adapters").glob("task_*/pytorch_lora_weights.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            tensors = {k: fh.get_tensor(k).contiguous().view(-1).view(torch.uint8).numpy().tobytes()
                       for k in sorted(fh.keys())}
            out_map[f.parent.name] = (fh.metadata(), tensors)
    return out_map
