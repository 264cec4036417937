"""One full RID training step on full-size random-weight SD1.5 / SDXL, next to the memory planner.

    python benchmarks/bench_step.py --config configs/sdxl.json [--set k=v ...] [--out step.json] [--iters 3]
                                    [--backends auto,torch] [--device cuda|cpu]

On a GPU: the configured models are built from their arch configs (``ril_fast.memory``, random
weights: memory and time do not depend on the values), the reward is the configured one with a
random-weight tower (model-free rewards as themselves), and ``--iters`` steps run through the
trainer's ``compute_loss`` / ``Engine`` / ``ema_update``. Reported: median step seconds,
``torch.cuda.max_memory_allocated`` and the planner's peak for the same config. Text encoders
are not built (the trainer caches embeddings then moves them off the device). On CPU only the
planner runs and the JSON says ``"device": "cpu"``, unless ``--device cpu`` asks for the step there
too (the tests run it on ``configs/tiny.json``).

``--backends auto,torch`` steps once per ``RIL_FAST_KERNELS`` value in turn, every iteration (the
first round warms each up, JIT compiles included), and reports each backend's median step, peak
memory and what its fused ops ran on, with the ratio to the first: the fused LoRA op against torch's
stacked path in a whole training step, side by side in one process. The top-level figures are the
first backend's.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ril_fast import memory
from ril_fast.config import load_config
from ril_fast.methods.teacher import ema_update, reset_ema

GIB = 2**30


def _to_device(module, device):
    """Meta module -> random-weight module on ``device`` (same dtypes)."""
    module.to_empty(device=device)
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0, 0.02)
        for b in module.buffers():
            if b.is_floating_point():
                b.zero_()
    return module


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def gpu_step(cfg, task: int, iters: int, device: torch.device | None = None, backends=("auto",)) -> dict:
    from ril_fast import engine as eng
    from ril_fast import kernels as fused_ops
    from ril_fast import lora, rewards
    from ril_fast.step import Batch, compute_loss, image_size, latent_shape, unconditional

    device = device or torch.device("cuda")
    cuda = device.type == "cuda"
    idle_parts = []  # other tasks' reward towers held on the device (memory.idle_rewards = device)
    arch = memory.resolve_arch(cfg.model.path)
    dtype = memory.DTYPES[cfg.model.dtype]
    models = memory.build_meta_models(arch, dtype)
    models.apply_memory_features(cfg.memory)
    layers = lora.inject_adapter_group(models.unet, cfg.lora.targets)
    for m in (models.unet, models.vae):
        _to_device(m, device)
    n_adapters = task + 1 if cfg.method.adapter_per_task else 1
    for i in range(n_adapters):
        lora.add_task(layers, cfg.lora.rank, cfg.lora.alpha, seed=i)
    reset_ema(layers)
    with torch.no_grad():  # B = 0 would make the adapters' forward trivial; give them values
        for p in lora.trainable_parameters(layers):
            p.normal_(0, 0.01)
    t = cfg.tasks[task]
    reward, parts = memory.build_reward(t.reward, rewards.build_options(t, cfg.memory))
    for part in parts or []:
        _to_device(part, device)
    if parts:
        reward.device = device
    # residency as the trainer's: memory.idle_rewards = device keeps every task's reward model on the
    # GPU (one per distinct reward + options); cpu keeps only this task's there (others not built)
    if cfg.memory.idle_rewards == "device":
        own = memory._reward_key(cfg, t)
        for key, (_, others) in memory._build_rewards(cfg, cfg.tasks).items():
            for part in (others or []) if key != own else []:
                _to_device(part, device)
                idle_parts.append(part)
    height, width = image_size(models, cfg)
    cache = memory._FakePromptCache(models, arch, dtype, 1, height, width)  # zero embeddings, right shapes
    prompts = [f"prompt {i}" for i in range(cfg.train.batch_size)]
    with torch.device(device):
        cache.fill(prompts + [""])
    use_distill = cfg.method.distills_on_task(task)
    params = lora.trainable_parameters(layers)
    cfg.deepspeed.enabled = "off"  # no DeepSpeed on the bench machine; offload is planned, not run
    engine = eng.Engine(models.unet, params, cfg, lr=cfg.train.lr)
    times = {b: [] for b in backends}
    peaks = {b: [0, 0] for b in backends}  # allocated, reserved
    kernels = {}
    saved = os.environ.get("RIL_FAST_KERNELS")
    try:
        for i in range(iters):
            for backend in backends:  # interleaved: drift and warm-up spread over every backend
                os.environ["RIL_FAST_KERNELS"] = backend
                fused_ops.clear_cache()  # the backend is decided once: forget it
                if backend not in kernels:  # (what each op runs on: once per backend)
                    kernels[backend] = kernel_dispatch(device)
                _sync(device)
                if cuda:
                    torch.cuda.reset_peak_memory_stats(device)
                t0 = time.perf_counter()
                z_T = torch.randn(latent_shape(models, cfg, len(prompts)), device=device)
                batch = Batch(prompts, cache.get(prompts), unconditional(cfg, cache, len(prompts)), z_T,
                              cfg.sampling.grad_window, i)
                out = compute_loss(models, layers, reward, batch, cfg, use_distill)
                engine.backward(out.loss)
                del out
                engine.step()
                if cfg.method.distill:
                    ema_update(layers, cfg.method.decay(cfg.tasks[0].steps))
                _sync(device)
                times[backend].append(time.perf_counter() - t0)
                if cuda:
                    peaks[backend] = [max(peaks[backend][0], torch.cuda.max_memory_allocated(device) / GIB),
                                      max(peaks[backend][1], torch.cuda.max_memory_reserved(device) / GIB)]
    finally:
        if saved is None:
            os.environ.pop("RIL_FAST_KERNELS", None)
        else:
            os.environ["RIL_FAST_KERNELS"] = saved
        fused_ops.clear_cache()
    by = {b: {"step_seconds": statistics.median(ts[1:] or ts), "step_seconds_all": ts,
              "max_memory_allocated_gib": peaks[b][0] if cuda else None,
              "max_memory_reserved_gib": peaks[b][1] if cuda else None, "kernels": kernels[b]}
          for b, ts in times.items()}
    first = by[backends[0]]
    out = {key: first[key] for key in ("step_seconds", "step_seconds_all", "max_memory_allocated_gib",
                                       "max_memory_reserved_gib", "kernels")}
    if len(backends) > 1:
        out["by_backend"] = by
        out["step_over_first_backend"] = {b: by[b]["step_seconds"] / first["step_seconds"] for b in backends}
    return out


def kernel_dispatch(device: torch.device) -> dict:
    """Which backend each fused op runs on here: a step time means little without it (the H200
    steps were 1.5-1.8x slower than the H100 ones, most likely because the CUDA library built
    earlier on that machine ran the LoRA layers; unrecorded then)."""
    from ril_fast.kernels import dispatch

    return {"RIL_FAST_KERNELS": dispatch.requested_backend(),
            **{op: dispatch.select_backend(op, device) for op in ("lora_group_linear", "distill_mse")},
            "cuda_lib": dispatch.cuda_lib_available(device)[1]}


def _backends(text: str) -> tuple:
    from ril_fast.kernels import dispatch

    names = tuple(b.strip().lower() for b in text.split(",") if b.strip())
    bad = [b for b in names if b not in dispatch.BACKENDS]
    if not names or bad or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(f"--backends takes distinct values of {dispatch.BACKENDS}, got {text!r}")
    return names


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", required=True)
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--task", type=int, default=1, help="1-based task to step (its reward, adapters, distillation)")
    ap.add_argument("--iters", type=int, default=3)
    ap.add_argument("--no-plan", action="store_true", help="skip the planner (GPU figures only)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--backends", type=_backends, default=("auto",),
                    help="RIL_FAST_KERNELS values to step in turn, e.g. auto,torch (ratios to the first)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="where the step runs (default: cuda when present, else only the planner runs)")
    args = ap.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "0")
    cfg = load_config(args.config, args.set)
    task = args.task - 1
    result = {"config": args.config, "overrides": args.set, "task": args.task, "reward": cfg.tasks[task].reward,
              "idle_rewards": cfg.memory.idle_rewards,
              "torch": torch.__version__, "python": platform.python_version()}
    if not args.no_plan:
        t0 = time.perf_counter()
        p = memory.plan(cfg, [task], include_eval=False)
        result.update(planned_peak_gib=round(p.peak_gib, 3), planned_breakdown=p.to_dict()["breakdown"],
                      plan_seconds=round(time.perf_counter() - t0, 1))
    where = args.device or ("cuda" if torch.cuda.is_available() else None)
    if where:
        device = torch.device(where)
        result["device"] = torch.cuda.get_device_name() if where == "cuda" else "cpu"
        result["backends"] = list(args.backends)
        result.update(gpu_step(cfg, task, args.iters, device, args.backends))
        if "planned_peak_gib" in result and result["max_memory_allocated_gib"]:
            result["measured_over_planned"] = round(result["max_memory_allocated_gib"] / result["planned_peak_gib"], 3)
    else:
        result["device"] = "cpu"
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        tmp = Path(args.out).with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
