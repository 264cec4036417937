"""ctypes front end of the CUDA C++ library built from ``csrc/`` (``libril_fast_cuda<ver>.so``).

The library is optional: nothing here loads at import time and nothing here raises at import.
:func:`available` says whether it can run and why not. It is looked for in ``ril_fast/_lib``,
where ``CMakeLists.txt`` writes it. Build it with::

    cmake -S . -B build -DRIL_CUDA_ARCHS=90 && cmake --build build -j

Calls pass raw pointers, sizes and strides plus ``torch.cuda.current_stream().cuda_stream``, so
the kernels run on torch's stream with no synchronisation. A non-zero status becomes a
RuntimeError naming the op, the shapes and the library's error string. It is the fallback where
Triton is absent; its LoRA op is a correctness fallback only (``docs/kernels.md``).
"""

from __future__ import annotations

import ctypes
import re
from pathlib import Path

import torch

from ril_fast.kernels.reference import check_distill_args, pred_code, rank_scale

ABI_VERSION = 1  # must equal RIL_ABI_VERSION in csrc/ril_fast.h
LIB_DIR = Path(__file__).resolve().parent.parent / "_lib"
SUFFIX = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16"}

_P, _I, _F, _C = ctypes.c_void_p, ctypes.c_int64, ctypes.c_float, ctypes.c_int
# Argument types per op (dtype suffix added at load time); the trailing _P is the cudaStream_t.
SIGNATURES = {
    "ril_lora_group_fwd": [_P, _I, _P, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _P],
    "ril_lora_group_bwd": [_P, _I, _P, _P, _P, _P, _P, _P, _I, _I, _I, _I, _I, _P],
    "ril_lora_group_slice_grads": [_P, _I, _P, _I, _P, _P, _I, _I, _I, _I, _I, _I, _P, _P, _P],
    "ril_gemm": [_I, _I, _I, _P, _I, _I, _P, _I, _I, _P, _I, _I, _F, _P, _P, _P],
    "ril_distill_mse_fwd": [_P, _P, _P, _P, _P, _P, _I, _I, _C, _P],
    "ril_distill_mse_bwd": [_P, _P, _P, _P, _P, _P, _I, _I, _C, _P],
}

_cache: dict[str, object] = {}


def reset() -> None:
    """Forget the loaded library (tests; or after building it in-process). Decisions made with it
    live in :func:`ril_fast.kernels.clear_cache`."""
    _cache.clear()


def _candidates() -> list[Path]:
    found = sorted(LIB_DIR.glob("libril_fast_cuda*.so"))
    # Prefer the build for torch's CUDA version (libril_fast_cuda130.so for CUDA 13.0), then the newest.
    tag = "".join((torch.version.cuda or "").split(".")[:2])
    ver = lambda p: int(re.sub(r"\D", "", p.stem.replace("libril_fast_cuda", "")) or 0)  # noqa: E731
    return sorted(found, key=lambda p: (ver(p) == int(tag or -1), ver(p)), reverse=True)


def _open(path: Path):
    """Load one library file and check its ABI; returns (lib, None) or (None, reason)."""
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as exc:
        return None, f"cannot load {path}: {exc}"
    try:
        version = int(lib.ril_abi_version())
    except AttributeError:
        return None, f"{path} has no ril_abi_version(); it is not a ril_fast CUDA library"
    if version != ABI_VERSION:
        return None, (f"{path} has ABI version {version} but this ril_fast needs {ABI_VERSION}; rebuild it with "
                      "`cmake -S . -B build && cmake --build build`")
    lib.ril_status_string.restype = ctypes.c_char_p
    lib.ril_status_string.argtypes = [_C]
    lib.ril_distill_mse_workspace_floats.restype = _I
    lib.ril_distill_mse_workspace_floats.argtypes = [_I, _I]
    for name, argtypes in SIGNATURES.items():
        for suffix in SUFFIX.values():
            try:
                fn = getattr(lib, f"{name}_{suffix}")
            except AttributeError:
                return None, f"{path} lacks {name}_{suffix}; rebuild it from this checkout's csrc/"
            fn.restype, fn.argtypes = _C, argtypes
    return lib, None


