"""LoRAGroupLinear's merged weights: the adapters folded into cached copies of W (fp32 on CPU).

The oracle is the plain fp64 reference of the group, ``x Wᵀ + b + Σ s_i (x A_iᵀ) B_iᵀ``, on the
adapters the layer uses at that moment; every test also checks that the cache follows the change
it guards against (a planted stale cache fails them).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ril_fast.kernels import reference
from ril_fast.lora.group import LoRAGroupLinear


def _layer(k=3, d_in=24, d_out=20, rank=4):
    layer = LoRAGroupLinear(nn.Linear(d_in, d_out))
    for i in range(k):
        layer.add_task(rank, 2.0 + i)
        with torch.no_grad():
            layer.lora_b[-1].normal_()  # B = 0 would hide a missing adapter
    with torch.no_grad():
        layer.ema_b.normal_()  # a teacher that differs from the student
    return layer


def _ref(layer, x):
    a, b, s = layer.adapters_for_forward()
    d = lambda t: t.detach().double()  # noqa: E731
    return reference.lora_group_linear(d(x), d(layer.base.weight), d(layer.base.bias), [d(t) for t in a],
                                       [d(t) for t in b], s)


def _close(y, want):
    err = (y.double() - want).abs().max().item() / want.abs().max().item()
    assert err < 1e-6, f"rel err {err:.2e} (fp32 rounding is ~1e-7)"


def test_auto_merges_fp32_on_cpu_only():
    assert _layer()._current_plan()[3]
    assert not _layer().to(torch.bfloat16)._current_plan()[3]
    zero3 = _layer()
    zero3.base.weight.ds_id = 7  # a ZeRO-3 partitioned weight: a merged copy would be the whole matrix
    zero3._plan = None
    assert not zero3._current_plan()[3]


def test_no_grad_forward_is_one_linear_with_the_merged_weight(monkeypatch):
    layer = _layer()
    x = torch.randn(2, 7, 24)
    from ril_fast import kernels

    monkeypatch.setattr(kernels, "lora_group_linear", lambda *a: pytest.fail("took the LoRA op"))
    with torch.no_grad():
        y = layer(x)
        merged = layer._merged[1]
        layer(x)
        assert layer._merged[1] is merged  # built once, reused by the next call
    _close(y, _ref(layer, x))
    torch.testing.assert_close(layer.merged_weight(), layer.base.weight + sum(
        s * b @ a for a, b, s in zip(*layer.adapters_for_forward())), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("change", ["optimizer", "data_write_and_step_hook", "teacher", "ema_update", "active",
                                    "add_task", "load", "scale"])
def test_the_cache_follows_every_change(change):
    """The no-grad output after each kind of change equals the reference on the new adapters."""
    layer = _layer()
    x = torch.randn(9, 24)
    with torch.no_grad():
        before = layer(x)
    a, b = layer.trainable_pair()
    if change == "optimizer":  # torch's AdamW writes in place: versions move
        b.grad = torch.randn_like(b)
        torch.optim.AdamW([b], lr=0.5).step()
    elif change == "data_write_and_step_hook":
        class DataWriter(torch.optim.Optimizer):  # as bitsandbytes / DeepSpeed: through .data, no version bump
            def step(self, closure=None):
                for p in self.param_groups[0]["params"]:
                    p.data.add_(1.0)

        DataWriter([b], {}).step()
    elif change == "teacher":
        layer.use_teacher = True
    elif change == "ema_update":
        layer.use_teacher = True
        with torch.no_grad():
            layer(x)
            torch._foreach_lerp_([layer.ema_b], [torch.randn_like(layer.ema_b)], 0.5)
    elif change == "active":
        layer.active_tasks = 1
    elif change == "add_task":
        layer.add_task(4, 1.0)
        with torch.no_grad():
            layer.lora_b[-1].normal_()
    elif change == "load":  # load_group_state_dict copies into the frozen adapters
        with torch.no_grad():
            layer.lora_a[0].copy_(torch.randn_like(layer.lora_a[0]))
    elif change == "scale":
        layer.scales[1] = 7.0
    with torch.no_grad():
        after = layer(x)
    assert not torch.allclose(after, before)
    _close(after, _ref(layer, x))


def test_grad_path_folds_the_frozen_adapters_once():
    """With grad: y = x·(W_f + s_t B_t A_t)ᵀ + b, W_f cached across calls and the trainable pair under
    autograd; its gradients and x's equal the unmerged layer's, frozen adapters get none, and the
    output equals the no-grad forward's bit for bit (the teacher equal to the student gives exactly 0)."""
    layer = _layer()
    plain = _layer()
    plain.load_state_dict(layer.state_dict())
    plain.merge = False
    x = torch.randn(2, 7, 24, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    y = layer(x)
    folded = layer._folded[1]
    layer(x).sum().backward()  # a second call reuses the fold
    assert layer._folded[1] is folded and layer._merged is None  # no merged copy held into the backward
    y.sum().backward()
    plain(x2).sum().backward()
    plain(x2).sum().backward()
    _close(y.detach(), _ref(layer, x))
    with torch.no_grad():
        assert torch.equal(layer(x), y)
        layer.reset_ema()
        layer.use_teacher = True
        assert torch.equal(layer(x), y)
    grads = [(x.grad, x2.grad)] + [(p.grad, q.grad) for p, q in zip(layer.trainable_pair(), plain.trainable_pair())]
    for got, want in grads:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert all(p.grad is None for p in list(layer.lora_a)[:-1] + list(layer.lora_b)[:-1])


def test_checkpoint_recompute_matches_the_forward():
    """The sampler's window runs each UNet call under non-reentrant checkpointing, with the teacher
    switched on and off in between: the recompute must rebuild the same graph."""
    layer = _layer()
    x = torch.randn(5, 24, requires_grad=True)
    y = checkpoint(layer, x, use_reentrant=False)
    layer.use_teacher = True
    with torch.no_grad():
        layer(x)
    layer.use_teacher = False
    y.sum().backward()
    ref = x.detach().clone().requires_grad_(True)
    plain = _layer()
    plain.load_state_dict(layer.state_dict())
    plain.merge = False
    plain(ref).sum().backward()
    torch.testing.assert_close(x.grad, ref.grad, rtol=1e-5, atol=1e-6)
