"""LoRAGroupLinear and the group functions against PEFT (several active adapters) and hand arithmetic."""

import pytest
import torch
from torch import nn

import ril_fast.kernels as kernels
from ril_fast import lora
from ril_fast.lora import LoRAGroupLinear
from ril_fast.methods.teacher import ema_update, reset_ema, teacher_mode
from tests.tiny_models import tiny_unet, unet_inputs

# (rank, alpha) per task: mixed ranks and scales, so a wrong slice or scale shows.
TASKS = [(2, 3.0), (4, 8.0), (3, 1.5)]


def _randomize_b(layers, seed=7):
    # B = 0 after add_task would hide every adapter; give each B a non-zero value.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in layers:
            for b in layer.lora_b:
                b.copy_(torch.randn(b.shape, generator=g) * 0.1)


def _grouped(sdxl=False, preset="attn", tasks=TASKS):
    unet = tiny_unet(0, sdxl=sdxl)
    layers = lora.inject_adapter_group(unet, preset)
    for t, (r, alpha) in enumerate(tasks):
        lora.add_task(layers, r, alpha, seed=100 + t)
    _randomize_b(layers)
    return unet, layers


def _peft_copy(layers, sdxl, preset, tasks, n_active):
    from peft import LoraConfig

    unet = tiny_unet(0, sdxl=sdxl)
    targets = list(lora.PRESETS[preset])
    for t, (r, alpha) in enumerate(tasks):
        unet.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=targets), adapter_name=f"t{t}")
    with torch.no_grad():
        for layer in layers:
            mod = unet.get_submodule(layer.name)
            for t in range(len(tasks)):
                mod.lora_A[f"t{t}"].weight.copy_(layer.lora_a[t])
                mod.lora_B[f"t{t}"].weight.copy_(layer.lora_b[t])
    unet.set_adapters([f"t{t}" for t in range(n_active)])
    return unet


@pytest.mark.parametrize("sdxl,preset", [(False, "attn"), (True, "attn_ff")], ids=["sd-attn", "sdxl-attn_ff"])
def test_group_matches_peft_all_active(sdxl, preset):
    unet, layers = _grouped(sdxl, preset)
    n_linear = sum(isinstance(m, nn.Linear) and lora.inject._matches(n, lora.PRESETS[preset])
                   for n, m in tiny_unet(0, sdxl=sdxl).named_modules())
    assert len(layers) == n_linear > 0
    peft_unet = _peft_copy(layers, sdxl, preset, TASKS, n_active=len(TASKS))
    inputs = unet_inputs(sdxl=sdxl)
    with torch.no_grad():
        ours = unet(**inputs).sample
        ref = peft_unet(**inputs).sample
        base = tiny_unet(0, sdxl=sdxl)(**inputs).sample
    assert (ours - base).abs().max() > 1e-3  # the adapters matter
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)


def test_active_tasks_prefix_and_zero():
    unet, layers = _grouped()
    inputs = unet_inputs()
    with torch.no_grad():
        lora.set_active_tasks(layers, 0)
        torch.testing.assert_close(unet(**inputs).sample, tiny_unet(0)(**inputs).sample, atol=1e-6, rtol=1e-6)
        lora.set_active_tasks(layers, 2)
        ref = _peft_copy(layers, False, "attn", TASKS, n_active=2)(**inputs).sample
        torch.testing.assert_close(unet(**inputs).sample, ref, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="active_tasks=4"):
        lora.set_active_tasks(layers, 4)


def test_add_task_keeps_output_and_freezes():
    unet, layers = _grouped(tasks=TASKS[:2])
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
    _, l1 = _grouped(tasks=TASKS[:1])
    _, l2 = _grouped(tasks=TASKS[:1])
    for a, b in zip(l1, l2):
        torch.testing.assert_close(a.lora_a[0], b.lora_a[0], atol=0, rtol=0)
    # PEFT's kaiming_uniform(a=sqrt(5)) bound is 1/sqrt(d_in).
    layer = l1[0]
    bound = 1 / layer.in_features**0.5
    assert layer.lora_a[0].abs().max() <= bound and layer.lora_a[0].abs().max() > 0.5 * bound


def test_only_newest_pair_gets_grads():
    unet, layers = _grouped()
    unet(**unet_inputs()).sample.square().mean().backward()
    for layer in layers:
        assert all(p.grad is None for p in list(layer.lora_a[:-1]) + list(layer.lora_b[:-1]))
        assert layer.base.weight.grad is None
        a, b = layer.trainable_pair()
        assert b.grad is not None and b.grad.abs().max() > 0
        assert a.grad is not None


def test_teacher_mode_uses_ema_and_blocks_grads():
    unet, layers = _grouped()
    inputs = unet_inputs()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for layer in layers:
            layer.ema_a.copy_(torch.randn(layer.ema_a.shape, generator=g) * 0.1)
            layer.ema_b.copy_(torch.randn(layer.ema_b.shape, generator=g) * 0.1)
    # Reference: a PEFT model whose newest adapter holds the EMA values.
    ref_unet = _peft_copy(layers, False, "attn", TASKS, n_active=len(TASKS))
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
    _, layers = _grouped(tasks=TASKS[:2])
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


def test_group_state_dict_roundtrip():
    unet, layers = _grouped()
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
    _randomize_b([layer])
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