def _load():
    if "lib" not in _cache:
        paths = _candidates()
        if not paths:
            _cache["lib"], _cache["reason"] = None, (
                f"no libril_fast_cuda*.so in {LIB_DIR}; build it with "
                "`cmake -S . -B build && cmake --build build` (needs nvcc)")
        else:
            _cache["lib"], _cache["reason"] = _open(paths[0])
    return _cache["lib"], _cache["reason"]


def available() -> tuple[bool, str]:
    """(True, path) when the library loads, matches the ABI and a CUDA sm_80+ device is present."""
    try:
        lib, reason = _load()
    except Exception as exc:  # never let a broken install break dispatch
        return False, f"loading the CUDA library failed: {exc}"
    if lib is None:
        return False, reason
    if not torch.cuda.is_available():
        return False, "torch sees no CUDA device"
    major, minor = torch.cuda.get_device_capability()
    if major < 8:
        return False, f"the CUDA library is built for sm_80+, this device is sm_{major}{minor}"
    return True, f"loaded {lib._name}"


def _lib():
    ok, why = available()
    if not ok:
        raise RuntimeError(f"ril_fast CUDA library unavailable: {why}")
    return _cache["lib"]


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _stream() -> int:
    return torch.cuda.current_stream().cuda_stream


def _call(lib, name: str, dtype: torch.dtype, what: str, *args) -> None:
    fn = getattr(lib, f"{name}_{SUFFIX[dtype]}")
    status = fn(*args, _stream())
    if status != 0:
        msg = lib.ril_status_string(status).decode(errors="replace")
        raise RuntimeError(f"ril_fast CUDA library: {name}_{SUFFIX[dtype]}({what}) failed with status {status}: {msg}")


def _check_tensors(op: str, tensors: dict[str, torch.Tensor | None], dtype: torch.dtype) -> None:
    if dtype not in SUFFIX:
        raise ValueError(f"{op}: the CUDA library supports {tuple(SUFFIX)}, got {dtype}; cast the inputs or use "
                         "RIL_FAST_KERNELS=auto")
    for name, t in tensors.items():
        if t is None:
            continue
        if t.device.type != "cuda":
            raise ValueError(f"{op}: {name} is on {t.device}; the CUDA library needs cuda tensors")


# ------------------------------------------------------------------------------------------------
# Distillation MSE
# ------------------------------------------------------------------------------------------------


def _distill_fwd(student, teacher, alpha, weight, pred: int) -> torch.Tensor:
    """One launch: the last block sums the per-block partials (``ws``) in a fixed order, so the loss is
    bitwise reproducible. Its ticket counter lives in the library, one per (device, stream); the
    ``torch.cuda.device`` guard below makes the library see the tensors' device."""
    _check_tensors("distill_mse", dict(student_out=student, teacher_out=teacher, alpha_bar=alpha, weight=weight),
                   student.dtype)
    if teacher.dtype != student.dtype:
        raise ValueError(f"distill_mse (cuda): teacher_out dtype {teacher.dtype} != student_out dtype "
                         f"{student.dtype}; cast the teacher output")
    lib = _lib()
    bsz = student.shape[0]
    n = student.numel() // bsz
    if bsz > 65535:
        raise ValueError(f"distill_mse (cuda): batch {bsz} > 65535 is unsupported; split the batch")
    with torch.cuda.device(student.device):
        ws = torch.empty(int(lib.ril_distill_mse_workspace_floats(bsz, n)), device=student.device,
                         dtype=torch.float32)
        out = torch.empty((), device=student.device, dtype=torch.float32)
        _call(lib, "ril_distill_mse_fwd", student.dtype, f"B={bsz}, N={n}, pred={pred}", _ptr(student),
              _ptr(teacher), _ptr(alpha), _ptr(weight), _ptr(ws), _ptr(out), bsz, n, pred)
    return out


