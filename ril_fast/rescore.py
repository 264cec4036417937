"""Re-score a run from its exported adapters: every row of the reward matrix evaluated again.

Row 0 is the base model; row r the model after task r: adapters ``task_01 .. task_r`` for methods
with one adapter per task, ``task_r`` alone for single-LoRA methods (each export holds that LoRA
after its task). The run's own config is used, with ``--set`` overrides (other seeds, more eval
steps, another reward's options); checkpoints are not needed, so a copied ``adapters/`` folder is
enough. Writes ``<run>/eval/rescore.json``; the run's results.json stays as it was.
"""

from __future__ import annotations

import datetime
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ril_fast.config import ConfigError, load_config


def exported_tasks(run_dir: Path) -> int:
    """How many consecutive tasks (1, 2, ...) have an exported adapter."""
    from ril_fast.lora.export import WEIGHT_NAME, adapter_dir

    n = 0
    while (adapter_dir(run_dir, n + 1) / WEIGHT_NAME).is_file():
        n += 1
    return n


@torch.no_grad()
def load_exported(layers, folder: Path, slot: int) -> None:
    """Put an exported adapter (diffusers keys, scale folded into B) into adapter ``slot`` of every layer."""
    from safetensors.torch import load_file

    from ril_fast.lora.export import WEIGHT_NAME

    sd = load_file(folder / WEIGHT_NAME)
    for layer in layers:
        a, b = sd[f"unet.{layer.name}.lora_A.weight"], sd[f"unet.{layer.name}.lora_B.weight"]
        layer.lora_a[slot].copy_(a)
        layer.lora_b[slot].copy_(b)
        layer.scales[slot] = 1.0  # already in B


def rescore(run_dir: str | Path, overrides: list[str] = ()) -> dict:
    """Evaluate every finished row of the run in ``run_dir`` again; returns (and writes) the results.

    Raises:
        ConfigError: no run there, or an override that does not fit the config.
    """
    from ril_fast import lora, report
    from ril_fast.run_state import ensure_adapters, idle_reward_device
    from ril_fast.train import build_run
    from ril_fast.evaluate import evaluate_all_tasks
    from ril_fast.lora.export import adapter_dir

    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise ConfigError([f"{run_dir}: no config.json; give the output_dir of a run"])
    cfg = load_config(run_dir / "config.json", [f"output_dir={run_dir}", *overrides])
    n = exported_tasks(run_dir)
    run = build_run(cfg)
    run.log.enabled = False  # a re-score adds nothing to the run's metrics or TensorBoard
    ensure_adapters(run, n if cfg.method.adapter_per_task else min(n, 1))
    matrix = []
    with tqdm(total=n + 1, desc="re-scoring rows", disable=not run.is_main) as bar:
        for row in range(n + 1):
            if cfg.method.adapter_per_task:
                if row:
                    load_exported(run.layers, adapter_dir(run_dir, row), row - 1)
                lora.set_active_tasks(run.layers, row)
            else:
                if row:
                    load_exported(run.layers, adapter_dir(run_dir, row), 0)
                lora.set_active_tasks(run.layers, min(row, 1))
            result = evaluate_all_tasks(run.models, cfg, run.prompt_cache, run.eval_prompts, run.rewards, run.device,
                                        run.shape, idle_device=idle_reward_device(cfg, run.device))
            matrix.append(result.rewards)
            bar.update(1)
    names = [t.name for t in cfg.tasks]
    out = {"rows": ["base"] + [f"after {name}" for name in names[:n]], "columns": names, "reward_matrix": matrix,
           "eval": cfg.to_dict()["eval"], "overrides": list(overrides),
           "timestamp": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    if run.is_main:
        report.write_json_atomic(run_dir / "eval" / "rescore.json", out)
    return out
