"""Differentiable DDIM sampling with truncated backprop (DRaFT-K) and per-step checkpointing.

Notation (DDIM paper, Song et al. 2021):

    z_T     initial noise, (B, C, h, w)
    x_t     latent entering a denoising step at timestep t
    out     guided UNet output at (x_t, t): ε, v or x0 depending on prediction_type
    x0      predicted clean latent, x0 = a_t·x_t + c_t·out (eq. 9)
    K       gradient window: only the last K UNet calls carry gradient

The chain runs N steps: steps 0..N−K−1 under ``no_grad``; the latent entering the window is
detached (DRaFT-K), then each of the K window steps runs its UNet call under non-reentrant
gradient checkpointing. The scheduler math is diffusers' ``DDIMScheduler.step``, which is plain
differentiable tensor arithmetic.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch.utils.checkpoint import checkpoint

from ril_fast.models.text import Conditioning, unet_forward


@dataclass
class StepRecord:
    """One denoising step: its input latent, timestep and guided model output."""

    x_t: torch.Tensor
    t: int
    out: torch.Tensor
    noise: torch.Tensor | None = None  # DDIM's variance noise at eta > 0: replaying the step needs the same draw


@dataclass
class SampleResult:
    latents: torch.Tensor  # final clean latent (B, C, h, w); carries grad when the window is non-empty
    last: StepRecord  # the last denoising step (x_t = z_1): where the teacher is distilled
    alpha_bar: torch.Tensor  # (B,) ᾱ at the last step's timestep, float32
    window: int  # K actually used
    window_steps: list[StepRecord] = field(default_factory=list)  # every window step (full-step distillation)


def weight_dtype(module: torch.nn.Module) -> torch.dtype:
    """dtype of the module's first floating-point parameter. diffusers' ``ModelMixin.dtype`` walks
    every submodule looking for casting hooks on each access (about 4 % of the tiny CPU run, and it
    grows with the module count); we call this once per UNet call."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.get_default_dtype()


def guided_output(models, x_t: torch.Tensor, t, cond: Conditioning, uncond: Conditioning | None,
                  guidance_scale: float, use_checkpoint: bool = False) -> torch.Tensor:
    """Classifier-free-guided UNet output: out_u + g·(out_c − out_u), one batched UNet call."""
    use_cfg = uncond is not None and guidance_scale != 1.0
    if not use_cfg:
        inputs, both = x_t, cond
    else:
        inputs, both = torch.cat([x_t, x_t]), uncond.cat(cond)  # (2B, C, h, w): [uncond; cond]
    inputs = inputs.to(weight_dtype(models.unet))

    def call(x):
        return unet_forward(models, x, t, both)

    if use_checkpoint and torch.is_grad_enabled():
        out = checkpoint(call, inputs, use_reentrant=False)
    else:
        out = call(inputs)
    out = out.float()
    if not use_cfg:
        return out
    out_u, out_c = out.chunk(2)
    return out_u + guidance_scale * (out_c - out_u)


def compile_unet(models, cfg) -> None:
    """``train.compile``: compile the UNet's forward in place (``nn.Module.compile``: parameter names
    and checkpoints unchanged), so every UNet call of a step (the sampler's no-grad prefix, the
    gradient window under checkpointing, the teacher) runs a compiled graph. Graphs are cached per
    grad mode and teacher switch, and on disk by Inductor's caches, so a rerun does not compile
    again; a new task (another adapter) recompiles once."""
    if cfg.train.compile:
        models.unet.compile()


def draw_window(k_min: int, k_max: int | None, generator: torch.Generator) -> int:
    """K for one batch: fixed, or uniform in [k_min, k_max] drawn ONCE per batch (never per step)."""
    if k_max is None or k_max == k_min:
        return k_min
    return int(torch.randint(k_min, k_max + 1, (1,), generator=generator).item())


def ddim_sample(models, cond: Conditioning, uncond: Conditioning | None, z_T: torch.Tensor, *, steps: int,
                guidance_scale: float, eta: float = 0.0, window: int = 0, use_checkpoint: bool = True,
                generator: torch.Generator | None = None, record_window: bool = False,
                progress=None) -> SampleResult:
    """Sample from ``z_T`` with DDIM; gradients flow only through the last ``window`` steps.

    Args:
        models: ``ril_fast.models.Models``.
        cond / uncond: prompt conditioning for the B samples and the unconditional branch (or None).
        z_T: (B, C, h, w) initial noise.
        steps: number of DDIM steps N.
        window: K in 0..N; 0 samples entirely without grad.
        record_window: keep every window step (needed by full-step distillation).
    Returns:
        SampleResult; ``latents`` is the last step's ``prev_sample`` (= x0 for DDIM's final step).
    """
    if not 0 <= window <= steps:
        raise ValueError(f"window must be in 0..steps ({steps}), got {window}")
    if eta > 0:  # imported here: diffusers takes seconds to import, and a config error need not wait
        from diffusers.utils.torch_utils import randn_tensor
    scheduler = models.scheduler
    scheduler.set_timesteps(steps, device=z_T.device)
    timesteps = scheduler.timesteps
    x = z_T.float() * scheduler.init_noise_sigma
    records: list[StepRecord] = []
    last = None
    for i, t in enumerate(timesteps):
        in_window = i >= steps - window
        if in_window and i == steps - window and window < steps:
            x = x.detach()  # DRaFT-K: nothing flows back past the window
        with torch.set_grad_enabled(in_window and torch.is_grad_enabled()):
            out = guided_output(models, x, t, cond, uncond, guidance_scale, use_checkpoint and in_window)
            # the draw diffusers' step would make, made here so that the step can be replayed exactly
            noise = randn_tensor(out.shape, generator=generator, device=out.device, dtype=out.dtype) if eta > 0 else None
            record = StepRecord(x, int(t), out, noise)
            if record_window and in_window:
                records.append(record)
            last = record
            x = scheduler.step(out, t, x, eta=eta, variance_noise=noise).prev_sample
        if progress is not None:
            progress.update(1)
    alpha_bar = scheduler.alphas_cumprod.to(z_T.device)[last.t].float().expand(z_T.shape[0])
    return SampleResult(latents=x, last=last, alpha_bar=alpha_bar, window=window, window_steps=records)


def replay_step(models, record: StepRecord, out: torch.Tensor, eta: float) -> torch.Tensor:
    """The latent DDIM's step gives from ``record``'s input with another model output ``out`` (same
    timestep, same variance noise): the teacher's counterpart of the student's step."""
    return models.scheduler.step(out, record.t, record.x_t, eta=eta, variance_noise=record.noise).prev_sample


def decode(models, latents: torch.Tensor, use_checkpoint: bool = False, slice_batch: bool = False) -> torch.Tensor:
    """VAE-decode latents to images in [0, 1], differentiably; optionally checkpointed and/or per sample."""
    vae = models.vae
    scaled = latents / models.vae_scaling_factor
    if models.vae_shift_factor:
        scaled = scaled + models.vae_shift_factor

    def run(z):
        return vae.decode(z.to(weight_dtype(vae))).sample.float()

    def one(z):
        if use_checkpoint and torch.is_grad_enabled():
            return checkpoint(run, z, use_reentrant=False)
        return run(z)

    images = torch.cat([one(z) for z in scaled.split(1)]) if slice_batch else one(scaled)
    return (images / 2 + 0.5).clamp(0, 1)
