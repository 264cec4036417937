"""Fused last-step distillation MSE: Triton kernels, host launchers and the custom ops.

Loss (see :func:`ril_fast.kernels.reference.distill_mse`)::

    L = mean_b( w_b · mean_i (x0_s − x0_t)² ),   x0 = a_b·x_t + c_b·out

Student and teacher share ``x_t``, so ``x0_s − x0_t = c_b·(out_s − out_t)``: the kernels never
read ``x_t`` (3 tensor reads become 2). ``c_b`` is computed on device from ``alpha_bar`` inside
the kernels, so nothing syncs with the host and the whole op is CUDA-graph capturable.

Forward: ONE launch. Every program writes one fp32 partial sum per (sample, block), then draws a
ticket (``atomic_add(counter, 1, sem="acq_rel")``, after its partial store) on an int32 counter; the
program that draws the last ticket (``P - 1`` for ``P`` programs) sums ALL ``P`` partials in a fixed
order (the same ``SUM_BLOCK``-lane loop and ``tl.sum`` tree every run), writes the scalar loss and
resets the counter to 0. The atomics only decide WHICH program sums, never the order of the
additions, so repeated calls are bitwise equal whichever program finishes last. The counter is one
cached int32 per (device, stream) (see :func:`_ticket_counter`): zero when a call starts because
every call leaves it at 0, and separate streams never share one. Backward: one launch that reads
``grad_output`` on device. Both are ``torch.library`` custom ops (``ril_fast::distill_mse_fwd``,
``ril_fast::distill_mse_bwd``) with fake kernels and an autograd registration, so
``torch.compile`` treats them as opaque. The CUDA library's version of the op is
:func:`ril_fast.kernels.cuda_lib.distill_mse`.
"""

from __future__ import annotations

import threading

import torch
import triton
import triton.language as tl

from ril_fast.kernels.reference import check_distill_args, pred_code

# 4096 fp32 elements per program: 32 KB of loads in flight per program, enough to saturate HBM
# with 8 warps while keeping the partial buffer small (1 float per 16 KB of bf16 input).
BLOCK = 4096
NUM_WARPS = 8
# Forward programs reduce up to MAX_FWD_ITERS blocks each, enough to keep the grid at <= FWD_PROGRAMS
# (a few waves on an H100/H200) where the input allows.
FWD_PROGRAMS = 512
MAX_FWD_ITERS = 8
# The last program sums the partials; 1024 lanes cover every realistic partial count in <= a few iterations.
SUM_BLOCK = 1024
# Ticket counters are handed out from zeroed int32 slabs of this many, one counter per (device, stream).
COUNTER_SLAB = 64


# ------------------------------------------------------------------------------------------------
# Kernels
# ------------------------------------------------------------------------------------------------


@triton.jit
def _scale(alpha_ptr, w_ptr, b, PRED, HAS_WEIGHT):
    """w_b·c_b² for x0 = a_b·x_t + c_b·out (PRED 0 = epsilon, 1 = v_prediction, 2 = sample).

    PRED and HAS_WEIGHT are runtime ints (uniform per program: a few scalar instructions), so one
    binary per dtype serves every prediction type and weight mode."""
    ab = tl.load(alpha_ptr + b).to(tl.float32)
    c2 = tl.where(PRED == 0, (1.0 - ab) / ab, tl.where(PRED == 1, 1.0 - ab, 1.0))
    return c2 * tl.load(w_ptr + b, mask=HAS_WEIGHT != 0, other=1.0).to(tl.float32)


