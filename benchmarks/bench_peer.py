"""Our training step against the loop a user would write instead, and against the floor.

    python benchmarks/bench_peer.py [--config configs/tiny.json] [--set k=v ...] [--rounds 20]
                                    [--variants ours_k1,peer_k1,...] [--compile] [--out FILE]

Variants, each on its own copy of the same model, stepped in turn in one process (each round in a
new seeded order, so drift and cache warmth hit them alike):

- ``ours_k{k}``: the trainer's step (``train.train_task``'s body: batch, ``compute_loss``, finite
  check, backward, clip + optimizer step, EMA update) while training task k: k adapters, the newest
  trainable, the EMA teacher and its distillation wherever the method distills (RID: from task 2).
  ``ours_k{k}d`` distills on task 1 too (``method.distill_first_task``), so k = 1 and k = 8 compare
  with the same work but the adapter count.
- ``peer_k{k}``: the ~100-line loop a user writes with stock parts (:func:`peer_step`): the
  pipeline's text encoder on every batch (as diffusers' training examples do), PEFT LoRA via
  ``unet.add_adapter`` (k adapters active, only the newest trainable), DDIM with CFG through the
  scheduler, gradients through the last K UNet calls under ``torch.utils.checkpoint``, VAE decode,
  the same reward, AdamW with the same clipping. No teacher.
- ``floor``: the same reward-backprop step with no adapters and no teacher: our sampler on the
  base UNet, the gradient flowing through the window's UNet call into the prompt embeddings (a
  leaf, stepped by AdamW: the least a step can do that backpropagates the reward through the UNet).

With ``--compile`` every ``ours_*`` variant also runs as ``ours_*_compiled`` (``train.compile``).
Times are per step: wall clock and this process's CPU time (one thread: CPU time is what the step
costs, whatever else loads the machine), with the load average before and after. Ratios: ours /
peer at each k, RID k = 3 / floor, and k = 8 / k = 1 (both distilling), as ratios of the medians
and as medians of the per-round ratios. On a GPU ``--set model.path=...`` names a model folder or an arch
(``sd15``, ``sdxl``: random weights built from ``ril_fast/models/arch``; text encoders are not
built, so every variant reads the same cached zero embeddings).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.checkpoint import checkpoint

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from common import env_info, results_path, write_record  # noqa: E402

from ril_fast import engine as eng  # noqa: E402
from ril_fast import lora, memory, rewards  # noqa: E402
from ril_fast.config import load_config, read_prompts  # noqa: E402
from ril_fast.methods.teacher import ema_update, reset_ema  # noqa: E402
from ril_fast.sampling import ddim_sample, decode  # noqa: E402
from ril_fast.step import compute_loss, image_size, latent_shape, make_batch, unconditional  # noqa: E402

DEFAULT_VARIANTS = ("ours_k1", "peer_k1", "ours_k3", "peer_k3", "floor", "ours_k1d", "ours_k8d")
TARGETS = {"ours_k1/peer_k1": 0.5, "ours_k3/peer_k3": 0.5, "ours_k3/floor": 1.10, "ours_k8d/ours_k1d": 1.05}


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------
# The model, once; each variant copies what it trains


@dataclasses.dataclass
class Base:
    cfg: object
    models: object  # ril_fast Models (the base UNet unwrapped)
    cache: object  # prompt cache (real, or zero embeddings of the right shapes)
    reward: object
    prompts: list
    device: torch.device


def build_base(cfg, device) -> Base:
    task = cfg.tasks[0]
    if Path(cfg.model.path).is_dir():
        from ril_fast.models import load_models
        from ril_fast.models.text import PromptCache

        models = load_models(cfg.model.path, dtype=eng.DTYPES[cfg.model.dtype], device=device, vae_dtype=torch.float32)
        cache = PromptCache(models, device=device)
        prompts = read_prompts(task.train_prompts, "train_prompts")
    else:  # an arch name: random weights, zero embeddings (bench_step's approach)
        from bench_step import _to_device

        arch = memory.resolve_arch(cfg.model.path)
        dtype = memory.DTYPES[cfg.model.dtype]
        models = memory.build_meta_models(arch, dtype)
        models.vae.to(torch.float32)
        for m in (models.unet, models.vae):
            _to_device(m, device)
        h, w = image_size(models, cfg)
        cache = memory._FakePromptCache(models, arch, dtype, 1, h, w)
        prompts = [f"prompt {i}" for i in range(8)]
        with torch.device(device):
            cache.fill(prompts + [""])
    reward = rewards.build(task.reward, **rewards.build_options(task, cfg.memory))
    rewards.place(reward, device)
    return Base(cfg, models, cache, reward, prompts, device)


def _models_copy(base: Base, unet=None, vae=None):
    return dataclasses.replace(base.models, unet=unet or copy.deepcopy(base.models.unet),
                               vae=vae or copy.deepcopy(base.models.vae), scheduler=copy.deepcopy(base.models.scheduler))


# ---------------------------------------------------------------------------------------------
# Ours: the trainer's step


def make_ours(base: Base, k: int, distill_first: bool, compiled: bool):
    overrides = [f"method.distill_first_task={str(distill_first).lower()}"]
    if compiled:
        overrides.append("train.compile=true")
    cfg = load_config(ARGS.config, ARGS.set + overrides)
    models = _models_copy(base)
    models.apply_memory_features(cfg.memory)
    layers = lora.inject_adapter_group(models.unet, cfg.lora.targets)
    for i in range(k):
        lora.add_task(layers, cfg.lora.rank, cfg.lora.alpha, seed=i)
        with torch.no_grad():  # B = 0 would leave frozen adapters out of the sums; give them values
            for layer in layers:
                layer.lora_b[-1].normal_(0, 0.01)
    reset_ema(layers)
    if compiled:
        from ril_fast.sampling import compile_unet

        compile_unet(models, cfg)
    engine = eng.Engine(models.unet, lora.trainable_parameters(layers), cfg, lr=cfg.train.lr)
    task = k - 1
    use_distill, use_l2 = cfg.method.distills_on_task(task), cfg.method.penalizes_on_task(task)

    def step(i: int) -> float:
        batch = make_batch(models, cfg, base.cache, base.prompts, task, i, base.device)
        out = compute_loss(models, layers, base.reward, batch, cfg, use_distill, use_l2=use_l2)
        if not engine.loss_is_finite(out.loss):
            raise RuntimeError("non-finite loss in the benchmark")
        engine.backward(out.loss)
        engine.step()
        if cfg.method.teacher == "ema":
            ema_update(layers, cfg.method.decay(cfg.tasks[0].steps))
        step.last_loss = float(out.loss)  # (after the step: the finite check synced already)
        return step.last_loss

    step.layers = layers  # for tests/test_compile.py
    return step


# ---------------------------------------------------------------------------------------------
# The peer: stock diffusers + PEFT, as a user writes it


def make_peer(base: Base, k: int):
    from peft import LoraConfig

    cfg = base.cfg
    models = _models_copy(base)
    unet, vae, scheduler = models.unet, models.vae, models.scheduler
    targets = list(lora.PRESETS[cfg.lora.targets]) if isinstance(cfg.lora.targets, str) else list(cfg.lora.targets)
    names = [f"task{i}" for i in range(k)]
    for name in names:
        unet.add_adapter(LoraConfig(r=cfg.lora.rank, lora_alpha=cfg.lora.alpha, target_modules=targets),
                         adapter_name=name)
    unet.set_adapters(names)
    for n, p in unet.named_parameters():  # only the newest adapter trains
        p.requires_grad_(f".{names[-1]}." in n and "lora_" in n)
        if "lora_B" in n:
            with torch.no_grad():
                p.normal_(0, 0.01)
    params = [p for p in unet.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    s = cfg.sampling
    text_encoder = models.text_encoders[0] if models.text_encoders and not models.is_sdxl else None
    tokenizer = models.tokenizers[0] if text_encoder is not None else None
    gen = random.Random(0)

    def encode(prompts):
        ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                        return_tensors="pt").input_ids.to(base.device)
        with torch.no_grad():
            return text_encoder(ids)[0]

    def step(i: int) -> None:
        prompts = gen.choices(base.prompts, k=cfg.train.batch_size)
        b = len(prompts)
        if text_encoder is not None:  # the user's loop encodes every batch (with the empty prompt for CFG)
            embeds = torch.cat([encode([""] * b), encode(prompts)])
            added = None
        else:
            cond = unconditional(cfg, base.cache, b).cat(base.cache.get(prompts))
            embeds, added = cond.prompt_embeds, cond.added_cond_kwargs()
        embeds = embeds.to(unet.dtype)
        latents = torch.randn(latent_shape(models, cfg, b), device=base.device) * scheduler.init_noise_sigma
        scheduler.set_timesteps(s.steps, device=base.device)
        for j, t in enumerate(scheduler.timesteps):
            in_window = j >= s.steps - s.grad_window
            with torch.set_grad_enabled(in_window):
                inp = scheduler.scale_model_input(torch.cat([latents] * 2), t).to(unet.dtype)

                def call(x, t=t):
                    return unet(x, t, encoder_hidden_states=embeds, added_cond_kwargs=added).sample

                noise = checkpoint(call, inp, use_reentrant=False) if in_window else call(inp)
                uncond_out, cond_out = noise.float().chunk(2)
                noise = uncond_out + s.guidance_scale * (cond_out - uncond_out)
                latents = scheduler.step(noise, t, latents).prev_sample
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        images = (images.float() / 2 + 0.5).clamp(0, 1)
        loss = -cfg.method.reward_weight * base.reward(images, prompts).float().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


# ---------------------------------------------------------------------------------------------
# The floor: no adapters, no teacher


def make_floor(base: Base):
    cfg = base.cfg
    models = _models_copy(base)
    models.apply_memory_features(cfg.memory)
    s = cfg.sampling
    b = cfg.train.batch_size
    cond = base.cache.get(base.prompts[:b])
    embeds = cond.prompt_embeds.detach().clone().requires_grad_(True)  # what the reward's gradient reaches
    cond = dataclasses.replace(cond, prompt_embeds=embeds)
    uncond = unconditional(cfg, base.cache, b)
    opt = torch.optim.AdamW([embeds], lr=cfg.train.lr)

    def step(i: int) -> None:
        z_T = torch.randn(latent_shape(models, cfg, b), generator=torch.Generator().manual_seed(i)).to(base.device)
        sample = ddim_sample(models, cond, uncond, z_T, steps=s.steps, guidance_scale=s.guidance_scale, eta=s.eta,
                             window=s.grad_window, use_checkpoint=s.checkpoint_unet)
        images = decode(models, sample.latents, use_checkpoint=cfg.memory.vae_checkpoint,
                        slice_batch=cfg.memory.vae_slice)
        loss = -cfg.method.reward_weight * base.reward(images, base.prompts[:b]).float().mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([embeds], cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def make_variant(base: Base, name: str):
    if name == "floor":
        return make_floor(base)
    kind, rest = name.split("_", 1)
    compiled = rest.endswith("_compiled")
    rest = rest.removesuffix("_compiled")
    distill_first = rest.endswith("d")
    k = int(rest.rstrip("d")[1:])
    if kind == "peer":
        return make_peer(base, k)
    return make_ours(base, k, distill_first, compiled)


def _stats(xs):
    q = statistics.quantiles(xs, n=5) if len(xs) >= 2 else xs * 4
    return {"median": statistics.median(xs), "p20": q[0], "p80": q[-1], "all": xs}


def main(argv=None) -> dict:
    global ARGS
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="configs/tiny.json")
    ap.add_argument("--set", action="append", default=[])
    ap.add_argument("--variants", default=",".join(DEFAULT_VARIANTS))
    ap.add_argument("--compile", action="store_true", help="also every ours_* variant with train.compile")
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--out", default=None, help="a .json path or a results folder")
    ap.add_argument("--name", default="bench_peer")
    ARGS = ap.parse_args(argv)
    cfg = load_config(ARGS.config, ARGS.set)
    if cfg.train.cpu_threads is not None:
        torch.set_num_threads(cfg.train.cpu_threads)
    torch.manual_seed(cfg.seed)
    device = eng.pick_device(cfg)
    names = [v for v in ARGS.variants.split(",") if v]
    if ARGS.compile:
        names += [f"{v}_compiled" for v in names if v.startswith("ours_")]
    load_before = os.getloadavg()
    base = build_base(cfg, device)
    t0 = time.perf_counter()
    steps = {}
    for n in names:
        steps[n] = make_variant(base, n)
    build_s = time.perf_counter() - t0
    # Every variant holds its own model copy, so this process tracks several times the objects of a
    # training run, and a full (generation-2) collection walking them all lands in whichever step
    # happens to trigger it (it cost ours_k3 ~40 ms a step here, 15 %). Like timeit, time the steps,
    # not the collector: the models built above are moved out of its reach.
    gc.collect()
    gc.freeze()
    wall = {n: [] for n in names}
    cpu = {n: [] for n in names}
    first = {}
    order = list(names)
    rng = random.Random(1)
    for r in range(ARGS.warmup + ARGS.rounds):
        rng.shuffle(order)
        for n in order:
            _sync(device)
            w0, c0 = time.perf_counter(), time.process_time()
            steps[n](r)
            _sync(device)
            dw, dc = time.perf_counter() - w0, time.process_time() - c0
            if r == 0:
                first[n] = dw  # compiles included
            if r >= ARGS.warmup:
                wall[n].append(dw)
                cpu[n].append(dc)
        print(f"round {r + 1}/{ARGS.warmup + ARGS.rounds}: "
              + " ".join(f"{n} {wall[n][-1] * 1e3:.0f}ms" for n in names if wall[n]), flush=True)
    med_w = {n: statistics.median(v) for n, v in wall.items()}
    med_c = {n: statistics.median(v) for n, v in cpu.items()}
    ratios = {}
    for key, target in TARGETS.items():
        for suffix in ("", "_compiled"):
            num, den = key.split("/")
            num = num + suffix if num.startswith("ours") else num
            den = den + suffix if den.startswith("ours") else den
            if num in med_w and den in med_w:
                # medians of the per-round ratios (steps of one round ran back to back: paired)
                paired = {kind: statistics.median(x / y for x, y in zip(t[num], t[den]))
                          for kind, t in (("wall", wall), ("cpu", cpu))}
                ratios[f"{num}/{den}"] = {"wall": med_w[num] / med_w[den], "cpu": med_c[num] / med_c[den],
                                          "paired_wall": paired["wall"], "paired_cpu": paired["cpu"],
                                          "target": target}
    record = {"name": ARGS.name, "env": env_info(device), "config": ARGS.config, "overrides": ARGS.set,
              "rounds": ARGS.rounds, "warmup": ARGS.warmup, "threads": torch.get_num_threads(),
              "loadavg_before": load_before, "loadavg_after": os.getloadavg(), "build_seconds": build_s,
              "first_step_seconds": first, "wall_s": {n: _stats(v) for n, v in wall.items()},
              "cpu_s": {n: _stats(v) for n, v in cpu.items()}, "ratios": ratios}
    if device.type == "cuda":
        record["max_memory_allocated_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    path = write_record(results_path(ARGS.name, device, ARGS.out), record)
    for n in names:
        print(f"{n:22s} wall {med_w[n] * 1e3:8.1f} ms   cpu {med_c[n] * 1e3:8.1f} ms   first {first[n]:.1f} s")
    for key, v in ratios.items():
        print(f"{key:34s} wall {v['wall']:.3f}  cpu {v['cpu']:.3f}  paired cpu {v['paired_cpu']:.3f}  "
              f"(target <= {v['target']})")
    print("wrote", path)
    return record


ARGS = None

if __name__ == "__main__":
    main()
