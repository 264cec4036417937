"""Distillation from the momentum (EMA) teacher.

Notation as in ``ril_fast.sampling``. The teacher is the student's adapter group with the
trainable pair swapped for its EMA copy (``ril_fast.lora.teacher_mode``), so it costs no second
UNet in memory.

- ``last`` mode: the teacher runs once, without grad, on the student's own last-step input z_1,
  and the loss aligns the two outputs on the chosen target:
    x0    predicted clean latent, via the fused ``distill_mse`` kernel (default);
    eps   predicted noise;
    image decoded x0 (costs a second VAE decode, without grad).
- ``full`` mode: the teacher samples its own chain from the same z_T (N extra UNet calls), and
  every step in the student's gradient window is aligned with the teacher's step at the same
  timestep, on x0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ril_fast import kernels
from ril_fast.kernels.reference import x0_coefficients
from ril_fast.lora import teacher_mode
from ril_fast.sampling import SampleResult, ddim_sample, decode, guided_output


def _eps(out: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    """ε from a model output of any prediction type (DDIM eq. 12 rearranged)."""
    view = (-1,) + (1,) * (x_t.dim() - 1)
    ab = alpha_bar.view(view)
    if prediction_type == "epsilon":
        return out
    if prediction_type == "v_prediction":
        return ab.sqrt() * out + (1 - ab).sqrt() * x_t
    return (x_t - ab.sqrt() * out) / (1 - ab).sqrt()  # sample prediction


def _x0(out: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor, prediction_type: str) -> torch.Tensor:
    a, c = x0_coefficients(alpha_bar, prediction_type)
    view = (-1,) + (1,) * (x_t.dim() - 1)
    return a.view(view) * x_t.float() + c.view(view) * out.float()


def last_step_loss(models, layers, sample: SampleResult, cond, uncond, guidance_scale: float, target: str,
                   student_images: torch.Tensor | None = None, decode_kwargs: dict | None = None) -> torch.Tensor:
    """Distillation loss at the last denoising step; differentiable w.r.t. the student only."""
    last = sample.last
    x_t = last.x_t.detach()  # the teacher sees the student's input but sends no gradient into it
    with torch.no_grad(), teacher_mode(layers):
        teacher_out = guided_output(models, x_t, last.t, cond, uncond, guidance_scale)
    ptype = models.prediction_type
    if target == "x0":
        return kernels.distill_mse(last.out, teacher_out, last.x_t, sample.alpha_bar, ptype)
    if target == "eps":
        eps_s = _eps(last.out, last.x_t, sample.alpha_bar, ptype)
        eps_t = _eps(teacher_out, x_t, sample.alpha_bar, ptype)
        return F.mse_loss(eps_s.float(), eps_t.float())
    if target == "image":
        if student_images is None:
            raise ValueError("distill_target 'image' needs the student's decoded images")
        with torch.no_grad():
            teacher_x0 = _x0(teacher_out, x_t, sample.alpha_bar, ptype)
            teacher_images = decode(models, teacher_x0, **(decode_kwargs or {}))
        return F.mse_loss(student_images.float(), teacher_images.float())
    raise ValueError(f"distill_target must be x0, eps or image, got {target!r}")


def full_chain_loss(models, layers, sample: SampleResult, z_T: torch.Tensor, cond, uncond, *, steps: int,
                    guidance_scale: float, eta: float, generator_seed: int | None) -> torch.Tensor:
    """Full-step distillation: the teacher's own chain from z_T, aligned on x0 at every window step."""
    generator = None
    if generator_seed is not None:
        generator = torch.Generator(z_T.device).manual_seed(generator_seed)
    with torch.no_grad(), teacher_mode(layers):
        teacher = ddim_sample(models, cond, uncond, z_T, steps=steps, guidance_scale=guidance_scale, eta=eta,
                              window=steps, use_checkpoint=False, generator=generator, record_window=True)
    by_t = {rec.t: rec for rec in teacher.window_steps}
    ab_all = models.scheduler.alphas_cumprod.to(z_T.device)
    ptype = models.prediction_type
    losses = []
    for rec in sample.window_steps:
        trec = by_t[rec.t]
        ab = ab_all[rec.t].float().expand(z_T.shape[0])
        x0_s = _x0(rec.out, rec.x_t, ab, ptype)
        x0_t = _x0(trec.out, trec.x_t, ab, ptype)
        # x0 given directly: 'sample' prediction makes the kernel's x0 the output itself.
        losses.append(kernels.distill_mse(x0_s, x0_t, x0_s.detach(), ab, "sample"))
    return torch.stack(losses).mean()
