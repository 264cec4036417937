"""The two fused ops, each run by the backend :mod:`ril_fast.kernels.dispatch` picks.

``lora_group_linear`` and ``distill_mse`` look their implementation up once per call, in a dict
keyed by device and dtype (no environment reads, no checks on the hot path). Backends: the torch
reference (:mod:`.reference`), Triton (:mod:`.lora_group`, :mod:`.x0_mse`) and the CUDA C++
library (:mod:`.cuda_lib`).
"""

from __future__ import annotations

import torch

from ril_fast.kernels import dispatch, reference
from ril_fast.kernels.dispatch import select_backend

_impls: dict[tuple, object] = {}  # (op, device, dtype) -> callable


def clear_cache() -> None:
    """Forget the chosen implementations and the backend decisions (tests; a rebuilt CUDA library)."""
    _impls.clear()
    dispatch.clear_cache()


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
    """
    fn = _impls.get(("lora", x.device, x.dtype)) or _resolve("lora", x.device, x.dtype)
    return fn(x, weight, bias, lora_a, lora_b, scales)


def distill_mse(student_out, teacher_out, x_t, alpha_bar, prediction_type, weight=None):
    """Fused last-step distillation loss; see :func:`ril_fast.kernels.reference.distill_mse`."""
    dev, dt = student_out.device, student_out.dtype
    fn = _impls.get(("distill", dev, dt)) or _resolve("distill", dev, dt)
    return fn(student_out, teacher_out, x_t, alpha_bar, prediction_type, weight)


def _resolve(op: str, device: torch.device, dtype: torch.dtype):
    backend = select_backend("lora_group_linear" if op == "lora" else "distill_mse", device, dtype)
    if backend == "torch":
        fn = reference.lora_group_linear_stacked if op == "lora" else reference.distill_mse
    elif backend == "cuda":
        from ril_fast.kernels import cuda_lib

        fn = cuda_lib.lora_group_linear if op == "lora" else cuda_lib.distill_mse
    elif op == "lora":
        from ril_fast.kernels import lora_group

        fn = _on_its_gpu(lora_group.lora_group_linear)
    else:
        from ril_fast.kernels import x0_mse

        fn = _on_its_gpu(x0_mse.distill_mse)
    _impls[(op, device, dtype)] = fn
    return fn


def _on_its_gpu(fn):
    """``fn`` run with its first tensor's GPU current: Triton launches on the current device, not on
    its arguments' (the backward is safe: autograd runs it with the gradients' device current). The
    CUDA library guards itself. No context entered on the usual path."""
    def call(t, *args):
        if t.is_cuda and t.get_device() != torch.cuda.current_device():
            with torch.cuda.device(t.device):
                return fn(t, *args)
        return fn(t, *args)

    return call


__all__ = ["lora_group_linear", "distill_mse", "select_backend", "reference", "clear_cache"]