def _distill_bwd(grad, student, teacher, alpha, weight, pred: int) -> torch.Tensor:
    lib = _lib()
    bsz = student.shape[0]
    n = student.numel() // bsz
    with torch.cuda.device(student.device):
        ds = torch.empty_like(student)
        _call(lib, "ril_distill_mse_bwd", student.dtype, f"B={bsz}, N={n}, pred={pred}", _ptr(grad),
              _ptr(student), _ptr(teacher), _ptr(alpha), _ptr(weight), _ptr(ds), bsz, n, pred)
    return ds


class _DistillFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, student, teacher, alpha, weight, pred):
        ctx.save_for_backward(student, teacher, alpha, weight)
        ctx.pred = pred
        return _distill_fwd(student, teacher, alpha, weight, pred)

    @staticmethod
    def backward(ctx, grad):
        student, teacher, alpha, weight = ctx.saved_tensors
        ds = _distill_bwd(grad.to(torch.float32).contiguous(), student, teacher, alpha, weight, ctx.pred)
        return ds, None, None, None, None  # the teacher is a constant; alpha and weight are not trained


def distill_mse(student_out, teacher_out, x_t, alpha_bar, prediction_type, weight=None) -> torch.Tensor:
    """The public :func:`ril_fast.kernels.distill_mse` run by the CUDA library."""
    check_distill_args(student_out, teacher_out, x_t, alpha_bar, weight, prediction_type)
    alpha = alpha_bar.detach().to(torch.float32).contiguous()
    w = weight.detach().to(torch.float32).contiguous() if weight is not None else None
    return _DistillFunction.apply(student_out.contiguous(), teacher_out.detach().contiguous(), alpha, w,
                                  pred_code(prediction_type))


# ------------------------------------------------------------------------------------------------
# LoRA group linear
# ------------------------------------------------------------------------------------------------


class _LoraGroupFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x2, weight, bias, scales, n, *ab):
        lib = _lib()
        dt, dev = x2.dtype, x2.device
        m, d_in = x2.shape
        d_out = weight.shape[0]
        a_list, b_list = ab[:n], ab[n:]
        ranks = [a.shape[0] for a in a_list]
        r_tot = sum(ranks)
        a_cat = torch.cat([a.to(dt) for a in a_list]).contiguous() if r_tot else None
        b_cat = torch.cat([b.to(dt) for b in b_list], dim=1).contiguous() if r_tot else None
        rank_scale = rank_scale(ranks, scales, dev) if r_tot else None
        s = torch.empty(m, r_tot, device=dev, dtype=dt) if r_tot else None
        y = torch.empty(m, d_out, device=dev, dtype=dt)
        _call(lib, "ril_lora_group_fwd", dt, f"M={m}, d_in={d_in}, d_out={d_out}, R={r_tot}", _ptr(x2), d_in,
              _ptr(weight), _ptr(bias), _ptr(a_cat), _ptr(b_cat), _ptr(rank_scale), _ptr(s), _ptr(y), d_out, m,
              d_in, d_out, r_tot)
        ctx.save_for_backward(x2, weight, a_cat, b_cat, rank_scale, s)
        ctx.ranks, ctx.n = ranks, n
        ctx.ab_dtypes = [t.dtype for t in ab]
        return y

    @staticmethod
    def backward(ctx, gy):
        lib = _lib()
        x2, weight, a_cat, b_cat, rank_scale, s = ctx.saved_tensors
        gy = gy.contiguous()
        dt, dev = x2.dtype, x2.device
        m, d_in = x2.shape
        d_out, r_tot, n = weight.shape[0], sum(ctx.ranks), ctx.n
        needs = ctx.needs_input_grad
        what = f"M={m}, d_in={d_in}, d_out={d_out}, R={r_tot}"
        ds = torch.empty(m, r_tot, device=dev, dtype=dt) if r_tot else None
        dx = torch.empty(m, d_in, device=dev, dtype=dt) if needs[0] else None
        _call(lib, "ril_lora_group_bwd", dt, what, _ptr(gy), d_out, _ptr(weight), _ptr(a_cat), _ptr(b_cat),
              _ptr(rank_scale), _ptr(ds), _ptr(dx), d_in, m, d_in, d_out, r_tot)
        grads_a, grads_b = [None] * n, [None] * n
        off = 0
        for i, r in enumerate(ctx.ranks):
            need_a, need_b = needs[5 + i], needs[5 + n + i]
            if need_a or need_b:
                da = torch.empty(r, d_in, device=dev, dtype=dt) if need_a else None
                db = torch.empty(d_out, r, device=dev, dtype=dt) if need_b else None
                _call(lib, "ril_lora_group_slice_grads", dt, f"{what}, slice=[{off}:{off + r}]", _ptr(gy), d_out,
                      _ptr(x2), d_in, _ptr(s), _ptr(ds), m, d_in, d_out, r_tot, off, r, _ptr(da), _ptr(db))
                grads_a[i] = da.to(ctx.ab_dtypes[i]) if need_a else None
                grads_b[i] = db.to(ctx.ab_dtypes[n + i]) if need_b else None
            off += r
        dw = None
        if needs[1]:  # dW = dY^T X, rarely wanted (the base is frozen in RIL) but cheap to support
            dw = torch.empty(d_out, d_in, device=dev, dtype=dt)
            _call(lib, "ril_gemm", dt, f"dW, {what}", d_out, d_in, m, _ptr(gy), 1, d_out, _ptr(x2), 1, d_in,
                  _ptr(dw), d_in, 1, 1.0, None, None)
        dbias = gy.sum(0) if needs[2] else None
        return dx, dw, dbias, None, None, *grads_a, *grads_b


