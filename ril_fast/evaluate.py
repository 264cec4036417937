"""Held-out, fixed-seed evaluation of every task after every task (and of the base model, row 0).

Every (eval prompt, seed) pair is sampled without gradient from noise drawn from that pair alone,
so the same pair gives the same starting noise after every task: the reward matrix rows are
comparable and structure drift (against the base model's images) means something. Tasks that share
an eval prompt set share its images: each distinct set is sampled once per row and scored with
every task's reward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import zlib

import torch

from ril_fast.evaluate_metrics import ssim, structure_similarity
from ril_fast.sampling import ddim_sample, decode
from ril_fast.step import unconditional


@dataclass
class EvalResult:
    rewards: list[float]  # mean eval reward of every task, in task order
    images: dict[str, torch.Tensor] = field(default_factory=dict)  # task name -> (P·S, 3, H, W) on CPU
    prompts: dict[str, list[str]] = field(default_factory=dict)
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # task name -> (P·S,) per-image reward, CPU
    adherence: dict | None = None  # prompt-adherence metrics when the model ships a classifier

    def image_sets(self) -> list[tuple[torch.Tensor, list[str]]]:
        """The distinct (images, prompts) sets sampled for this row (tasks may share one)."""
        seen, out = set(), []
        for name, images in self.images.items():
            if id(images) not in seen:
                seen.add(id(images))
                out.append((images, self.prompts[name]))
        return out


def eval_noise(shape_fn, seed: int, prompt: str = "") -> torch.Tensor:
    """Starting noise of one eval image: depends on its (prompt, seed) pair only, so prompts do not share
    noise (each pair is an independent draw) and a pair gets the same noise in every row."""
    pair_seed = zlib.crc32(f"eval:{seed}:{prompt}".encode()) & 0x7FFFFFFF
    return torch.randn(shape_fn(1), generator=torch.Generator().manual_seed(pair_seed))


def distinct_prompt_sets(tasks_prompts: list[list[str]]) -> int:
    """How many distinct eval prompt sets the tasks have (each is sampled once per row)."""
    return len({tuple(p) for p in tasks_prompts})


def eval_image_count(cfg, tasks_prompts: list[list[str]]) -> int:
    """Images sampled per evaluated row."""
    return sum(len(p) for p in {tuple(p) for p in tasks_prompts}) * len(cfg.eval.seeds)


@torch.no_grad()
def sample_images(models, cfg, prompt_cache, prompts: list[str], device, shape_fn, progress=None) -> tuple[torch.Tensor, list[str]]:
    """Images for every (prompt, seed) pair, batched by ``eval.batch_size``; (P·S, 3, H, W) on CPU.

    With several ranks the batches are dealt out round-robin (rank r samples batch ``k·W + r``)
    and gathered after each round, so every rank ends with every image, each sampled once. A
    batch's images depend on its pairs only (per-seed noise, deterministic DDIM), so the result is
    the one a single process gives.
    """
    from ril_fast import engine as eng

    pairs = [(p, s) for p in prompts for s in cfg.eval.seeds]
    chunks = [pairs[i : i + cfg.eval.batch_size] for i in range(0, len(pairs), cfg.eval.batch_size)]
    steps = cfg.eval.steps or cfg.sampling.steps
    world, rank = (eng.world_size(), eng.rank()) if eng.dist_ready() else (1, 0)
    out = []
    for start in range(0, len(chunks), world):
        this_round = chunks[start : start + world]
        images = None
        if rank < len(this_round):
            chunk = this_round[rank]
            z_T = torch.cat([eval_noise(shape_fn, s, p) for p, s in chunk]).to(device)
            cond = prompt_cache.get([p for p, _ in chunk])
            uncond = unconditional(cfg, prompt_cache, len(chunk))
            result = ddim_sample(models, cond, uncond, z_T, steps=steps, guidance_scale=cfg.sampling.guidance_scale,
                                 eta=0.0, window=0, use_checkpoint=False)
            images = decode(models, result.latents).cpu()
        gathered = eng.all_gather_objects(images) if world > 1 else [images]
        out += [g for g in gathered if g is not None]  # rank order = batch order
        if progress is not None:
            progress.update(sum(len(c) for c in this_round))
    return torch.cat(out), [p for p, _ in pairs]


@torch.no_grad()
def evaluate_all_tasks(models, cfg, prompt_cache, tasks_prompts: list[list[str]], rewards: list, device, shape_fn,
                       adherence_fn=None, progress=None, idle_device=None) -> EvalResult:
    """Mean reward of every task on its held-out prompts; images and per-image scores kept.

    ``idle_device``: where reward models wait when not scoring (``memory.idle_rewards = cpu``):
    each is moved to ``device`` for its own scoring only. None leaves them where they are.
    """
    from ril_fast.rewards import place

    result = EvalResult(rewards=[])
    sampled: dict[tuple[str, ...], tuple[torch.Tensor, list[str]]] = {}
    for task, prompts, reward in zip(cfg.tasks, tasks_prompts, rewards):
        key = tuple(prompts)
        if key not in sampled:
            sampled[key] = sample_images(models, cfg, prompt_cache, prompts, device, shape_fn, progress)
        images, pair_prompts = sampled[key]
        if idle_device is not None:
            place(reward, device)
        scores = reward(images.to(device), pair_prompts).float()
        if idle_device is not None:
            place(reward, idle_device)
        result.scores[task.name] = scores.detach().cpu()  # host sync: once per task evaluation
        result.rewards.append(float(result.scores[task.name].mean()))
        result.images[task.name] = images
        result.prompts[task.name] = pair_prompts
    if adherence_fn is not None:
        sets = result.image_sets()
        result.adherence = adherence_fn(torch.cat([i for i, _ in sets]).to(device), [p for _, ps in sets for p in ps])
    return result


def structure_drift(images: dict[str, torch.Tensor], base_images: dict[str, torch.Tensor]) -> float:
    """Mean SSIM of the eval images against the base model's images at the same prompts and seeds (each
    distinct image set once)."""
    return _mean_over_sets(ssim, images, base_images)


def structure_kept(images: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    """Mean SSIM structure term of the luma (insensitive to global tone and contrast edits, unlike SSIM)
    against ``reference`` images at the same prompts and seeds (the base row, or the previous row)."""
    return _mean_over_sets(structure_similarity, images, reference)


def _mean_over_sets(metric, images: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> float:
    seen, values = set(), []
    for name, batch in images.items():
        if name in reference and id(batch) not in seen:
            seen.add(id(batch))
            values.append(metric(batch, reference[name]))
    return float(torch.cat(values).mean()) if values else float("nan")
