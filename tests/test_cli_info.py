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
    assert "triton_tensor_cores" in out  # why auto keeps the LoRA op off Triton below sm_80
    if not torch.cuda.is_available():
        assert "device: cpu" in out and "LoRA tuning table" not in out
