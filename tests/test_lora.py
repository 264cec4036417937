"""LoRAGroupLinear and the group functions against PEFT (several active adapters) and hand arithmetic."""

import pytest
import torch
from torch import nn

import ril_fast.kernels as kernels
from ril_fast import lora
from ril_fast.lora import LoRAGroupLinear
from ril_fast.methods.teacher import ema_update, teacher_mode
from tests.tiny_models import TASKS, grouped_unet, peft_copy, randomize_b, tiny_unet, unet_inputs


@pytest.mark.parametrize("sdxl,preset", [(False, "attn"), (True, "attn_ff")], ids=["sd-attn", "sdxl-attn_ff"])
def test_group_matches_peft_all_active(sdxl, preset):
    unet, layers = grouped_unet(sdxl, preset)
    n_linear = sum(isinstance(m, nn.Linear) and lora.inject._matches(n, lora.PRESETS[preset])
                   for n, m in tiny_unet(0, sdxl=sdxl).named_modules())
    assert len(layers) == n_linear > 0
    peft_unet = peft_copy(layers, sdxl, preset, TASKS, n_active=len(TASKS))
    inputs = unet_inputs(sdxl=sdxl)
    with torch.no_grad():
        ours = unet(**inputs).sample
        ref = peft_unet(**inputs).sample
        base = tiny_unet(0, sdxl=sdxl)(**inputs).sample
    assert (ours - base).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_active_tasks_prefix_and_zero():
    unet, layers = grouped_unet()
    inputs = unet_inputs()
    with torch.no_grad():
        lora.set_active_tasks(layers, 0)
        torch.testing.assert_close(unet(**inputs).sample, tiny_unet(0)(**inputs).sample, atol=1e-6, rtol=1e-6)
        lora.set_active_tasks(layers, 2)
        ref = peft_copy(layers, False, "attn", TASKS, n_active=2)(**inputs).sample
        torch.testing.assert_close(unet(**inputs).sample, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="active_tasks=4"):
        lora.set_active_tasks(layers, 4)


def test_add_task_keeps_output_and_freezes():
    unet, layers = grouped_unet(tasks=TASKS[:2])
    inputs = unet_inputs()
    with torch.no_grad():
        before = unet(**inputs).sample
    lora.add_task(layers, 5, 5.0, seed=3)
    assert all(layer.num_tasks == 3 for layer in layers)
    with torch.no_grad():
        # B = 0 adds exactly nothing; the stacked CPU path regroups the GEMMs (R grows), so allow
        # fp32 rounding, not bitwise identity.
        torch.testing.assert_close(unet(**inputs).sample, before, atol=1e-6, rtol=1e-5)
    for layer in layers:
        assert [p.requires_grad for p in layer.lora_a] == [False, False, True]
        assert [p.requires_grad for p in layer.lora_b] == [False, False, True]
        assert not layer.base.weight.requires_grad
        assert layer.lora_a[2].abs().max() > 0 and layer.lora_b[2].abs().max() == 0
    trainable = {id(p) for p in unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in lora.trainable_parameters(layers)}
    assert len(trainable) == 2 * len(layers)


def test_add_task_deterministic_and_peft_init_range():
    _, l1 = grouped_unet(tasks=TASKS[:1])
    _, l2 = grouped_unet(tasks=TASKS[:1])
    for a, b in zip(l1, l2):
        torch.testing.assert_close(a.lora_a[0], b.lora_a[0], atol=0, rtol=0)
    # PEFT's kaiming_uniform(a=sqrt(5)) bound is 1/sqrt(d_in).
    layer = l1[0]
    bound = 1 / layer.in_features**0.5
    assert layer.lora_a[0].abs().max() <= bound and layer.lora_a[0].abs().max() > 0.5 * bound


def test_only_newest_pair_gets_grads():
    unet, layers = grouped_unet()
    unet(**unet_inputs()).sample.square().mean().backward()
    for layer in layers:
        assert all(p.grad is None for p in list(layer.lora_a[:-1]) + list(layer.lora_b[:-1]))
        assert layer.base.weight.grad is None
        a, b = layer.trainable_pair()
        assert b.grad is not None and b.grad.abs().max() > 0
        assert a.grad is not None


