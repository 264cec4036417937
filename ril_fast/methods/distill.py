"""Distillation toward a teacher at the last denoising step (or along the teacher's own chain).

Notation as in ``ril_fast.sampling``. The teacher is the student's own UNet in another adapter
state (``ril_fast.methods.teacher.teacher_mode``): the momentum (EMA) copy of the trainable pair (RID), that
pair frozen at the start of the task (LwF), or no adapter at all (the base model, DRaFT+-style).
It costs no second UNet in memory.

λ means the same on every model: the loss is measured in ε units. At the last step both models see
the same x_t, so ``x0_s − x0_t = −c·(ε_s − ε_t)`` with ``c² = (1 − ᾱ)/ᾱ`` for every prediction type;
c² is 0.115 on the embedded model's scheduler (trailing spacing, t = 99) but 1.7e-3 on SD1.5/SDXL's
(leading, t = 1), so an unweighted x0 loss would be 67× weaker there. The x0 target is therefore
weighted by ``ᾱ/(1 − ᾱ)`` per sample, which makes it the ε MSE (``eps``, computed directly, is the
same loss).

- ``last`` mode: the teacher runs once, without grad, on the student's own last-step input z_1.
  Targets: ``x0`` (the fused ``distill_mse`` kernel), ``eps``, ``image`` (the teacher's last DDIM step
  replayed with the student's variance noise, decoded, compared with the student's image in pixels).
- ``full`` mode: the teacher samples its own chain from the same z_T (N extra UNet calls, the same
  variance noise), and every step in the student's gradient window is aligned with the teacher's step
  at the same timestep on x0, weighted into ε units.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ril_fast import kernels
from ril_fast.kernels.reference import x0_coefficients
from ril_fast.methods.teacher import teacher_mode
from ril_fast.sampling import SampleResult, ddim_sample, decode, guided_output, replay_step

TARGETS = ("x0", "eps", "image")


def _eps(out: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """ε from a model output of any prediction type (DDIM eq. 12 rearranged)."""
    view = (-1,) + (1,) * (x_t.dim() - 1)
    ab = alpha_bar.view(view)
    x_t, out = x_t.float(), out.float()
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return ab.sqrt() * out + (1 - ab).sqrt() * x_t
    if prediction_type == "sample":
        return (x_t - ab.sqrt() * out) / (1 - ab).sqrt()
    raise ValueError(f"prediction_type must be epsilon, v_prediction or sample, got {prediction_type!r}")


def _x0(out: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    a, c = x0_coefficients(alpha_bar, prediction_type)
    view = (-1,) + (1,) * (x_t.dim() - 1)
    return a.view(view) * x_t.float() + c.view(view) * out.float()


def eps_units(alpha_bar: torch.Tensor) -> torch.Tensor:
    """Per-sample weight ``ᾱ/(1 − ᾱ)`` that turns an x0 squared error into the ε squared error."""
    ab = alpha_bar.float()
    return ab / (1 - ab)


def last_step_loss(models, layers, sample: SampleResult, cond, uncond, guidance_scale: float, target: str,
                   teacher: str = "ema", student_images: torch.Tensor | None = None, eta: float = 0.0,
                   decode_kwargs: dict | None = None) -> torch.Tensor:
    """Distillation loss at the last denoising step; differentiable w.r.t. the student only.

    Exactly zero, with a zero gradient, when the teacher's adapters equal the student's (every target).
    """
    if target not in TARGETS:
        raise ValueError(f"distill_target must be one of {TARGETS}, got {target!r}")
    last = sample.last
    x_t = last.x_t.detach()  # the teacher sees the student's input but sends no gradient into it
    with torch.no_grad(), teacher_mode(layers, teacher):
        teacher_out = guided_output(models, x_t, last.t, cond, uncond, guidance_scale)
    ptype = models.prediction_type
    if target == "x0":
        weight = eps_units(sample.alpha_bar)
        return kernels.distill_mse(last.out, teacher_out, last.x_t, sample.alpha_bar, ptype, weight=weight)
    if target == "eps":
        eps_s = _eps(last.out, last.x_t, sample.alpha_bar, ptype)
        eps_t = _eps(teacher_out, x_t, sample.alpha_bar, ptype)
        return F.mse_loss(eps_s, eps_t)
    if student_images is None:
        raise ValueError("distill_target 'image' needs the student's decoded images")
    with torch.no_grad():  # the student's image is decoded from this same step's output
        teacher_images = decode(models, replay_step(models, last, teacher_out, eta), **(decode_kwargs or {}))
    return F.mse_loss(student_images.float(), teacher_images.float())


def renoised_loss(models, layers, sample: SampleResult, cond, uncond, guidance_scale: float, *, teacher: str,
                  seed: int, use_checkpoint: bool) -> torch.Tensor:
    """Distillation on a re-noised copy of the student's own final latent: x0 (detached) noised to one
    timestep t of the sampling schedule (drawn once per batch from ``seed``); student (with grad) and teacher
    match their ε there. One extra student UNet call with grad, and it constrains the model at every noise
    level the chain visits instead of only at the last one."""
    gen = torch.Generator().manual_seed(int(seed))
    timesteps = models.scheduler.timesteps  # the schedule ddim_sample just set
    t = int(timesteps[int(torch.randint(len(timesteps), (1,), generator=gen))])
    x0 = sample.latents.detach().float()
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    ab = models.scheduler.alphas_cumprod[t].float().to(x0.device)
    z = ab.sqrt() * x0 + (1 - ab).sqrt() * noise
    student_out = guided_output(models, z, t, cond, uncond, guidance_scale, use_checkpoint)
    with torch.no_grad(), teacher_mode(layers, teacher):
        teacher_out = guided_output(models, z, t, cond, uncond, guidance_scale)
    abv = ab.expand(x0.shape[0])
    ptype = models.prediction_type
    return F.mse_loss(_eps(student_out, z, abv, ptype), _eps(teacher_out, z, abv, ptype))


def full_chain_loss(models, layers, sample: SampleResult, z_T: torch.Tensor, cond, uncond, *, steps: int,
                    guidance_scale: float, eta: float, generator_seed: int | None, teacher: str = "ema") -> torch.Tensor:
    """Full-step distillation: the teacher's own chain from z_T, aligned on x0 at every window step, in ε
    units (weight ᾱ/(1 − ᾱ) per step, as at the last step); the mean over the window's steps. At eta > 0
    the teacher's generator is seeded like the student's, so both chains draw the same variance noise."""
    generator = None
    if generator_seed is not None:
        generator = torch.Generator(z_T.device).manual_seed(generator_seed)
    with torch.no_grad(), teacher_mode(layers, teacher):
        chain = ddim_sample(models, cond, uncond, z_T, steps=steps, guidance_scale=guidance_scale, eta=eta,
                            window=steps, use_checkpoint=False, generator=generator, record_window=True)
    by_t = {rec.t: rec for rec in chain.window_steps}
    ab_all = models.scheduler.alphas_cumprod.to(z_T.device)
    ptype = models.prediction_type
    losses = []
    for rec in sample.window_steps:
        trec = by_t[rec.t]
        ab = ab_all[rec.t].float().expand(z_T.shape[0])
        x0_s = _x0(rec.out, rec.x_t, ab, ptype)
        x0_t = _x0(trec.out, trec.x_t, ab, ptype)
        # x0 given directly: 'sample' prediction makes the kernel's x0 the output itself
        losses.append(kernels.distill_mse(x0_s, x0_t, x0_s.detach(), ab, "sample", weight=eps_units(ab)))
    return torch.stack(losses).mean()
