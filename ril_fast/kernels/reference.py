"""Pure-torch references of every fused op: the CPU path and the test oracle.

Written for clarity, with no fusion. Each takes the same arguments as the public op in
``ril_fast.kernels``. Also the per-rank scale vector both fused backends take (:func:`rank_scale`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


def lora_group_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> torch.Tensor:
    """``y = x W^T + b + Σ_i s_i (x A_i^T) B_i^T``.

    Args:
        x: (..., d_in).
        weight: (d_out, d_in), frozen.
        bias: (d_out,) or None.
        lora_a: list of (r_i, d_in).
        lora_b: list of (d_out, r_i).
        scales: list of floats, one per adapter.
    Returns:
        (..., d_out), dtype of ``x``.
    """
    y = F.linear(x, weight, bias)
    for a, b, s in zip(lora_a, lora_b, scales):
        y = y + s * F.linear(F.linear(x, a.to(x.dtype)), b.to(x.dtype))
    return y


def x0_coefficients(alpha_bar: torch.Tensor, prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample (a_b, c_b) with ``x0 = a_b·x_t + c_b·out`` (DDIM paper eq. 9 and the v-param).

    Args:
        alpha_bar: (B,) cumulative alpha at the timestep of ``x_t``.
        prediction_type: ``epsilon`` | ``v_prediction`` | ``sample``.
    Returns:
        two (B,) float32 tensors.
    """
    ab = alpha_bar.to(torch.float32)
    if prediction_type == "epsilon":
        return ab.rsqrt(), -((1 - ab) / ab).sqrt()
    if prediction_type == "v_prediction":
        return ab.sqrt(), -(1 - ab).sqrt()
    if prediction_type == "sample":
        return torch.zeros_like(ab), torch.ones_like(ab)
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def distill_mse(
    student_out: torch.Tensor,
    teacher_out: torch.Tensor,
    x_t: torch.Tensor,
    alpha_bar: torch.Tensor,
    prediction_type: str,
    weight: torch.Tensor | None = None,
) -> torch.Tensor:
    """``mean_b( w_b · mean_elements((x0_s − x0_t)²) )`` as a float32 scalar.

    ``x0 = a_b·x_t + c_b·out`` for student and teacher; the teacher is treated as a constant.
    Since both share ``x_t``, ``x0_s − x0_t = c_b·(out_s − out_t)``.

    Args:
        student_out, teacher_out, x_t: (B, ...) model outputs and the shared input latent.
        alpha_bar: (B,).
        prediction_type: ``epsilon`` | ``v_prediction`` | ``sample``.
        weight: (B,) per-sample weights, or None for 1.
    """
    a, c = x0_coefficients(alpha_bar, prediction_type)
    view = (-1,) + (1,) * (student_out.dim() - 1)
    x_t32 = x_t.to(torch.float32)
    x0_s = a.view(view) * x_t32 + c.view(view) * student_out.to(torch.float32)
    x0_t = a.view(view) * x_t32 + c.view(view) * teacher_out.detach().to(torch.float32)
    per_sample = (x0_s - x0_t).pow(2).flatten(1).mean(1)
    if weight is not None:
        per_sample = per_sample * weight.to(torch.float32)
    return per_sample.mean()


FUSED_DISTILL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def pred_code(prediction_type: str) -> int:
    """The fused distillation kernels' integer for ``prediction_type`` (its index in PREDICTION_TYPES)."""
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return PREDICTION_TYPES.index(prediction_type)


def check_distill_args(student, teacher, x_t, alpha_bar, weight, prediction_type) -> None:
    """The fused distillation ops' argument checks (Triton and the CUDA library): one-line ValueErrors."""
    pred_code(prediction_type)
    for name, t in (("student_out", student), ("teacher_out", teacher)):
        if t.dtype not in FUSED_DISTILL_DTYPES:
            raise ValueError(f"distill_mse: {name} has dtype {t.dtype}; supported {FUSED_DISTILL_DTYPES}, "
                             "cast it first")
    if teacher.shape != student.shape or x_t.shape != student.shape:
        raise ValueError(f"distill_mse: student_out {tuple(student.shape)}, teacher_out {tuple(teacher.shape)} and "
                         f"x_t {tuple(x_t.shape)} must have the same shape")
    if student.dim() < 1 or student.numel() == 0:
        raise ValueError(f"distill_mse: need a non-empty (B, ...) tensor, got shape {tuple(student.shape)}")
    bsz = student.shape[0]
    for name, t in (("alpha_bar", alpha_bar), ("weight", weight)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor) or t.shape != (bsz,):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"distill_mse: {name} must be a ({bsz},) tensor (one per sample), got {got}")
    for name, t in (("teacher_out", teacher), ("alpha_bar", alpha_bar), ("weight", weight)):
        if t is not None and t.device != student.device:
            raise ValueError(f"distill_mse: {name} is on {t.device} but student_out is on {student.device}; "
                             "move it to the same device")


def lora_group_linear_stacked(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: Sequence[torch.Tensor],
    lora_b: Sequence[torch.Tensor],
    scales: Sequence[float],
) -> torch.Tensor:
    """The same function as :func:`lora_group_linear`, as one LoRA of rank R = Σ r_i.

    ``A_cat`` (R, d_in) and ``B_cat`` (d_out, R) with the scales folded into B: two GEMMs instead
    of 2k, which is the torch path's speed on CPU (k ≥ 2). Tested against the plain reference.
    """
    if len(lora_a) <= 1:
        return lora_group_linear(x, weight, bias, lora_a, lora_b, scales)
    a_cat = torch.cat([a.to(x.dtype) for a in lora_a])  # (R, d_in)
    b_cat = torch.cat([b.to(x.dtype) * s for b, s in zip(lora_b, scales)], dim=1)  # (d_out, R)
    return F.linear(x, weight, bias) + F.linear(F.linear(x, a_cat), b_cat)


_SCALE_CACHE: dict = {}


def rank_scale(ranks: Sequence[int], scales: Sequence[float], device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-rank scale vector of a stacked group (scale ``s_i`` repeated ``r_i`` times), as the fused
    backends take it.

    Cached, so steady-state calls do no host-to-device copy; built on the device by fills, which a
    CUDA graph can capture (a copy from pageable host memory cannot). One built during a capture
    lives in the graph's pool, so it is not cached.
    """
    key = (tuple(ranks), tuple(map(float, scales)), torch.device(device), dtype)
    t = _SCALE_CACHE.get(key)
    if t is None:
        t = torch.empty(sum(ranks), dtype=dtype, device=device)
        off = 0
        for r, s in zip(ranks, scales):
            t[off:off + r].fill_(float(s))
            off += r
        if not (t.is_cuda and torch.cuda.is_current_stream_capturing()):
            _SCALE_CACHE[key] = t
    return t
