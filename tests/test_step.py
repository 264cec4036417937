"""The training step (step.py): loss assembly, and one full RID step that updates student and EMA."""

import torch

from ril_fast import lora
from ril_fast.engine import Engine
from ril_fast.methods.teacher import ema_update, reset_ema
from ril_fast.rewards import build
from ril_fast.step import compute_loss, make_batch
from tests.tiny_models import perturb_student, rid_config


def test_loss_assembly(rid_group, tiny_model_dirs):
    kind, models, layers, cache = rid_group
    reset_ema(layers)
    perturb_student(layers)
    cfg = rid_config(tiny_model_dirs[kind], reward_weight=0.7, distill_weight=3.0)
    batch = make_batch(models, cfg, cache, ["a red circle", "a blue cat"], 1, 4, "cpu")
    out = compute_loss(models, layers, build("brightness"), batch, cfg, use_distill=True)
    expected = -0.7 * out.reward.mean() + 3.0 * out.distill
    torch.testing.assert_close(out.loss.detach(), expected)
    assert out.images.shape[1] == 3 and out.reward.shape == (2,)
    plain = compute_loss(models, layers, build("brightness"), batch, cfg, use_distill=False)
    assert plain.distill is None
    torch.testing.assert_close(plain.loss.detach(), -0.7 * plain.reward.mean())


def test_one_full_rid_step_updates_student_and_ema(rid_group, tiny_model_dirs):
    kind, models, layers, cache = rid_group
    reset_ema(layers)
    cfg = rid_config(tiny_model_dirs[kind], ema_decay=0.9)
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