def lora_group_linear(x, weight, bias, lora_a, lora_b, scales) -> torch.Tensor:
    """``y = x W^T + b + Σ_i s_i (x A_i^T) B_i^T`` on the CUDA library, autograd-capable.

    Same arguments as :func:`ril_fast.kernels.reference.lora_group_linear`. Gradients are computed
    only for the tensors that require them (the trainable adapter, usually); frozen adapters cost
    nothing in backward except their share of dX.

    Raises:
        ValueError: unsupported dtype, mismatched shapes or dtypes, tensors not on CUDA.
        RuntimeError: library unavailable or a kernel launch failed.
    """
    op = "lora_group_linear (cuda)"
    _check_tensors(op, dict(x=x, weight=weight, bias=bias), x.dtype)
    if len(lora_a) != len(lora_b) or len(lora_a) != len(scales):
        raise ValueError(f"{op}: got {len(lora_a)} lora_a, {len(lora_b)} lora_b and {len(scales)} scales; "
                         "pass one of each per adapter")
    d_out, d_in = weight.shape
    if x.shape[-1] != d_in or weight.dtype != x.dtype or (bias is not None and (bias.shape != (d_out,)
                                                                                or bias.dtype != x.dtype)):
        raise ValueError(f"{op}: x {tuple(x.shape)} {x.dtype}, weight {tuple(weight.shape)} {weight.dtype}, bias "
                         f"{None if bias is None else (tuple(bias.shape), bias.dtype)} do not fit "
                         "(x: (..., d_in); weight: (d_out, d_in); bias: (d_out,); one dtype)")
    for i, (a, b) in enumerate(zip(lora_a, lora_b)):
        _check_tensors(op, {f"lora_a[{i}]": a, f"lora_b[{i}]": b}, a.dtype)
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != d_in or b.shape != (d_out, a.shape[0]):
            raise ValueError(f"{op}: adapter {i} has A {tuple(a.shape)} and B {tuple(b.shape)}; need A (r, {d_in}) "
                             f"and B ({d_out}, r)")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, d_in).contiguous()
    with torch.cuda.device(x.device):
        y = _LoraGroupFunction.apply(x2, weight.contiguous(), None if bias is None else bias.contiguous(),
                                     tuple(float(s) for s in scales), len(lora_a), *lora_a, *lora_b)
    return y.reshape(*lead, d_out)
