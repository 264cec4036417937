"""Which backend runs each fused op: ``torch`` (the reference), ``triton`` or ``cuda`` (the C++ library).

``RIL_FAST_KERNELS=auto|triton|cuda|torch`` (read once; :func:`clear_cache` re-reads it). A named
backend that cannot run raises; ``auto`` picks by the whole training step, as measured
(``docs/kernels.md``):

- ``lora_group_linear``: torch's stacked path on every device. On the GPU (H100/H200) the fused
  op wins only under CUDA-graph replay, which the trainer does not use; in plain launches it costs
  about twice the host time of torch's path, at ~5,000 LoRA calls per SD1.5 step.
- ``distill_mse``: Triton on NVIDIA GPUs (one launch forward, one backward; 5.6-6.5x eager under
  graph replay on an H200), else the CUDA library where Triton is absent, else torch. torch on CPU,
  on ROCm (never run on AMD hardware) and for fp64 (the GPU kernels are built for 16-bit and fp32).
"""

from __future__ import annotations

import logging
import os

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")
_log = logging.getLogger(__name__)
_requested: list[str] = []  # the env value, read once
_decided: dict[tuple, str] = {}  # (op, device type, index, dtype) -> backend


def requested_backend() -> str:
    """``RIL_FAST_KERNELS``, validated; read on first use and cached until :func:`clear_cache`."""
    if not _requested:
        value = os.environ.get("RIL_FAST_KERNELS", "auto").strip().lower() or "auto"
        if value not in BACKENDS:
            raise ValueError(f"RIL_FAST_KERNELS={value!r} is not one of {BACKENDS}; unset it or pick one of those")
        _requested.append(value)
    return _requested[0]


def clear_cache() -> None:
    """Forget the decisions and the environment value (tests; after building the CUDA library)."""
    _requested.clear()
    _decided.clear()


def triton_available(device: torch.device) -> tuple[bool, str]:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1 (the tests)."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # Triton missing (Windows, some platforms): the CUDA library's case
        return False, f"triton import failed: {exc}"
    if device.type == "cuda":
        return True, "cuda device"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "TRITON_INTERPRET=1 on CPU tensors"
    return False, f"tensors on {device.type} and TRITON_INTERPRET is not 1"


def cuda_lib_available(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"tensors on {device.type}, the CUDA library needs cuda tensors"
    from ril_fast.kernels import cuda_lib

    return cuda_lib.available()


def select_backend(op: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """'torch', 'triton' or 'cuda' for ``op`` on tensors of ``device`` (and ``dtype``); decided once."""
    key = (op, device.type, device.index, dtype)
    choice = _decided.get(key)
    if choice is None:
        choice = _decided[key] = _select(op, device, dtype)
    return choice


def _select(op: str, device: torch.device, dtype: torch.dtype | None) -> str:
    want = requested_backend()
    checks = {"cuda": cuda_lib_available, "triton": triton_available}
    if want in checks:
        ok, why = checks[want](device)
        if not ok:
            raise RuntimeError(f"RIL_FAST_KERNELS={want} was asked for {op} but cannot run: {why}; "
                               "set RIL_FAST_KERNELS=auto to fall back")
        return want
    if want == "torch" or op == "lora_group_linear":  # see the module docstring
        return "torch"
    if device.type != "cuda":
        why = f"tensors on {device.type}"  # auto never picks the interpreter: a test vehicle
    elif torch.version.hip is not None:
        why = "ROCm: the kernels were never run on an AMD GPU"
    elif dtype == torch.float64:
        why = "fp64: the GPU kernels are built for 16-bit and fp32 I/O"
    else:
        for name in ("triton", "cuda"):
            ok, why = checks[name](device)
            if ok:
                return name
            _log.info("%s: %s backend unavailable (%s)", op, name, why)
    _log.info("%s on %s: torch (%s)", op, device, why)
    return "torch"