@triton.jit(do_not_specialize=["PRED", "HAS_WEIGHT"])
def _distill_fwd_kernel(s_ptr, t_ptr, alpha_ptr, w_ptr, partial_ptr, count_ptr, out_ptr, N, inv_nb, P, PRED,
                        HAS_WEIGHT, BLOCK: tl.constexpr, SUM_BLOCK: tl.constexpr, ITERS: tl.constexpr):
    pid_n = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    # Each program reduces ITERS consecutive blocks, so big inputs draw fewer tickets on the one
    # counter (its atomics serialise) and the last program sums fewer partials.
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for i in tl.static_range(ITERS):
        offs = (pid_n * ITERS + i) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < N
        # Upcast right after the load: the interpreter (and bf16 math in general) needs fp32.
        s = tl.load(s_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
        t = tl.load(t_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
        d = s - t
        acc += d * d
    scale = _scale(alpha_ptr, w_ptr, b, PRED, HAS_WEIGHT) * inv_nb
    tl.store(partial_ptr + b * tl.num_programs(0) + pid_n, tl.sum(acc, axis=0) * scale)
    # The partial store is ordered before the ticket (barrier + release); the last ticket's
    # acquire makes every program's partial visible to the program that drew it.
    tl.debug_barrier()
    ticket = tl.atomic_add(count_ptr, 1, sem="acq_rel")
    if ticket == P - 1:
        # Last program: sum all P partials in a fixed order (bitwise reproducible whoever is last).
        _ordered_sum(partial_ptr, out_ptr, P, SUM_BLOCK)
        tl.store(count_ptr, 0)  # clean for the next call on this stream


@triton.jit
def _ordered_sum(partial_ptr, out_ptr, P, SUM_BLOCK: tl.constexpr):
    """``out = Σ partials`` in one fixed order (SUM_BLOCK-lane loop, then tl.sum's tree)."""
    tot = tl.zeros((SUM_BLOCK,), dtype=tl.float32)
    for start in range(0, P, SUM_BLOCK):
        o = start + tl.arange(0, SUM_BLOCK)
        tot += tl.load(partial_ptr + o, mask=o < P, other=0.0, cache_modifier=".cg")  # L2, never stale L1
    tl.store(out_ptr, tl.sum(tot, axis=0))


@triton.jit(do_not_specialize=["PRED", "HAS_WEIGHT"])
def _distill_bwd_kernel(g_ptr, s_ptr, t_ptr, alpha_ptr, w_ptr, ds_ptr, N, inv_nb, PRED, HAS_WEIGHT,
                        BLOCK: tl.constexpr):
    pid_n = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs = pid_n * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    s = tl.load(s_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    t = tl.load(t_ptr + b * N + offs, mask=mask, other=0.0).to(tl.float32)
    # grad_output is read on device: no .item(), no host sync.
    scale = 2.0 * _scale(alpha_ptr, w_ptr, b, PRED, HAS_WEIGHT) * inv_nb * tl.load(g_ptr).to(tl.float32)
    ds = (s - t) * scale
    tl.store(ds_ptr + b * N + offs, ds.to(ds_ptr.dtype.element_ty), mask=mask)


# ------------------------------------------------------------------------------------------------
# Host launchers (inputs already validated, contiguous, alpha/weight fp32)
# ------------------------------------------------------------------------------------------------


def _block_for(n: int) -> int:
    return min(BLOCK, triton.next_power_of_2(max(n, 16)))


class _Slab:
    """A zeroed int32 buffer whose entries are handed out as ticket counters."""

    def __init__(self, device: torch.device):
        self.next = 0
        self.ready = None
        if device.type == "cuda":
            # Allocated and zeroed on a private stream: a caller's stream may be routed to a CUDA-graph
            # memory pool (torch.compile's cudagraph trees warm up that way), and pool memory must not be
            # cached. Users wait on ``ready`` before their first launch.
            side = torch.cuda.Stream(device=device)
            with torch.cuda.stream(side):
                self.buf = torch.zeros(COUNTER_SLAB, device=device, dtype=torch.int32)
            self.ready = side.record_event()
        else:
            self.buf = torch.zeros(COUNTER_SLAB, device=device, dtype=torch.int32)


_counter_lock = threading.Lock()
_slabs: dict[torch.device, _Slab] = {}
_counters: dict[tuple, torch.Tensor] = {}


def _ticket_counter(device: torch.device) -> torch.Tensor:
    """The forward's int32 ticket counter for the current stream of ``device``; zero when a call starts.

    One counter per (device, stream), cached: every forward leaves its counter at 0, and calls on
    different streams never share a counter, so they may overlap. A counter is a one-element view
    of a slab zeroed once outside any capture. During CUDA-graph capture a stream without a counter
    takes a free slab entry (zero, its fill finished: ``torch.cuda.graph`` synchronizes before
    capturing); if there is no slab with room yet, it gets a fresh ``torch.zeros`` inside the
    capture (a memset node, replayed before every use) that is not cached, because capture-pool
    memory is reused once the graph's tensors are freed. A captured graph keeps its capture stream's
    counter: do not replay it while an eager forward runs on that stream.
    """
    if device.type == "cuda":
        stream = torch.cuda.current_stream(device)
        key = (device, stream.cuda_stream)
    else:
        stream, key = None, (device, 0)
    counter = _counters.get(key)
    if counter is not None:
        return counter
    capturing = stream is not None and torch.cuda.is_current_stream_capturing()
    with _counter_lock:
        counter = _counters.get(key)
        if counter is not None:
            return counter
        slab = _slabs.get(device)
        if slab is None or slab.next == COUNTER_SLAB:
            if capturing:
                return torch.zeros(1, device=device, dtype=torch.int32)
            slab = _slabs[device] = _Slab(device)
        counter = slab.buf[slab.next:slab.next + 1]
        slab.next += 1
        if slab.ready is not None and not capturing:
            stream.wait_event(slab.ready)
        _counters[key] = counter
        return counter


def _iters_for(nblk: int, bsz: int) -> int:
    """Blocks per forward program: the smallest power of two <= MAX_FWD_ITERS that brings the
    program count to FWD_PROGRAMS or fewer."""
    iters = 1
    while iters < MAX_FWD_ITERS and bsz * triton.cdiv(nblk, iters) > FWD_PROGRAMS:
        iters *= 2
    return iters


def _triton_fwd(student, teacher, alpha, weight, pred: int) -> torch.Tensor:
    bsz = student.shape[0]
    n = student.numel() // bsz
    blk = _block_for(n)
    iters = _iters_for(triton.cdiv(n, blk), bsz)
    nblk = triton.cdiv(n, blk * iters)
    partials = torch.empty(bsz * nblk, device=student.device, dtype=torch.float32)
    out = torch.empty((), device=student.device, dtype=torch.float32)
    w = weight if weight is not None else alpha
    _distill_fwd_kernel[(nblk, bsz)](student, teacher, alpha, w, partials, _ticket_counter(student.device), out, n,
                                     1.0 / (n * bsz), bsz * nblk, pred, int(weight is not None), BLOCK=blk,
                                     SUM_BLOCK=SUM_BLOCK, ITERS=iters, num_warps=NUM_WARPS)
    return out


def _triton_bwd(grad, student, teacher, alpha, weight, pred: int) -> torch.Tensor:
    bsz = student.shape[0]
    n = student.numel() // bsz
    blk = _block_for(n)
    ds = torch.empty_like(student)
    w = weight if weight is not None else alpha
    _distill_bwd_kernel[(triton.cdiv(n, blk), bsz)](grad, student, teacher, alpha, w, ds, n, 1.0 / (n * bsz),
                                                    pred, int(weight is not None), BLOCK=blk, num_warps=NUM_WARPS)
    return ds


# ------------------------------------------------------------------------------------------------
# Custom ops + autograd
# ------------------------------------------------------------------------------------------------


@torch.library.custom_op("ril_fast::distill_mse_fwd", mutates_args=())
def distill_mse_fwd(student: torch.Tensor, teacher: torch.Tensor, alpha_bar: torch.Tensor,
                    weight: torch.Tensor | None, prediction_type: str) -> torch.Tensor:
    """Float32 scalar loss. Inputs contiguous (B, ...); alpha_bar/weight fp32 (B,)."""
    return _triton_fwd(student, teacher, alpha_bar, weight, pred_code(prediction_type))


@distill_mse_fwd.register_fake
def _(student, teacher, alpha_bar, weight, prediction_type):
    return student.new_empty((), dtype=torch.float32)


@torch.library.custom_op("ril_fast::distill_mse_bwd", mutates_args=())
def distill_mse_bwd(grad: torch.Tensor, student: torch.Tensor, teacher: torch.Tensor, alpha_bar: torch.Tensor,
                    weight: torch.Tensor | None, prediction_type: str) -> torch.Tensor:
    """d loss / d student, shaped and typed like ``student``."""
    grad = grad.to(torch.float32).contiguous()
    return _triton_bwd(grad, student, teacher, alpha_bar, weight, pred_code(prediction_type))


@distill_mse_bwd.register_fake
def _(grad, student, teacher, alpha_bar, weight, prediction_type):
    return torch.empty_like(student)


def _setup_context(ctx, inputs, output):
    student, teacher, alpha_bar, weight, prediction_type = inputs
    ctx.save_for_backward(student, teacher, alpha_bar, weight)
    ctx.prediction_type = prediction_type


def _backward(ctx, grad):
    student, teacher, alpha_bar, weight = ctx.saved_tensors
    ds = None
    if ctx.needs_input_grad[0]:
        ds = distill_mse_bwd(grad, student, teacher, alpha_bar, weight, ctx.prediction_type)
    # The teacher is a constant; alpha_bar and weight are schedule values, not trained.
    return ds, None, None, None, None


distill_mse_fwd.register_autograd(_backward, setup_context=_setup_context)


def distill_mse(student_out: torch.Tensor, teacher_out: torch.Tensor, x_t: torch.Tensor, alpha_bar: torch.Tensor,
                prediction_type: str, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Fused ``mean_b(w_b · mean((x0_s − x0_t)²))``; differentiable w.r.t. ``student_out`` only.

    Args:
        student_out, teacher_out, x_t: (B, ...) with the same shape; fp32, fp16 or bf16.
        alpha_bar: (B,) device tensor, ᾱ at the timestep of ``x_t``.
        prediction_type: ``epsilon`` | ``v_prediction`` | ``sample``.
        weight: (B,) per-sample weights or None.
    Returns:
        float32 scalar tensor.
    Raises:
        ValueError: bad shapes, dtypes, devices or prediction type.
    """
    check_distill_args(student_out, teacher_out, x_t, alpha_bar, weight, prediction_type)
    alpha = alpha_bar.detach().to(torch.float32).contiguous()
    w = weight.detach().to(torch.float32).contiguous() if weight is not None else None
    return distill_mse_fwd(student_out.contiguous(), teacher_out.detach().contiguous(), alpha, w, prediction_type)
