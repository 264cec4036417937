"""The EMA teacher (methods/teacher.py): teacher_mode against a PEFT model holding the EMA values, and
the EMA update against hand arithmetic."""

import pytest
import torch

from ril_fast.methods.teacher import ema_update, reset_ema, teacher_mode
from tests.tiny_models import TASKS, grouped_unet, peft_copy, unet_inputs


def test_teacher_mode_uses_ema_and_blocks_grads():
    unet, layers = grouped_unet()
    inputs = unet_inputs()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in layers:
            layer.ema_a.copy_(torch.randn(layer.ema_a.shape, generator=g) * 0.1)
            layer.ema_b.copy_(torch.randn(layer.ema_b.shape, generator=g) * 0.1)
    # Reference: a PEFT model whose newest adapter holds the EMA values.
    ref_unet = peft_copy(layers, False, "attn", TASKS, n_active=len(TASKS))
    with torch.no_grad():
        for layer in layers:
            mod = ref_unet.get_submodule(layer.name)
            mod.lora_A["t2"].weight.copy_(layer.ema_a)
            mod.lora_B["t2"].weight.copy_(layer.ema_b)
        ref = ref_unet(**inputs).sample
    with teacher_mode(layers):
        teacher = unet(**inputs).sample
    assert not any(layer.use_teacher for layer in layers)
    torch.testing.assert_close(teacher, ref, atol=1e-5, rtol=1e-5)
    assert not teacher.requires_grad  # nothing trainable takes part
    with torch.no_grad():
        student = unet(**inputs).sample
    assert (student - teacher).abs().max() > 1e-3
    reset_ema(layers)
    with torch.no_grad(), teacher_mode(layers):
        torch.testing.assert_close(unet(**inputs).sample, student, atol=0, rtol=0)


def test_ema_update_arithmetic():
    _, layers = grouped_unet(tasks=TASKS[:2])
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for layer in layers:
            for p in layer.trainable_pair():
                p.copy_(torch.randn(p.shape, generator=g))
    old = [(layer.ema_a.clone(), layer.ema_b.clone()) for layer in layers]
    frozen = [layer.lora_a[0].clone() for layer in layers]
    m = 0.9
    ema_update(layers, m)
    for layer, (ea, eb), f in zip(layers, old, frozen):
        a, b = layer.trainable_pair()
        torch.testing.assert_close(layer.ema_a, m * ea + (1 - m) * a.detach())
        torch.testing.assert_close(layer.ema_b, m * eb + (1 - m) * b.detach())
        torch.testing.assert_close(layer.lora_a[0], f, atol=0, rtol=0)
    with pytest.raises(ValueError, match="decay"):
        ema_update(layers, 1.5)
