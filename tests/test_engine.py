"""Engines: DeepSpeed (1 process, gloo on CPU) ZeRO 0/1/2 take the same first step as the plain backend."""

import pytest
import torch

from ril_fast import lora
from ril_fast.config import config_from_dict
from ril_fast.engine import Engine, deepspeed_config
from ril_fast.models import load_models
from ril_fast.models.text import PromptCache
from ril_fast.rewards import build
from ril_fast.step import compute_loss, make_batch


def cfg_for(model_dir, **ds):
    return config_from_dict({
        "output_dir": "unused", "model": {"path": str(model_dir)}, "method": {"name": "group"},
        "sampling": {"steps": 2, "guidance_scale": 2.0}, "train": {"batch_size": 1, "lr": 1e-2, "grad_clip": 0.5},
        "deepspeed": ds,
        "tasks": [{"name": "a", "reward": "brightness", "train_prompts": ["a red circle"], "eval_prompts": ["x"]}],
    })


def one_step(model_dir, **ds):
    models = load_models(str(model_dir))
    layers = lora.inject_adapter_group(models.unet, "attn")
    lora.add_task(layers, 2, 2.0, seed=0)
    with torch.no_grad():
        for layer in layers:
            layer.lora_b[0].normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    cfg = cfg_for(model_dir, **ds)
    engine = Engine(models.unet, lora.trainable_parameters(layers), cfg, lr=1e-2)
    batch = make_batch(models, cfg, PromptCache(models), ["a red circle"], 0, 0, "cpu")
    out = compute_loss(models, layers, build("brightness"), batch, cfg, use_distill=False)
    engine.backward(out.loss)
    norm, stepped = engine.step()
    return [p.detach().clone() for p in lora.trainable_parameters(layers)], norm, stepped, engine


@pytest.fixture(scope="module")
def plain(tiny_model_dirs):
    return one_step(tiny_model_dirs["sd"])


@pytest.mark.parametrize("stage", [0, 1, 2])
def test_deepspeed_zero_matches_plain(tiny_model_dirs, plain, stage, monkeypatch):
    from ril_fast.engine import _free_port

    # What the deepspeed launcher would set; monkeypatch removes them again after the test.
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(_free_port()))):
        monkeypatch.setenv(key, value)
    params, norm, stepped, engine = one_step(tiny_model_dirs["sd"], enabled="on", zero_stage=stage)
    assert engine.deepspeed and stepped
    ref_params, ref_norm, _, _ = plain
    assert norm == pytest.approx(ref_norm, rel=1e-4)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p, r, rtol=1e-5, atol=1e-6)


def test_deepspeed_config_sections(tiny_model_dirs):
    cfg = cfg_for(tiny_model_dirs["sd"], zero_stage=2, offload_optimizer=True, precision="bf16")
    ds = deepspeed_config(cfg)
    assert ds["zero_optimization"] == {"stage": 2, "offload_optimizer": {"device": "cpu"}}
    # DeepSpeed's bf16 mode would cast the fp32 adapters: the frozen base is already in model.dtype
    assert "bf16" not in ds and "fp16" not in ds and ds["gradient_clipping"] == 0.5


def test_adamw8bit_steps(tiny_model_dirs):
    cfg = cfg_for(tiny_model_dirs["sd"], enabled="off")
    cfg.train.optimizer = "adamw8bit"
    p = torch.nn.Parameter(torch.randn(64, 80))
    engine = Engine(torch.nn.Linear(1, 1), [p], cfg, lr=1e-2)
    before = p.detach().clone()
    p.grad = torch.randn_like(p)
    norm, stepped = engine.step()
    assert stepped and not torch.equal(before, p.detach())
    assert type(engine.optimizer).__name__ == "AdamW8bit"


@pytest.mark.parametrize("setting,cuda,want,current", [
    ("cuda:1", True, "cuda:1", "cuda:1"),  # a second GPU named: made current, Triton launches there
    ("cuda", True, "cuda:0", "cuda:0"),
    ("auto", True, "cuda:0", "cuda:0"),
    ("auto", False, "cpu", None),
    ("cpu", True, "cpu", None),
])
def test_pick_device_makes_the_gpu_current(monkeypatch, setting, cuda, want, current):
    """Triton launches on the current device whatever its arguments' device: the run's GPU becomes the
    current one, so ``model.device: cuda:1`` does not launch the fused kernels on GPU 0."""
    from types import SimpleNamespace

    from ril_fast import engine

    calls = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "set_device", lambda d: calls.append(str(torch.device(d))))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    cfg = SimpleNamespace(model=SimpleNamespace(device=setting))  # pick_device reads only this
    assert str(engine.pick_device(cfg)) == want
    assert calls == ([current] if current else [])