def test_group_state_dict_roundtrip():
    unet, layers = grouped_unet()
    ema_update(layers, 0.5)
    sd = {k: v.clone() for k, v in lora.group_state_dict(layers).items()}
    inputs = unet_inputs()
    with torch.no_grad():
        out = unet(**inputs).sample
    unet2 = tiny_unet(0)
    layers2 = lora.inject_adapter_group(unet2, "attn")
    for t, (r, alpha) in enumerate(TASKS):
        lora.add_task(layers2, r, 1.0, seed=999 + t)  # wrong init and scale: the load must restore both
    lora.load_group_state_dict(layers2, sd)
    with torch.no_grad():
        torch.testing.assert_close(unet2(**inputs).sample, out, atol=0, rtol=0)
        with teacher_mode(layers), teacher_mode(layers2):
            torch.testing.assert_close(unet2(**inputs).sample, unet(**inputs).sample, atol=0, rtol=0)
    unet3 = tiny_unet(0)
    layers3 = lora.inject_adapter_group(unet3, "attn")
    lora.add_task(layers3, 2, 3.0, seed=0)
    with pytest.raises(ValueError, match="missing"):
        lora.load_group_state_dict(layers3, sd)


def test_forward_is_one_kernel_call(monkeypatch):
    calls = []
    real = kernels.lora_group_linear

    def spy(*args):
        calls.append(len(args[3]))
        return real(*args)

    monkeypatch.setattr(kernels, "lora_group_linear", spy)
    layer = LoRAGroupLinear(nn.Linear(6, 5))
    layer.merge = False  # (merging folds the frozen adapters into W: tests/test_lora_merge.py)
    layer.add_task(2, 2.0)
    layer.add_task(3, 3.0)
    layer(torch.randn(4, 6))
    assert calls == [2]


def test_inject_errors():
    unet = tiny_unet(0)
    with pytest.raises(ValueError, match="available linear names: .*to_q"):
        lora.inject_adapter_group(unet, ["nope"])
    with pytest.raises(ValueError, match="not a preset"):
        lora.inject_adapter_group(unet, "attention")
    lora.inject_adapter_group(unet, "attn")
    with pytest.raises(ValueError, match="already holds"):
        lora.inject_adapter_group(unet, "attn")
    assert not any(p.requires_grad for p in unet.parameters())


@pytest.mark.parametrize("teacher", [False, True], ids=["student", "teacher"])
def test_triton_path_matches_torch(monkeypatch, teacher):
    """The layer through the Triton kernel (interpreter on CPU) equals the torch reference, grads included."""
    torch.manual_seed(0)
    layer = LoRAGroupLinear(nn.Linear(24, 20))
    for t, (r, alpha) in enumerate(TASKS):
        layer.add_task(r, alpha, generator=torch.Generator().manual_seed(t))
    randomize_b([layer])
    with torch.no_grad():
        layer.ema_b.copy_(torch.randn(layer.ema_b.shape) * 0.1)
    layer.use_teacher = teacher
    x = torch.randn(2, 9, 24)

    def run(backend, active=None):
        monkeypatch.setenv("RIL_FAST_KERNELS", backend)
        layer.active_tasks = active
        xi = x.clone().requires_grad_(True)
        y = layer(xi)
        grads = torch.autograd.grad(y.square().sum(), [xi, *layer.trainable_pair()], allow_unused=True)
        return y.detach(), grads

    y_ref, g_ref = run("torch")
    y_tri, g_tri = run("triton")
    torch.testing.assert_close(y_tri, y_ref, atol=1e-4, rtol=1e-4)
    for a, b in zip(g_tri, g_ref):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)
    assert (g_ref[1] is None) == teacher  # teacher mode: no grad reaches the trainable pair
    y0, _ = run("triton", active=0)
    torch.testing.assert_close(y0, layer.base(x), atol=1e-6, rtol=1e-6)
