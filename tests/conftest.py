"""Test setup shared by every test module.

TRITON_INTERPRET must be set before the first ``import triton`` anywhere in the process, so that
Triton kernels run on CPU tensors; the dispatcher's ``auto`` mode still picks the torch path on
CPU, so only tests that force ``RIL_FAST_KERNELS=triton`` run the interpreter.
"""

import os

import torch

# On a GPU machine the Triton kernels run for real; the interpreter is for CPU-only machines.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("DIFFUSERS_OFFLINE", "1")

import pytest  # noqa: E402

# Tiny test models are latency-bound: one thread avoids OpenMP spin-waits on a shared 2-core machine
# (a 1M-parameter UNet call: 35 ms with 1 thread, up to 4 s with 2 threads under other load).
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    # Modules holding a `slow` or `compile_gate` test run first: `make test` spreads whole modules
    # over two workers (pytest-xdist, --dist loadfile) in this order, and a minute-long launcher test
    # picked up last would leave one core idle while the other finishes it.
    slow_files = {item.path for item in items if "slow" in item.keywords or "compile_gate" in item.keywords}
    items.sort(key=lambda item: item.path not in slow_files)  # stable: file order kept within each part
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(autouse=True)
def _fresh_kernel_dispatch():
    """Each test decides the fused ops' backends afresh (RIL_FAST_KERNELS is read once, then cached)."""
    from ril_fast import kernels

    kernels.clear_cache()
    yield
    kernels.clear_cache()


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Saved tiny random SD and SDXL diffusers folders, built once per session."""
    from ril_fast.models.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: save_tiny_pipeline(root / kind, kind) for kind in ("sd", "sdxl")}


@pytest.fixture(scope="module", params=["sd", "sdxl"])
def rid_group(request, tiny_model_dirs):
    """(kind, models, two-task adapter group, prompt cache) on the saved tiny SD or SDXL model: task 1
    "trained" (non-zero B), task 2's pair being trained, EMA = student. One per module: tests perturb it."""
    from ril_fast import lora
    from ril_fast.methods.teacher import reset_ema
    from ril_fast.models import load_models
    from ril_fast.models.text import PromptCache

    models = load_models(str(tiny_model_dirs[request.param]))
    layers = lora.inject_adapter_group(models.unet, "attn")
    lora.add_task(layers, 2, 2.0, seed=0)
    with torch.no_grad():  # task 1 "trained": non-zero B, then task 2 starts
        for layer in layers:
            layer.lora_b[0].normal_(0, 0.2)
    lora.add_task(layers, 2, 2.0, seed=1)
    reset_ema(layers)
    return request.param, models, layers, PromptCache(models)
