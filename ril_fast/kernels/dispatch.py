"""Backend selection for the fused ops: Triton > CUDA library > torch reference on CUDA tensors.

Below sm_80 ``auto`` runs the LoRA op on torch's path (:data:`GEMM_OPS`: Triton has no tensor-core
GEMM there), on ROCm both ops (the kernels were never run on an AMD GPU), and fp64 on torch's path
(the GPU kernels are built and compile-gated for 16-bit and fp32 I/O; fp64 is for checks).
``RIL_FAST_KERNELS=auto|cuda|triton|torch`` overrides the choice. A backend the user named
explicitly that cannot run raises; ``auto`` falls back and logs the reason once.

``auto`` puts Triton before the CUDA C++ library because that is what an H200 measured
(``benchmarks/results/nvidia-h200/``): the library's LoRA op took 1.2–2.9 ms forward and
12–32 ms backward at SDXL's 32k–64k-token layers, where the Triton/cuBLAS op needs 0.24–0.53 ms
of GPU time for both, and its distillation loss took 13–14 µs per fwd+bwd at latent size against
Triton's 10–11 µs (feature size: 21.7 against 22.6 µs). The library stays selectable with
``RIL_FAST_KERNELS=cuda``, and is the fallback where Triton cannot run.
"""

from __future__ import annotations

import logging
import os

import torch

BACKENDS = ("auto", "cuda", "triton", "torch")
AUTO_ORDER = ("triton", "cuda")  # measured order, see the module docstring
# Below sm_80 (T4, V100, Turing/Volta consumer cards) Triton 3.7 compiles the LoRA op's GEMMs as FMA
# loops, without tensor cores (the AOT gate's sm_75 case: no mma.sync, ~6,000 fma; sm_80: mma.sync),
# where cuBLAS uses them. So auto does not pick Triton for the GEMM op there; the CUDA library is
# built for sm_80+ too, which leaves torch's path. The distillation loss is elementwise: any GPU.
GEMM_OPS = ("lora_group_linear",)
MIN_TENSOR_CORE_CC = (8, 0)
_log = logging.getLogger(__name__)
_logged: set[str] = set()


def requested_backend() -> str:
    value = os.environ.get("RIL_FAST_KERNELS", "auto").strip().lower() or "auto"
    if value not in BACKENDS:
        raise ValueError(f"RIL_FAST_KERNELS={value!r} is not one of {BACKENDS}; unset it or pick one of those")
    return value


def triton_available(device: torch.device) -> tuple[bool, str]:
    """Triton runs on CUDA tensors, or on CPU tensors under TRITON_INTERPRET=1."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # pragma: no cover - triton is a pinned dependency
        return False, f"triton import failed: {exc}"
    if device.type == "cuda":
        return True, "cuda device"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return True, "TRITON_INTERPRET=1 on CPU tensors"
    return False, f"tensors on {device.type} and TRITON_INTERPRET is not 1"


def triton_tensor_cores(device: torch.device) -> tuple[bool, str]:
    """Triton's GEMMs use tensor cores on ``device`` (sm_80+; see :data:`MIN_TENSOR_CORE_CC`)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return True, "no CUDA device to check"
    cc = tuple(torch.cuda.get_device_capability(device))
    if cc >= MIN_TENSOR_CORE_CC:
        return True, f"sm_{cc[0]}{cc[1]}"
    return False, (f"sm_{cc[0]}{cc[1]}: Triton compiles its GEMMs without tensor cores below sm_80 "
                   "(cuBLAS uses them); RIL_FAST_KERNELS=triton still forces it")


def triton_auto_ok(op: str, device: torch.device) -> tuple[bool, str]:
    """What ``auto`` asks of a GPU beyond :func:`triton_available`: an NVIDIA one (on ROCm the kernels
    compile, MI300's GEMM with MFMA, but no session has run them on AMD hardware, where bugs of the
    pipeliner class this project met on NVIDIA would go unseen), and for :data:`GEMM_OPS` tensor
    cores (:func:`triton_tensor_cores`). A named ``RIL_FAST_KERNELS=triton`` skips these."""
    if device.type == "cuda" and torch.version.hip is not None:
        return False, "ROCm: the Triton kernels were never run on an AMD GPU; RIL_FAST_KERNELS=triton forces them"
    return triton_tensor_cores(device) if op in GEMM_OPS else (True, "")


def cuda_lib_available(device: torch.device) -> tuple[bool, str]:
    if device.type != "cuda":
        return False, f"tensors on {device.type}, the CUDA library needs cuda tensors"
    try:
        from ril_fast.kernels import cuda_lib
    except ImportError:
        return False, "ril_fast.kernels.cuda_lib is missing"
    return cuda_lib.available()


# Decisions per (op, RIL_FAST_KERNELS, TRITON_INTERPRET, device): select_backend runs once per LoRA
# layer call, thousands of times per training step, and deciding costs ~10 µs of host time.
_decided: dict[tuple, str] = {}


def clear_cache() -> None:
    """Forget the decisions (after the CUDA library is (re)loaded, or when tests stub the checks)."""
    _decided.clear()


def select_backend(op: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    """Return the backend that runs ``op`` on tensors of ``device`` (and ``dtype``, when given):
    'cuda', 'triton' or 'torch'."""
    key = (op, os.environ.get("RIL_FAST_KERNELS"), os.environ.get("TRITON_INTERPRET"), device.type, device.index,
           dtype)
    choice = _decided.get(key)
    if choice is None:
        choice = _decided[key] = _select(op, device, dtype)
    return choice


def _select(op: str, device: torch.device, dtype: torch.dtype | None = None) -> str:
    want = requested_backend()
    if want == "torch":
        return "torch"
    checks = {"cuda": cuda_lib_available, "triton": triton_available}
    if want in checks:
        ok, why = checks[want](device)
        if not ok:
            raise RuntimeError(f"RIL_FAST_KERNELS={want} was asked for {op} but cannot run: {why}; "
                               "set RIL_FAST_KERNELS=auto to fall back")
        return want
    for name in AUTO_ORDER:
        # auto never picks the interpreter: it is a test vehicle, far slower than torch on CPU.
        ok, why = checks[name](device) if device.type == "cuda" else (False, f"tensors on {device.type}")
        if ok and dtype == torch.float64:
            ok, why = False, "fp64: the GPU kernels are built and compile-gated for 16-bit and fp32 I/O"
        if ok and name == "triton":
            ok, why = triton_auto_ok(op, device)
        if ok:
            return name
        key = f"{op}:{name}:{device.type}:{why}"  # each reason once (dtype rules differ per call)
        if key not in _logged:
            _logged.add(key)
            _log.info("%s: %s backend unavailable (%s)", op, name, why)
    return "torch"
