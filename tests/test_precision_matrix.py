"""Precision under every backend: {plain, DeepSpeed ZeRO 0/1/2} x {fp32, bf16, fp16} train a RID task.

The plan (engine.py): the frozen base in ``model.dtype``; the trained adapters, their optimizer
state and the EMA teacher in fp32; frozen adapters of earlier tasks never touched. DeepSpeed's own
bf16 mode broke all three (it cast every UNet parameter to bf16, so the first EMA lerp failed and
earlier adapters were re-rounded at every task); each cell checks the dtypes and that DeepSpeed
trains exactly what the plain backend trains.
"""

import pytest
import torch

from ril_fast import engine as eng
from ril_fast import lora
from ril_fast.config import ConfigError, config_from_dict
from ril_fast.train import begin_task, build_run, train_task

PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BACKENDS = {"plain": {"enabled": "off"}, "zero0": {"enabled": "on", "zero_stage": 0},
            "zero1": {"enabled": "on", "zero_stage": 1}, "zero2": {"enabled": "on", "zero_stage": 2}}
DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def make_cfg(model_dir, out, precision, backend, tasks=1):
    return config_from_dict({
        "output_dir": str(out), "seed": 1, "model": {"path": str(model_dir), "dtype": DTYPE_NAMES[precision]},
        "method": {"name": "rid", "distill_first_task": True},  # the teacher (EMA) runs from step 1
        "sampling": {"steps": 2, "guidance_scale": 2.0}, "train": {"batch_size": 1, "lr": 5e-2},
        "deepspeed": {**BACKENDS[backend], "precision": precision},
        # no base row is evaluated here, so no base-std reward normalisation
        "tasks": [{"name": f"t{i}", "reward": "brightness", "train_prompts": ["a red circle"],
                   "eval_prompts": ["a red circle"], "steps": 1, "reward_norm": {"mode": "none"}}
                  for i in range(tasks)],
    })


@pytest.fixture
def launcher_env(monkeypatch):
    """What the deepspeed launcher sets for one rank (monkeypatch removes it after the test)."""
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                       ("MASTER_PORT", str(eng._free_port()))):
        monkeypatch.setenv(key, value)


@pytest.fixture
def engines(monkeypatch):
    """Every Engine the trainer builds, kept for inspection."""
    built = []

    class Recording(eng.Engine):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            built.append(self)

    monkeypatch.setattr(eng, "Engine", Recording)
    return built


def torch_optimizer(engine) -> torch.optim.Optimizer:
    opt = engine.optimizer
    while not isinstance(opt, torch.optim.AdamW):  # DeepSpeed's ZeRO optimizers wrap the client one
        opt = opt.optimizer
    return opt


def train(model_dir, out, precision, backend, tasks=1):
    cfg = make_cfg(model_dir, out, precision, backend, tasks)
    out.mkdir(parents=True)  # the CLI makes it before training (metrics.jsonl lives there)
    run = build_run(cfg)
    for task in range(tasks):
        begin_task(run, task)
        train_task(run, task, 0, None)
    return run


_plain_results = {}


@pytest.mark.parametrize("backend", list(BACKENDS))
@pytest.mark.parametrize("precision", list(PRECISIONS))
def test_cell_trains_with_the_precision_plan(tiny_model_dirs, tmp_path, launcher_env, engines, precision, backend):
    run = train(tiny_model_dirs["sd"], tmp_path / "run", precision, backend)
    (engine,) = engines
    assert engine.backend == ("plain" if backend == "plain" else f"deepspeed-{backend}")
    base = [p for n, p in run.models.unet.named_parameters() if "lora_" not in n]
    assert {p.dtype for p in base} == {PRECISIONS[precision]}
    adapters = lora.trainable_parameters(run.layers)
    assert {p.dtype for p in adapters} == {torch.float32}
    assert {t.dtype for layer in run.layers for t in layer.ema_pair()} == {torch.float32}
    state = [t for s in torch_optimizer(engine).state.values() for t in s.values() if t.is_floating_point()]
    assert state and {t.dtype for t in state if t.numel() > 1} == {torch.float32}
    trained = [p.detach().clone() for p in adapters]
    assert any(p.abs().sum() > 0 for p in trained[1::2])  # B moved off zero: the step was taken
    if backend == "plain":
        _plain_results[precision] = trained
    elif precision in _plain_results:  # DeepSpeed trains what the plain backend trains
        for got, want in zip(trained, _plain_results[precision]):
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_earlier_adapters_are_not_touched_by_a_new_task_engine(tiny_model_dirs, tmp_path, launcher_env):
    """DeepSpeed under bf16 (ZeRO 2 + offload, as configs/sdxl.json) over the second task of a group:
    the first task's adapters stay bitwise what they were, in fp32, and the base stays bf16."""
    cfg = make_cfg(tiny_model_dirs["sd"], tmp_path / "run", "bf16", "zero2", tasks=2)
    cfg.deepspeed.offload_optimizer = True
    run = build_run(cfg)
    begin_task(run, 0)
    with torch.no_grad():
        for layer in run.layers:
            layer.lora_b[0].normal_(0, 0.1, generator=torch.Generator().manual_seed(2))
    begin_task(run, 1)
    first = [t.detach().clone() for layer in run.layers for t in (layer.lora_a[0], layer.lora_b[0])]
    base = {n: p.dtype for n, p in run.models.unet.named_parameters()}
    eng.Engine(run.models.unet, lora.trainable_parameters(run.layers), cfg, lr=1e-2)
    after = [t.detach() for layer in run.layers for t in (layer.lora_a[0], layer.lora_b[0])]
    for got, want in zip(after, first):
        assert got.dtype == torch.float32 and torch.equal(got, want)
    assert {n: p.dtype for n, p in run.models.unet.named_parameters()} == base


@pytest.mark.parametrize("dtype,precision", [("float32", "bf16"), ("bfloat16", "fp32"), ("float16", "bf16")])
def test_mismatched_precision_is_refused_under_deepspeed(tiny_model_dirs, tmp_path, dtype, precision):
    data = {"output_dir": str(tmp_path), "model": {"path": str(tiny_model_dirs["sd"]), "dtype": dtype},
            "deepspeed": {"enabled": "on", "precision": precision},
            "tasks": [{"name": "a", "reward": "brightness", "train_prompts": ["x"], "eval_prompts": ["x"]}]}
    with pytest.raises(ConfigError) as err:
        config_from_dict(data)
    (line,) = err.value.problems
    assert line.startswith("deepspeed.precision:") and dtype in line
    data["deepspeed"]["enabled"] = "off"  # the plain backend does not read deepspeed.precision
    config_from_dict(data)
