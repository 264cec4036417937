"""One training step's batch and loss: the only place ``L = −α·mean(r_t) + λ·L_distill + μ·L_l2`` is built.

Data flow (docs/design.md §4): prompts -> cached text embeddings -> noise -> sampler (no-grad
prefix, K-step grad window) -> [last step: student + teacher] -> x0 -> VAE decode -> reward ->
loss. Backward, the optimizer step and the EMA update follow in ``train.train_task``. The memory
planner (``ril_fast/memory.py``) traces these same two functions, and the evaluation draws its
unconditional branch and latent shape from here.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ril_fast.methods import distill as distill_losses
from ril_fast.methods.teacher import l2_penalty
from ril_fast.models.text import Conditioning
from ril_fast.sampling import ddim_sample, decode, draw_window


def step_seed(seed: int, task: int, step: int, salt: str = "train") -> int:
    """A seed that depends only on (run seed, task, step): resuming needs no RNG replay."""
    return zlib.crc32(f"{salt}:{seed}:{task}:{step}".encode()) & 0x7FFFFFFF


@dataclass
class Batch:
    prompts: list[str]
    cond: Conditioning
    uncond: Conditioning | None
    z_T: torch.Tensor  # (B, C, h, w)
    window: int  # K for this batch
    seed: int  # seeds the sampler's own noise (eta > 0) and the teacher's chain


@dataclass
class StepOutput:
    loss: torch.Tensor  # scalar, differentiable
    reward: torch.Tensor  # (B,) detached
    distill: torch.Tensor | None  # scalar, detached
    images: torch.Tensor  # (B, 3, H, W) detached


def image_size(models, cfg) -> tuple[int, int]:
    """(height, width) of the sampled images: the config's, else the model's native size."""
    return cfg.sampling.height or models.sample_size, cfg.sampling.width or models.sample_size


def latent_shape(models, cfg, batch_size: int) -> tuple[int, int, int, int]:
    height, width = image_size(models, cfg)
    f = models.vae_scale_factor
    return (batch_size, models.latent_channels, height // f, width // f)


def unconditional(cfg, prompt_cache, batch: int):
    """CFG's unconditional branch: the negative prompt, or the pipeline's own empty-prompt convention."""
    if cfg.sampling.guidance_scale == 1.0:
        return None
    if cfg.sampling.negative_prompt:
        return prompt_cache.get([cfg.sampling.negative_prompt] * batch)
    return prompt_cache.uncond(batch)


def make_batch(models, cfg, prompt_cache, prompts: list[str], task: int, step: int, device) -> Batch:
    """Draw the prompts, noise and K of one batch, all from ``step_seed(seed, task, step)``."""
    seed = step_seed(cfg.seed, task, step)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(prompts), (cfg.train.batch_size,), generator=gen).tolist()
    chosen = [prompts[i] for i in idx]
    z_T = torch.randn(latent_shape(models, cfg, len(chosen)), generator=gen).to(device)
    window = draw_window(cfg.sampling.grad_window, cfg.sampling.grad_window_max, gen)
    cond = prompt_cache.get(chosen)
    uncond = unconditional(cfg, prompt_cache, len(chosen))
    return Batch(chosen, cond, uncond, z_T, window, seed)


def compute_loss(models, layers, reward_fn, batch: Batch, cfg, use_distill: bool, *,
                 reward_norm: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 use_l2: bool | None = None) -> StepOutput:
    """Sample with gradients in the window, decode, score, and add the method's regulariser.

    ``L = −α·mean(norm(r)) + λ·L_distill + μ·L_l2``: ``reward_norm`` maps the raw reward to the normalised
    one (None: raw); the distillation term (``use_distill``) pulls toward ``cfg.method.teacher``; the L2
    term (``use_l2``, default: method ``l2``) penalises the trainable pair's change since the task began.
    """
    s, m = cfg.sampling, cfg.method
    gen = torch.Generator(batch.z_T.device).manual_seed(batch.seed) if s.eta > 0 else None
    full = use_distill and m.distill_mode == "full"
    sample = ddim_sample(models, batch.cond, batch.uncond, batch.z_T, steps=s.steps, guidance_scale=s.guidance_scale,
                         eta=s.eta, window=batch.window, use_checkpoint=s.checkpoint_unet, generator=gen,
                         record_window=full)
    decode_kwargs = dict(use_checkpoint=cfg.memory.vae_checkpoint, slice_batch=cfg.memory.vae_slice)
    images = decode(models, sample.latents, **decode_kwargs)
    reward = reward_fn(images, batch.prompts).float()
    scored = reward if reward_norm is None else reward_norm(reward)
    loss = -m.reward_weight * scored.mean()
    distill = None
    if use_distill:
        teacher = m.teacher or "ema"
        if full:
            distill = distill_losses.full_chain_loss(
                models, layers, sample, batch.z_T, batch.cond, batch.uncond, steps=s.steps,
                guidance_scale=s.guidance_scale, eta=s.eta, generator_seed=batch.seed if s.eta > 0 else None,
                teacher=teacher)
        elif m.distill_on == "renoised":
            distill = distill_losses.renoised_loss(models, layers, sample, batch.cond, batch.uncond, s.guidance_scale,
                                                   teacher=teacher, seed=batch.seed, use_checkpoint=s.checkpoint_unet)
        else:
            distill = distill_losses.last_step_loss(models, layers, sample, batch.cond, batch.uncond,
                                                    s.guidance_scale, m.distill_target, teacher=teacher,
                                                    student_images=images, eta=s.eta, decode_kwargs=decode_kwargs)
        loss = loss + m.distill_weight * distill
    if m.name == "l2" if use_l2 is None else use_l2:
        loss = loss + m.l2_weight * l2_penalty(layers)
    return StepOutput(loss=loss, reward=reward.detach(), distill=None if distill is None else distill.detach(),
                      images=images.detach())
