"""RID objective: last-step and full-chain distillation, loss assembly, one full RID step on tiny SDXL."""

import pytest
import torch
import torch.nn.functional as F

from ril_fast import lora
from ril_fast.config import config_from_dict
from ril_fast.engine import Engine
from ril_fast.methods import distill as D
from ril_fast.methods.teacher import ema_update, reset_ema, teacher_mode
from ril_fast.models import load_models
from ril_fast.models.text import PromptCache
from ril_fast.rewards import build
from ril_fast.run_state import adapters_for_task
from ril_fast.sampling import ddim_sample
from ril_fast.step import compute_loss, make_batch


def make_cfg(model_dir, **method):
    return config_from_dict({
        "output_dir": "unused",
        "model": {"path": str(model_dir)},
        "method": {"name": "rid", **method},
        "sampling": {"steps": 3, "guidance_scale": 2.0},
        "train": {"batch_size": 2, "lr": 1e-2},
        "tasks": [{"name": "a", "reward": "brightness", "train_prompts": ["a red circle", "a blue cat"],
                   "eval_prompts": ["a dog"], "steps": 1}],
    })


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def setup(request, tiny_model_dirs):
    models = load_models(str(tiny_model_dirs[request.param]))
    layers = lora.inject_adapter_group(models.unet, "attn")
    lora.add_task(layers, 2, 2.0, seed=0)
    with torch.no_grad():  # task 1 "trained": non-zero B, then task 2 starts
        for layer in layers:
            layer.lora_b[0].normal_(0, 0.2)
    lora.add_task(layers, 2, 2.0, seed=1)
    reset_ema(layers)
    return request.param, models, layers, PromptCache(models)


def _perturb_student(layers, std=0.2):
    with torch.no_grad():
        for layer in layers:
            b = layer.trainable_pair()[1]
            b.add_(torch.randn_like(b) * std)  # add, so equal seeds in two tests never give equal values


def test_distill_is_zero_when_teacher_equals_student(setup, tiny_model_dirs):
    kind, models, layers, cache = setup
    reset_ema(layers)
    cfg = make_cfg(tiny_model_dirs[kind])
    batch = make_batch(models, cfg, cache, ["a red circle", "a blue cat"], 1, 0, "cpu")
    sample = ddim_sample(models, batch.cond, batch.uncond, batch.z_T, steps=3, guidance_scale=2.0, window=1)
    loss = D.last_step_loss(models, layers, sample, batch.cond, batch.uncond, 2.0, "x0")
    assert float(loss) == pytest.approx(0.0, abs=1e-12)


def test_last_step_x0_matches_scheduler_math(setup, tiny_model_dirs):
    kind, models, layers, cache = setup
    reset_ema(layers)
    _perturb_student(layers)
    cfg = make_cfg(tiny_model_dirs[kind])
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


def test_full_chain_is_zero_for_equal_teacher_and_positive_otherwise(setup, tiny_model_dirs):
    kind, models, layers, cache = setup
    reset_ema(layers)
    cfg = make_cfg(tiny_model_dirs[kind], distill_mode="full")
    batch = make_batch(models, cfg, cache, ["a red circle"], 1, 3, "cpu")
    kw = dict(steps=3, guidance_scale=2.0, eta=0.0, generator_seed=None)
    sample = ddim_sample(models, batch.cond, batch.uncond, batch.z_T, steps=3, guidance_scale=2.0, window=2,
                         record_window=True)
    zero = float(D.full_chain_loss(models, layers, sample, batch.z_T, batch.cond, batch.uncond, **kw))
    assert zero < 1e-12, zero
    _perturb_student(layers)
    sample = ddim_sample(models, batch.cond, batch.uncond, batch.z_T, steps=3, guidance_scale=2.0, window=2,
                         record_window=True)
    assert len(sample.window_steps) == 2
    assert float(D.full_chain_loss(models, layers, sample, batch.z_T, batch.cond, batch.uncond, **kw)) > 0


def test_loss_assembly(setup, tiny_model_dirs):
    kind, models, layers, cache = setup
    reset_ema(layers)
    _perturb_student(layers)
    cfg = make_cfg(tiny_model_dirs[kind], reward_weight=0.7, distill_weight=3.0)
    batch = make_batch(models, cfg, cache, ["a red circle", "a blue cat"], 1, 4, "cpu")
    out = compute_loss(models, layers, build("brightness"), batch, cfg, use_distill=True)
    expected = -0.7 * out.reward.mean() + 3.0 * out.distill
    torch.testing.assert_close(out.loss.detach(), expected)
    assert out.images.shape[1] == 3 and out.reward.shape == (2,)
    plain = compute_loss(models, layers, build("brightness"), batch, cfg, use_distill=False)
    assert plain.distill is None
    torch.testing.assert_close(plain.loss.detach(), -0.7 * plain.reward.mean())


def test_one_full_rid_step_updates_student_and_ema(setup, tiny_model_dirs):
    kind, models, layers, cache = setup
    reset_ema(layers)
    cfg = make_cfg(tiny_model_dirs[kind], ema_decay=0.9)
    params = lora.trainable_parameters(layers)
    before = [p.detach().clone() for p in params]
    ema_before = [t.clone() for layer in layers for t in layer.ema_pair()]
    engine = Engine(models.unet, params, cfg, lr=1e-2)
    batch = make_batch(models, cfg, cache, ["a red circle", "a blue cat"], 1, 5, "cpu")
    out = compute_loss(models, layers, build("brightness"), batch, cfg, use_distill=True)
    engine.backward(out.loss)
    norm, stepped = engine.step()
    assert stepped and norm > 0
    ema_update(layers, 0.9)
    after = [p.detach() for p in params]
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    ema_after = [t for layer in layers for t in layer.ema_pair()]
    student = [t.detach() for layer in layers for t in layer.trainable_pair()]
    for e0, e1, s in zip(ema_before, ema_after, student):
        torch.testing.assert_close(e1, 0.9 * e0 + 0.1 * s)


def test_adapters_per_method(tiny_model_dirs):
    for name, expect in (("baseline", [1, 1, 1]), ("distill", [1, 1, 1]), ("group", [1, 2, 3]), ("rid", [1, 2, 3])):
        cfg = make_cfg(tiny_model_dirs["sd"], name=name)
        assert [adapters_for_task(cfg, t) for t in range(3)] == expect, name


def test_stacked_torch_path_equals_plain_reference():
    from ril_fast.kernels import reference

    x = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(16, 24, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    a = [torch.randn(r, 24, dtype=torch.float64, requires_grad=True) for r in (2, 3, 4)]
    bb = [torch.randn(16, r, dtype=torch.float64, requires_grad=True) for r in (2, 3, 4)]
    scales = [0.5, 1.0, 2.0]
    y1 = reference.lora_group_linear(x, w, b, a, bb, scales)
    y2 = reference.lora_group_linear_stacked(x, w, b, a, bb, scales)
    torch.testing.assert_close(y1, y2)
    g1 = torch.autograd.grad(y1.square().sum(), [x, a[1], bb[2]])
    g2 = torch.autograd.grad(y2.square().sum(), [x, a[1], bb[2]])
    for p, q in zip(g1, g2):
        torch.testing.assert_close(p, q)
