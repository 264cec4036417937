"""Public functional ops backed by fused kernels.

``lora_group_linear`` and ``distill_mse`` choose their backend per call through
:func:`ril_fast.kernels.dispatch.select_backend` (Triton > CUDA library > torch reference on CUDA
tensors; the measured order).
"""

from __future__ import annotations

import torch

from ril_fast.kernels import reference
from ril_fast.kernels.dispatch import select_backend


def lora_group_linear(x, weight, bias, lora_a, lora_b, scales):
    """``y = x W^T + b + Σ_i s_i (x A_i^T) B_i^T`` over a group of LoRA adapters.

    Args:
        x: (..., d_in).
        weight: (d_out, d_in), frozen.
        bias: (d_out,) or None.
        lora_a: list of (r_i, d_in); lora_b: list of (d_out, r_i); ranks may differ.
        scales: list of floats.
    Returns:
        (..., d_out).

    On the Triton backend each direction runs the implementation this GPU's tuning table names
    for the shape (:mod:`ril_fast.kernels.lora_tuning`; ``RIL_FAST_LORA_FWD`` / ``RIL_FAST_LORA_BWD``
    force one).
    """
    backend = select_backend("lora_group_linear", x.device, x.dtype)
    if backend == "torch":
        return reference.lora_group_linear_stacked(x, weight, bias, lora_a, lora_b, scales)
    from ril_fast.kernels import lora_group

    return _on_its_gpu(backend, x, lora_group.lora_group_linear, x, weight, bias, lora_a, lora_b, scales,
                       backend=backend)


def _foreign_gpu(t: torch.Tensor) -> bool:
    """``t`` is on a GPU other than the current one. Triton launches on the current device, not on
    its arguments' (the backward is safe: autograd runs it with the gradients' device current), so
    the forward switches first. The CUDA library guards itself."""
    return t.is_cuda and t.get_device() != torch.cuda.current_device()


def _on_its_gpu(chosen: str, t: torch.Tensor, fn, /, *args, **kwargs):
    """``fn(*args, **kwargs)``, on ``t``'s GPU where Triton (the ``chosen`` backend) would otherwise
    launch on another (:func:`_foreign_gpu`); no context entered on the usual path."""
    if chosen == "triton" and _foreign_gpu(t):
        with torch.cuda.device(t.device):
            return fn(*args, **kwargs)
    return fn(*args, **kwargs)


def distill_mse(student_out, teacher_out, x_t, alpha_bar, prediction_type, weight=None):
    """Fused last-step distillation loss; see :func:`ril_fast.kernels.reference.distill_mse`."""
    backend = select_backend("distill_mse", student_out.device, student_out.dtype)
    if backend == "torch":
        return reference.distill_mse(student_out, teacher_out, x_t, alpha_bar, prediction_type, weight)
    from ril_fast.kernels import distill as _distill

    return _on_its_gpu(backend, student_out, _distill.distill_mse, student_out, teacher_out, x_t, alpha_bar,
                       prediction_type, weight, backend=backend)


__all__ = ["lora_group_linear", "distill_mse", "select_backend", "reference"]
