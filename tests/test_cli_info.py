"""`python -m ril_fast`: the diagnostic names versions, the device and each op's backend."""

from __future__ import annotations

import torch

from ril_fast import __main__ as info


def test_reports_backends_per_op(capsys, monkeypatch):
    monkeypatch.setenv("RIL_FAST_KERNELS", "torch")
    info.info()
    out = capsys.readouterr().out
    assert f"torch {torch.__version__}" in out
    assert "RIL_FAST_KERNELS=torch" in out
    assert "lora_group_linear    -> torch" in out and "distill_mse          -> torch" in out
    assert "triton_available" in out and "cuda_lib_available" in out  # and why not, when not
    if not torch.cuda.is_available():
        assert "device: cpu" in out
