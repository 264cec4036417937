"""Step time of RID (and its ablations) against the baseline, side by side in one process.

One training step = compute_loss (sampling with the gradient window, decode, reward, distillation)
+ backward + optimizer step (+ EMA update), exactly as ``ril_fast.train.train_task`` runs it, on the
second task (where RID distills). Methods are interleaved step by step so that machine noise hits
them alike; the JSON records medians and ratios to the baseline.

    python benchmarks/bench_method_overhead.py --config configs/tiny.json [--steps 12] [--out FILE]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import env_info, results_path, write_record  # noqa: E402

from ril_fast import lora  # noqa: E402
from ril_fast.config import load_config, read_prompts  # noqa: E402
from ril_fast.engine import Engine, pick_device  # noqa: E402
from ril_fast.methods.teacher import ema_update, reset_ema  # noqa: E402
from ril_fast.models import load_models  # noqa: E402
from ril_fast.models.text import PromptCache  # noqa: E402
from ril_fast.rewards import build  # noqa: E402
from ril_fast.step import compute_loss, make_batch  # noqa: E402

VARIANTS = {  # name -> (method overrides)
    "baseline": {"name": "baseline"},
    "rid_last": {"name": "rid", "distill_mode": "last"},
    "rid_full": {"name": "rid", "distill_mode": "full"},
}


def setup(cfg, device, overrides):
    models = load_models(cfg.model.path, device=device, vae_dtype=torch.float32)
    layers = lora.inject_adapter_group(models.unet, cfg.lora.targets)
    n_adapters = 2 if overrides["name"] in ("rid", "group") else 1
    for i in range(n_adapters):
        lora.add_task(layers, cfg.lora.rank, cfg.lora.alpha, seed=i)
    reset_ema(layers)
    method_cfg = load_config(ARGS.config, ARGS.set + [f"method.{k}={v}" for k, v in overrides.items()])
    engine = Engine(models.unet, lora.trainable_parameters(layers), method_cfg, lr=method_cfg.train.lr)
    cache = PromptCache(models, device=device)
    return models, layers, method_cfg, engine, cache


def one_step(state, task_prompts, reward, step):
    models, layers, cfg, engine, cache = state
    t0 = time.perf_counter()
    batch = make_batch(models, cfg, cache, task_prompts, 1, step, pick_device(cfg))
    out = compute_loss(models, layers, reward, batch, cfg, use_distill=cfg.method.distill)
    engine.backward(out.loss)
    engine.step()
    if cfg.method.distill:
        ema_update(layers, cfg.method.decay(cfg.tasks[0].steps))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main() -> int:
    cfg = load_config(ARGS.config, ARGS.set)
    if cfg.train.cpu_threads is not None:
        torch.set_num_threads(cfg.train.cpu_threads)
    device = pick_device(cfg)
    task = cfg.tasks[min(1, len(cfg.tasks) - 1)]
    prompts = read_prompts(task.train_prompts, "train_prompts")
    reward = build(task.reward, **task.reward_options)
    states = {name: setup(cfg, device, ov) for name, ov in VARIANTS.items()}
    times = {name: [] for name in VARIANTS}
    for step in range(ARGS.warmup + ARGS.steps):
        for name, state in states.items():
            dt = one_step(state, prompts, reward, step)
            if step >= ARGS.warmup:
                times[name].append(dt)
    med = {name: statistics.median(v) for name, v in times.items()}
    record = {
        "name": "method_overhead", "env": env_info(device), "config": ARGS.config, "overrides": ARGS.set,
        "sampling_steps": cfg.sampling.steps, "grad_window": cfg.sampling.grad_window, "steps_timed": ARGS.steps,
        "median_step_s": med, "p20_p80_s": {n: (statistics.quantiles(v, n=5)[0], statistics.quantiles(v, n=5)[-1])
                                              for n, v in times.items()},
        "ratio_to_baseline": {n: med[n] / med["baseline"] for n in med},
    }
    path = write_record(results_path("method_overhead", device, ARGS.out), record)
    for n in med:
        print(f"{n:10s} median {med[n] * 1e3:8.1f} ms   x{record['ratio_to_baseline'][n]:.3f} vs baseline")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", default="configs/tiny.json")
    parser.add_argument("--set", action="append", default=[])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--out", default=None)
    ARGS = parser.parse_args()
    sys.exit(main())
