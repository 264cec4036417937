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
    # the compile gates last: their workers compile in the background meanwhile (pytest_collection_finish)
    items.sort(key=lambda item: "compile_gate" in item.keywords)  # stable: file order otherwise
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def pytest_collection_finish(session):
    """Start the worker of every compile gate a selected test reads (its ``report`` fixture)."""
    from aot_gate import start_worker

    if session.config.option.collectonly:
        return
    for path in sorted({str(item.path) for item in session.items
                        if "compile_gate" in item.keywords and "report" in getattr(item, "fixturenames", ())}):
        start_worker(path)


def pytest_sessionfinish(session, exitstatus):
    from aot_gate import stop_workers

    stop_workers()


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory):
    """Saved tiny random SD and SDXL diffusers folders, built once per session."""
    from ril_fast.models.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("tiny_models")
    return {kind: save_tiny_pipeline(root / kind, kind) for kind in ("sd", "sdxl")}
