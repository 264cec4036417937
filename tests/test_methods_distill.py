"""RID distillation (methods/distill.py): last-step and full-chain losses on tiny SD and SDXL."""

import pytest
import torch
import torch.nn.functional as F

from ril_fast import lora
from ril_fast.methods import distill as D
from ril_fast.methods.teacher import reset_ema, teacher_mode
from ril_fast.sampling import ddim_sample
from ril_fast.step import make_batch
from tests.tiny_models import perturb_student, rid_config


def test_distill_is_zero_when_teacher_equals_student(rid_group, tiny_model_dirs):
    kind, models, layers, cache = rid_group
    reset_ema(layers)
    cfg = rid_config(tiny_model_dirs[kind])
    batch = make_batch(models, cfg, cache, ["a red circle", "a blue cat"], 1, 0, "cpu")
    sample = ddim_sample(models, batch.cond, batch.uncond, batch.z_T, steps=3, guidance_scale=2.0, window=1)
    loss = D.last_step_loss(models, layers, sample, batch.cond, batch.uncond, 2.0, "x0")
    assert float(loss) == pytest.approx(0.0, abs=1e-12)


def test_last_step_x0_matches_scheduler_math(rid_group, tiny_model_dirs):
    kind, models, layers, cache = rid_group
    reset_ema(layers)
    perturb_student(layers)
    cfg = rid_config(tiny_model_dirs[kind])
    batch = make_batch(models, cfg, cache, ["a red circle", "a blue cat"], 1, 1, "cpu")
    sample = ddim_sample(models, batch.cond, batch.uncond, batch.z_T, steps=3, guidance_scale=2.0, window=1)
    loss = D.last_step_loss(models, layers, sample, batch.cond, batch.uncond, 2.0, "x0")
    # Reference: the scheduler's own pred_original_sample for student and EMA teacher at z_1.
    last = sample.last
    with torch.no_grad(), teacher_mode(layers):
        from ril_fast.sampling import guided_output

        t_out = guided_output(models, last.x_t.detach(), last.t, batch.cond, batch.uncond, 2.0)
    sched = models.scheduler
    x0_s = sched.step(last.out, last.t, last.x_t).pred_original_sample
    x0_t = sched.step(t_out, last.t, last.x_t.detach()).pred_original_sample
    ab = float(sched.alphas_cumprod[last.t])
    ref = F.mse_loss(x0_s, x0_t) * ab / (1 - ab)  # λ is in ε units: the x0 error weighted by ᾱ/(1 − ᾱ)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-9)
    assert float(loss) > 0
    # The gradient reaches the trainable pair only.
    for p in lora.trainable_parameters(layers):
        p.grad = None
    loss.backward()
    assert all(p.grad is not None for p in lora.trainable_parameters(layers))
    assert all(layer.lora_a[0].grad is None and layer.lora_b[0].grad is None for layer in layers)
    assert any(float(p.grad.abs().sum()) > 0 for p in lora.trainable_parameters(layers))
    for p in lora.trainable_parameters(layers):
        p.grad = None


def test_full_chain_is_zero_for_equal_teacher_and_positive_otherwise(rid_group, tiny_model_dirs):
    kind, models, layers, cache = rid_group
    reset_ema(layers)
    cfg = rid_config(tiny_model_dirs[kind], distill_mode="full")
    batch = make_batch(models, cfg, cache, ["a red circle"], 1, 3, "cpu")
    kw = dict(steps=3, guidance_scale=2.0, eta=0.0, generator_seed=None)
    sample = ddim_sample(models, batch.cond, batch.uncond, batch.z_T, steps=3, guidance_scale=2.0, window=2,
                         record_window=True)
    zero = float(D.full_chain_loss(models, layers, sample, batch.z_T, batch.cond, batch.uncond, **kw))
    assert zero < 1e-12, zero
    perturb_student(layers)
    sample = ddim_sample(models, batch.cond, batch.uncond, batch.z_T, steps=3, guidance_scale=2.0, window=2,
                         record_window=True)
    assert len(sample.window_steps) == 2
    assert float(D.full_chain_loss(models, layers, sample, batch.z_T, batch.cond, batch.uncond, **kw)) > 0
