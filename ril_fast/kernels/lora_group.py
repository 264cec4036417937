"""Fused multi-adapter LoRA linear in Triton: one forward kernel, one backward (three kernels).

Every token passes through all k adapters, so the group is one LoRA of rank ``R = Σ r_i``:
``A_cat`` (R×d_in) and ``B_cat`` (d_out×R) are the concatenated adapters and the per-adapter
scales become a per-rank vector ``rscale`` (R,) applied to ``S = X·A_catᵀ`` in fp32, so B stays
the raw parameter. Rank tiles cover ``R_PAD`` = next power of two ≥ max(16, R); padding is masked.

Forward: one GEMM; the shrink ``S = X·A_catᵀ`` runs inside the base GEMM's K-loop and the expand
``S·diag(rscale)·B_catᵀ`` in its epilogue, so S is held in registers: R ≤ :data:`MAX_R` (a wider
group runs torch's stacked path, logged once). Backward (kernels-research §7.3): one read of dY
gives dS and dB of the trainable slice (:func:`ds_db_launch`); ``dX = dY·W + dS·A_cat`` is one GEMM
with the LoRA term in the epilogue; dA of the trainable slice is a split-K reduction over M. With
torch's deterministic algorithms on, fp32 partials and ordered sums replace the atomics.
Accumulation is fp32 (fp64 for fp64 inputs, which only the interpreter runs).

Where this runs and what it measured: ``docs/kernels.md``.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from typing import Optional

import torch
import triton
import triton.language as tl

from ril_fast.kernels import reference

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_R = 64  # the forward keeps the whole S tile (BM × R_PAD) in registers
RB = 32  # R chunk of the dX epilogue (EPI 1)
_log = logging.getLogger(__name__)

# Fixed tiles, one per role (no autotune: its per-call Python and first-call benchmarking cost more
# than these small GEMMs). The interpreter costs tens of ms per program instance: few, big tiles.
GPU_MAIN = (128, 64, 64, 8, 4, 4)  # BM, BN, BK, GROUP_M, warps, stages
GPU_DSDB = (64, 64, 4, 3)  # BM, BN, warps, stages
MAIN = (64, 64, 64, 4, 4, 1) if INTERPRET else GPU_MAIN
DSDB = (64, 64, 4, 1) if INTERPRET else GPU_DSDB
REDUCE_BLOCKS = (64, 64, 64, 4)  # split-K reductions over M (dA, deterministic dB): BM, BN, BK, warps


# Host-side integer helpers in plain Python: triton.cdiv / next_power_of_2 are constexpr functions
# in Triton 3.7 and cost microseconds per call, a dozen times per layer call.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _pow2(n: int) -> int:
    """Rank tile: the next power of two >= max(n, 16)."""
    return max(16, 1 << (max(int(n), 1) - 1).bit_length())


@triton.jit
def _ld(ptrs, mask, UPCAST: tl.constexpr):
    v = tl.load(ptrs, mask=mask, other=0.0)
    if UPCAST:  # bf16 arithmetic is wrong in the interpreter: compute in fp32 there
        v = v.to(tl.float32)
    return v


@triton.jit
def _mma(a, b, acc, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee", out_dtype=acc.dtype)
    return tl.dot(a, b, acc, out_dtype=acc.dtype)


# Flags that only pick a branch are runtime ints (not specialised) to bound the compile count.
@triton.jit(do_not_specialize=["HAS_BIAS", "CSCALE"])
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, g_ptr, e_ptr, f_ptr, escale_ptr, s_ptr, cscale_ptr,
    M, N, K, R, SPLIT_K, HAS_BIAS, CSCALE,
    s_am, s_ak, s_bk, s_bn, s_cz, s_cm, s_cn, s_gk, s_gr, s_em, s_er, s_fr, s_fn, s_sm, s_sr,
    EPI: tl.constexpr, ATOMIC: tl.constexpr,
    R_PAD: tl.constexpr, RB: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = A·B (+ LoRA epilogue) (·cscale) (+ bias); C is M×N, A is M×K, B is K×N (any strides).

    EPI 1: ``+ E·F`` with E (M×R), F (R×N) in memory (R = 0: plain GEMM; dX's LoRA term).
    EPI 2 (the forward): in-tile shrink ``S = A·G`` (G is K×R) alongside the main K-loop, then
    ``+ (S·diag(escale))·F``; programs with pid_n == 0 store S. SPLIT_K > 1 splits K over
    grid axis 1 into partial outputs (``s_cz`` apart) or fp32 atomics (ATOMIC).
    """
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    group = GROUP_M * num_n
    first_m = (pid // group) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group) % gsize
    pid_n = (pid % group) // gsize

    rm = pid_m * BM + tl.arange(0, BM)
    rn = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, BK)
    mm = rm < M
    mn = rn < N
    acc = tl.zeros((BM, BN), dtype=ACC)
    if EPI == 2:
        rr = tl.arange(0, R_PAD)
        s_acc = tl.zeros((BM, R_PAD), dtype=ACC)
    k_per = tl.cdiv(tl.cdiv(K, SPLIT_K), BK) * BK
    k_lo = pid_k * k_per
    k_hi = tl.minimum(k_lo + k_per, K)
    for k0 in range(k_lo, k_hi, BK):
        kk = k0 + rk
        mk = kk < k_hi
        a = _ld(a_ptr + rm[:, None] * s_am + kk[None, :] * s_ak, mm[:, None] & mk[None, :], UPCAST)
        b = _ld(b_ptr + kk[:, None] * s_bk + rn[None, :] * s_bn, mk[:, None] & mn[None, :], UPCAST)
        acc = _mma(a, b, acc, IEEE)
        if EPI == 2:
            g = _ld(g_ptr + kk[:, None] * s_gk + rr[None, :] * s_gr, mk[:, None] & (rr[None, :] < R), UPCAST)
            s_acc = _mma(a, g, s_acc, IEEE)

    # small epilogue operands first, none behind a branch: their memory round trips overlap
    cs = tl.load(cscale_ptr + rn, mask=mn & (CSCALE != 0), other=1.0).to(ACC)
    bias = tl.load(bias_ptr + rn, mask=mn & (HAS_BIAS != 0), other=0.0).to(ACC)
    if EPI == 2:
        sc = tl.load(escale_ptr + rr, mask=rr < R, other=0.0).to(ACC)
        f = _ld(f_ptr + rr[:, None] * s_fr + rn[None, :] * s_fn, (rr[:, None] < R) & mn[None, :], UPCAST)
        s_q = (s_acc * sc[None, :]).to(f_ptr.dtype.element_ty)  # round S once, as the dot input
        if UPCAST:
            s_q = s_q.to(tl.float32)
        acc = _mma(s_q, f, acc, IEEE)
        if pid_n == 0:
            tl.store(s_ptr + rm[:, None] * s_sm + rr[None, :] * s_sr,
                     s_acc.to(s_ptr.dtype.element_ty), mask=mm[:, None] & (rr[None, :] < R))
    if EPI == 1:
        for r0 in range(0, R, RB):
            rr1 = r0 + tl.arange(0, RB)
            mr = rr1 < R
            e = _ld(e_ptr + rm[:, None] * s_em + rr1[None, :] * s_er, mm[:, None] & mr[None, :], UPCAST)
            f = _ld(f_ptr + rr1[:, None] * s_fr + rn[None, :] * s_fn, mr[:, None] & mn[None, :], UPCAST)
            acc = _mma(e, f, acc, IEEE)
    acc = acc * cs[None, :] + bias[None, :]
    c_ptrs = c_ptr + pid_k * s_cz + rm[:, None] * s_cm + rn[None, :] * s_cn
    if ATOMIC:
        tl.atomic_add(c_ptrs, acc, mask=mm[:, None] & mn[None, :], sem="relaxed")
    else:
        tl.store(c_ptrs, acc.to(c_ptr.dtype.element_ty), mask=mm[:, None] & mn[None, :])


@triton.jit
def _ds_db_kernel(
    dy_ptr, bc_ptr, s_ptr, rscale_ptr, ds_ptr, db_ptr,
    M, N, R, LO, RT,
    s_dym, s_dyn, s_bn, s_br, s_sm, s_sr, s_dsm, s_dsr, s_dbn, s_dbr,
    NEED_DB: tl.constexpr, R_PAD: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """One read of dY per M-tile: ``dS = (dY·B_cat)·diag(rscale)`` for all R columns and, with
    NEED_DB, ``dB[:, LO:LO+RT] += dYᵀ·(S·diag(rscale))[:, LO:LO+RT]`` (fp32 atomics; the
    deterministic mode reduces dB by the split-K GEMM instead). ``bc`` is B_cat zero-padded to
    R_PAD columns (:func:`rank_padded`): its tile loads need no rank mask.

    NEED_DB must stay a constexpr: as a runtime ``if`` around the second dot, Triton's pipeliner
    (num_stages ≥ 2) issued the prefetch of tile n+2 into the dY shared-memory slot before the
    branch read ``trans(dy)`` from it, so dB summed the wrong tiles on GPU while the interpreter,
    which does not pipeline, was right."""
    pid_m = tl.program_id(0)
    rm = pid_m * BM + tl.arange(0, BM)
    mm = rm < M
    rr = tl.arange(0, R_PAD)
    mr = rr < R
    ds = tl.zeros((BM, R_PAD), dtype=ACC)
    rt = tl.arange(0, R_PAD)
    mt = rt < RT
    st = _ld(s_ptr + rm[:, None] * s_sm + (LO + rt)[None, :] * s_sr, mm[:, None] & mt[None, :], UPCAST)
    sct = tl.load(rscale_ptr + LO + rt, mask=mt, other=0.0).to(ACC)
    st = (st.to(ACC) * sct[None, :]).to(s_ptr.dtype.element_ty)
    if UPCAST:
        st = st.to(tl.float32)
    for n0 in range(0, N, BN):
        rn = n0 + tl.arange(0, BN)
        mn = rn < N
        dy = _ld(dy_ptr + rm[:, None] * s_dym + rn[None, :] * s_dyn, mm[:, None] & mn[None, :], UPCAST)
        bt = _ld(bc_ptr + rn[:, None] * s_bn + rr[None, :] * s_br, mn[:, None], UPCAST)
        if NEED_DB:  # first: its result is needed at once, and the wait for it leaves dS's dot running
            part = _mma(tl.trans(dy), st, tl.zeros((BN, R_PAD), dtype=ACC), IEEE)
        ds = _mma(dy, bt, ds, IEEE)
        if NEED_DB:
            tl.atomic_add(db_ptr + rn[:, None] * s_dbn + rt[None, :] * s_dbr, part, mask=mn[:, None] & mt[None, :],
                          sem="relaxed")  # consumed after the kernel: no ordering needed
    sc = tl.load(rscale_ptr + rr, mask=mr, other=0.0).to(ACC)
    ds = ds * sc[None, :]
    tl.store(ds_ptr + rm[:, None] * s_dsm + rr[None, :] * s_dsr, ds.to(ds_ptr.dtype.element_ty),
             mask=mm[:, None] & mr[None, :])


# ----------------------------------------------------------------------------------------------
# host side


_FLAGS: dict = {}


def _flags(dtype: torch.dtype) -> dict:
    """Dtype constexprs of the kernels (built once per dtype)."""
    flags = _FLAGS.get(dtype)
    if flags is None:
        if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
            raise ValueError(f"lora_group_linear supports float16/bfloat16/float32/float64 inputs, got {dtype}; "
                             "cast x first")
        flags = _FLAGS[dtype] = {"UPCAST": INTERPRET and dtype == torch.bfloat16,
                                 "IEEE": dtype in (torch.float32, torch.float64),
                                 "ACC": tl.float64 if dtype == torch.float64 else tl.float32}
    return flags


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the reduction buffers (dA, dB, split partials) and of the rank scales: fp32, or fp64
    for fp64 inputs, so an fp64 run (gradcheck, the exact reference tests) rounds nothing to fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def deterministic() -> bool:
    return torch.are_deterministic_algorithms_enabled()


def _as(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``t.to(dt)`` without the dispatcher round trip when it is already ``dt`` (a few µs per call)."""
    return t if t.dtype == dt else t.to(dt)


def rank_padded(t: torch.Tensor, r_pad: int) -> torch.Tensor:
    """``t`` (n, r) as a row-contiguous (n, r_pad) tensor, zero past column r (``t`` itself when it
    already is one). With R = 4 or 20 the rows of B_cat are not 16-byte aligned and a rank mask
    splits them into 2-byte gathers the pipeliner cannot prefetch; the zero columns add nothing."""
    if t.shape[1] == r_pad and t.stride(1) == 1 and (t.stride(0) == r_pad or t.shape[0] == 1):
        return t
    return torch.nn.functional.pad(t, (0, r_pad - t.shape[1])).contiguous()


def _gemm(a, b, c, *, M, N, K, bias=None, g=None, e=None, f=None, escale=None, s=None, cscale=None,
          epi=1, r=0, split_k=1, atomic=False, blocks=None, sa=None, sb=None, sc=None, se=None, sf=None, sg=None):
    """Launch ``_gemm_kernel``; ``sa``.. are (row, col) strides of the logical operands; ``blocks``:
    (BM, BN, BK, warps) of a reduction, else the :data:`MAIN` tiles."""
    dummy = c
    args = (a, b, c, bias if bias is not None else dummy, g if g is not None else dummy,
            e if e is not None else dummy, f if f is not None else dummy,
            escale if escale is not None else dummy, s if s is not None else dummy,
            cscale if cscale is not None else dummy, M, N, K, r, split_k,
            int(bias is not None), int(cscale is not None),
            *(sa or a.stride()), *(sb or b.stride()), *(sc or (c.stride() if c.dim() == 3 else (0, *c.stride()))),
            *(sg or (0, 0)), *(se or (0, 0)), *(sf or (0, 0)), *(s.stride() if s is not None else (0, 0)))
    if blocks is None:
        bm, bn, bk, gm, warps, stages = MAIN
    else:
        (bm, bn, bk, warps), gm, stages = blocks, 1, 1 if INTERPRET else 3
    # R_PAD only shapes EPI 2's register tile; EPI 1 walks R in RB-wide chunks
    _gemm_kernel[(_cdiv(M, bm) * _cdiv(N, bn), split_k)](
        *args, EPI=epi, ATOMIC=bool(atomic), R_PAD=_pow2(r) if epi == 2 else 16, RB=RB, **_flags(a.dtype),
        BM=bm, BN=bn, BK=bk, GROUP_M=gm, num_warps=warps, num_stages=stages)


def _split_for(M: int, tiles: int) -> int:
    if INTERPRET:
        return 1 if M <= 128 else 2
    return max(1, min(64, _cdiv(264, max(tiles, 1)), _cdiv(M, 256)))


# ----------------------------------------------------------------------------------------------
# launchers: plain functions the autograd Function calls directly (a custom-op dispatch costs
# tens of µs, more than these GEMMs); the custom ops below wrap them for torch.compile.


def fwd_launch(x, weight, bias, a_cat, b_cat, rscale):
    """x (M, d_in) -> (y (M, d_out), S = x·A_catᵀ (M, R)): the base GEMM with the shrink in its
    K-loop and the expand in its epilogue."""
    M, K = x.shape
    N, R = weight.shape[0], a_cat.shape[0]
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    s = torch.empty(M, R, device=x.device, dtype=x.dtype)
    _gemm(x, weight, y, M=M, N=N, K=K, bias=bias, g=a_cat, f=b_cat, escale=rscale, s=s, epi=2, r=R,
          sb=(weight.stride(1), weight.stride(0)), sg=(a_cat.stride(1), a_cat.stride(0)),
          sf=(b_cat.stride(1), b_cat.stride(0)))
    return y, s


def ds_db_launch(dy, b_cat, s, rscale, lo, hi, deterministic):
    """dS = (dY·B_cat)·diag(rscale) (M, R) in dY's dtype; dB of columns [lo, hi) in fp32 (d_out, hi-lo)."""
    M, N = dy.shape
    R, rt = b_cat.shape[1], hi - lo
    acc = _acc_dtype(dy.dtype)
    ds = torch.empty(M, R, device=dy.device, dtype=dy.dtype)
    b_full = rank_padded(b_cat, _pow2(R))
    fused_db = rt > 0 and not deterministic
    db = torch.zeros(N, rt, device=dy.device, dtype=acc) if fused_db else None
    bm, bn, warps, stages = DSDB
    _ds_db_kernel[(_cdiv(M, bm),)](
        dy, b_full, s, rscale, ds, db if fused_db else ds, M, N, R, lo, rt, *dy.stride(), *b_full.stride(),
        *s.stride(), *ds.stride(), *(db.stride() if fused_db else (0, 0)), NEED_DB=fused_db, R_PAD=_pow2(R),
        **_flags(dy.dtype), BM=bm, BN=bn, num_warps=warps, num_stages=stages)
    if rt > 0 and not fused_db:  # deterministic dB = dYᵀ·(S·diag(rscale)): split-K over M, ordered sum
        split = _split_for(M, _cdiv(N, REDUCE_BLOCKS[0]) * _cdiv(rt, REDUCE_BLOCKS[1]))
        part = torch.empty(split, N, rt, device=dy.device, dtype=acc)
        s_t, st_strides = _rank_slice(s, lo, hi)
        _gemm(dy, s_t, part, M=N, N=rt, K=M, cscale=rscale[lo:hi], split_k=split, blocks=REDUCE_BLOCKS,
              sa=(dy.stride(1), dy.stride(0)), sb=st_strides)
        db = part.sum(0) if split > 1 else part[0]
    if db is None:
        db = torch.zeros(N, 0, device=dy.device, dtype=acc)
    return ds, db


def dx_launch(dy, weight, ds, a_cat):
    """dX = dY·W + dS·A_cat (M, d_in); the LoRA term is the GEMM's epilogue."""
    M, N = dy.shape
    K, R = weight.shape[1], a_cat.shape[0]
    dx = torch.empty(M, K, device=dy.device, dtype=dy.dtype)
    _gemm(dy, weight, dx, M=M, N=K, K=N, e=ds, f=a_cat, epi=1, r=R, se=ds.stride(), sf=a_cat.stride())
    return dx


def _rank_slice(t, lo, hi):
    """``t[:, lo:hi]`` (M×rt: S or dS) as an operand of a reduction over M: (tensor, (stride over
    M, stride over rank)). Where the rank axis is not whole 16-element runs (R = 4, a slice at rank
    4) and M is a multiple of 16, a transposed copy (rt, M), contiguous along the reduction axis, so
    the K-loop loads vectorise and the pipeliner can prefetch them (one copy of M·rt elements)."""
    sl = t[:, lo:hi]
    whole_runs = sl.stride(1) == 1 and sl.stride(0) % 16 == 0 and (hi - lo) % 16 == 0 and sl.data_ptr() % 16 == 0
    if whole_runs or t.shape[0] % 16:
        return sl, (sl.stride(0), sl.stride(1))
    buf = sl.t().contiguous()
    return buf, (1, buf.stride(0))


def da_launch(ds, x, lo, hi, deterministic, da=None):
    """dA of rank rows [lo, hi): dS[:, lo:hi]ᵀ·X (hi-lo, d_in) in fp32, split-K over M.

    ``da``: optional zeroed fp32 (hi-lo, d_in) buffer (the atomics path writes into it)."""
    M, K = x.shape
    rt = hi - lo
    split = _split_for(M, _cdiv(rt, REDUCE_BLOCKS[0]) * _cdiv(K, REDUCE_BLOCKS[1]))
    ds_t, (s_m, s_r) = _rank_slice(ds, lo, hi)
    if deterministic or split == 1:
        out = da if da is not None and split == 1 else torch.empty(split, rt, K, device=x.device,
                                                                   dtype=_acc_dtype(x.dtype))
        _gemm(ds_t, x, out, M=rt, N=K, K=M, split_k=split, blocks=REDUCE_BLOCKS, sa=(s_r, s_m),
              sc=(0, *out.stride()) if out.dim() == 2 else None)
        red = out if out.dim() == 2 else (out.sum(0) if split > 1 else out[0])
        if da is None:
            return red
        return red if red is da else da.copy_(red)
    if da is None:
        da = torch.zeros(rt, K, device=x.device, dtype=_acc_dtype(x.dtype))
    _gemm(ds_t, x, da, M=rt, N=K, K=M, split_k=split, atomic=True, blocks=REDUCE_BLOCKS, sa=(s_r, s_m),
          sc=(0, *da.stride()))
    return da


# Custom ops: the launchers as torch.compile sees them (opaque, with fake implementations).
@torch.library.custom_op("ril_fast::lora_group_fwd", mutates_args=())
def lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], a_cat: torch.Tensor,
             b_cat: torch.Tensor, rscale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom-op form of :func:`fwd_launch`."""
    return fwd_launch(x, weight, bias, a_cat, b_cat, rscale)


@lora_fwd.register_fake
def _(x, weight, bias, a_cat, b_cat, rscale):
    return x.new_empty(x.shape[0], weight.shape[0]), x.new_empty(x.shape[0], a_cat.shape[0])


@torch.library.custom_op("ril_fast::lora_group_bwd_ds_db", mutates_args=())
def lora_bwd_ds_db(dy: torch.Tensor, b_cat: torch.Tensor, s: torch.Tensor, rscale: torch.Tensor, lo: int, hi: int,
                   deterministic: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom-op form of :func:`ds_db_launch`."""
    return ds_db_launch(dy, b_cat, s, rscale, lo, hi, deterministic)


@lora_bwd_ds_db.register_fake
def _(dy, b_cat, s, rscale, lo, hi, deterministic):
    return dy.new_empty(dy.shape[0], b_cat.shape[1]), dy.new_empty(dy.shape[1], hi - lo, dtype=_acc_dtype(dy.dtype))


@torch.library.custom_op("ril_fast::lora_group_bwd_dx", mutates_args=())
def lora_bwd_dx(dy: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor, a_cat: torch.Tensor) -> torch.Tensor:
    """Custom-op form of :func:`dx_launch`."""
    return dx_launch(dy, weight, ds, a_cat)


@lora_bwd_dx.register_fake
def _(dy, weight, ds, a_cat):
    return dy.new_empty(dy.shape[0], weight.shape[1])


@torch.library.custom_op("ril_fast::lora_group_bwd_da", mutates_args=())
def lora_bwd_da(ds: torch.Tensor, x: torch.Tensor, lo: int, hi: int, deterministic: bool) -> torch.Tensor:
    """Custom-op form of :func:`da_launch`."""
    return da_launch(ds, x, lo, hi, deterministic)


@lora_bwd_da.register_fake
def _(ds, x, lo, hi, deterministic):
    return x.new_empty(hi - lo, x.shape[1], dtype=_acc_dtype(x.dtype))


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _stacked(a_list, b_list, dt):
    """(A_cat, B_cat) in ``dt``: concatenated, then cast once (two kernels, not one cast per adapter).
    Fresh every call: K forwards before one backward each save their own stacks."""
    if len(a_list) == 1:
        return _as(a_list[0], dt), _as(b_list[0], dt)
    return _as(torch.cat(list(a_list)), dt), _as(torch.cat(list(b_list), dim=1), dt)


def _forward(x, weight, bias, rscale, a_list, b_list):
    """(x2, a_cat, b_cat, y (M, d_out), S): the forward launch shared by the autograd Function and
    the no-grad path."""
    dt = x.dtype
    x2 = x.reshape(-1, x.shape[-1])
    a_cat, b_cat = _stacked(a_list, b_list, dt)
    args = (x2, _as(weight, dt), None if bias is None else _as(bias, dt), a_cat, b_cat, rscale)
    y, s = lora_fwd(*args) if _compiling() else fwd_launch(*args)
    return x2, a_cat, b_cat, y, s


class _LoraGroupFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rscale, ranks, *ab):
        k = len(ranks)
        x2, a_cat, b_cat, y, s = _forward(x, weight, bias, rscale, ab[:k], ab[k:])
        ctx.save_for_backward(x2, weight, a_cat, b_cat, s, rscale)
        ctx.ranks, ctx.x_shape = ranks, x.shape
        ctx.dtypes = [t.dtype for t in (weight, bias) if t is not None] + [t.dtype for t in ab]
        return y.reshape(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, gy):
        x2, weight, a_cat, b_cat, s, rscale = ctx.saved_tensors
        ranks, k, need = ctx.ranks, len(ctx.ranks), ctx.needs_input_grad
        offs = [sum(ranks[:i]) for i in range(k + 1)]
        train = [i for i in range(k) if need[5 + i] or need[5 + k + i]]
        lo, hi = (offs[min(train)], offs[max(train) + 1]) if train else (0, 0)
        det, ops = deterministic(), _compiling()
        acc = _acc_dtype(x2.dtype)
        dy = _as(gy.reshape(-1, gy.shape[-1]), x2.dtype).contiguous()
        w = _as(weight, x2.dtype)
        gx = gw = gb = None
        grads_a, grads_b = [None] * k, [None] * k
        if need[0] or train:
            need_a = any(need[5 + i] for i in train)
            need_b = any(need[5 + k + i] for i in train)
            h_b = hi if need_b else lo
            ds, db = lora_bwd_ds_db(dy, b_cat, s, rscale, lo, h_b, det) if ops else ds_db_launch(
                dy, b_cat, s, rscale, lo, h_b, det)
            if need[0]:
                gx = (lora_bwd_dx(dy, w, ds, a_cat) if ops else dx_launch(dy, w, ds, a_cat)).reshape(ctx.x_shape)
            da = (lora_bwd_da(ds, x2, lo, hi, det) if ops else da_launch(ds, x2, lo, hi, det)) if need_a else None
            for i in train:
                sl = slice(offs[i] - lo, offs[i + 1] - lo)
                if need[5 + i]:
                    grads_a[i] = _as(da[sl], ctx.dtypes[-2 * k + i])
                if need[5 + k + i]:
                    grads_b[i] = _as(db[:, sl], ctx.dtypes[-k + i])
        if need[1]:  # W is frozen by contract; a trainable W still gets its exact gradient
            gw = (dy.t().to(acc) @ x2.to(acc)).to(weight.dtype)
        if need[2]:
            gb = dy.to(acc).sum(0).to(ctx.dtypes[1])
        return (gx, gw, gb, None, None, *grads_a, *grads_b)


_logged: set = set()


def lora_group_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor],
                      scales: Sequence[float]) -> torch.Tensor:
    """``y = x Wᵀ + b + Σ_i s_i (x A_iᵀ) B_iᵀ``; see :func:`ril_fast.kernels.lora_group_linear`.

    Launches: forward = one GEMM (plus two concatenations for k > 1); backward = dS/dB, dX and dA
    kernels plus their fp32 buffers' memsets and casts. Groups wider than :data:`MAX_R`, and on a
    GPU fp32 / fp64 inputs, run torch's stacked path (the interpreter runs every dtype: the tests'
    fp32 and fp64 checks).
    """
    k = len(lora_a)
    if k == 0 or len(lora_b) != k or len(scales) != k:
        raise ValueError(f"need k >= 1 adapters with matching lists, got {k} A, {len(lora_b)} B, {len(scales)} scales")
    d_out, d_in = weight.shape
    ranks = []
    for a, b in zip(lora_a, lora_b):
        sa, sb = a.shape, b.shape  # one Size each: every .shape / .dim() call is a dispatcher trip
        if len(sa) != 2 or len(sb) != 2 or sa[1] != d_in or sb[0] != d_out or sa[0] != sb[1]:
            raise ValueError(f"adapter shapes A {tuple(sa)}, B {tuple(sb)} do not fit W "
                             f"{tuple(weight.shape)}; A must be (r, d_in) and B (d_out, r)")
        ranks.append(sa[0])
    if x.shape[-1] != d_in:
        raise ValueError(f"x has last dim {x.shape[-1]} but W expects d_in={d_in}")
    why = (f"rank {sum(ranks)} > {MAX_R} (the forward holds S in registers)" if sum(ranks) > MAX_R
           else None if INTERPRET or x.dtype in (torch.float16, torch.bfloat16)
           else f"{x.dtype} (on a GPU the kernels take 16-bit I/O: fp32 tiles overflow shared memory below sm_90)")
    if why:
        if why not in _logged:
            _logged.add(why)
            _log.info("LoRA group, %s: torch's stacked path", why)
        return reference.lora_group_linear_stacked(x, weight, bias, lora_a, lora_b, scales)
    ranks = tuple(ranks)
    rscale = reference.rank_scale(ranks, scales, x.device, _acc_dtype(x.dtype))
    if not torch.is_grad_enabled():
        # No graph will be recorded (sampling steps, the EMA teacher): skip the autograd Function
        # and its saved tensors.
        y = _forward(x, weight, bias, rscale, lora_a, lora_b)[3]
        return y.reshape(*x.shape[:-1], d_out)
    return _LoraGroupFn.apply(x, weight, bias, rscale, ranks, *lora_a, *lora_b)


def gpu_launch_cases(dtype: str = "bf16") -> dict:
    """Every kernel configuration the GPU path may launch for one 16-bit I/O dtype, by role: (kernel,
    pointer dtypes (unnamed pointers take ``dtype``), constexprs, num_warps, num_stages). What the
    AOT compile gate builds."""
    base = dict(UPCAST=False, IEEE=False, ACC=tl.float32)
    f32s = {"escale_ptr": "fp32", "cscale_ptr": "fp32"}
    bm, bn, bk, gm, warps, stages = GPU_MAIN
    main = dict(RB=RB, ATOMIC=False, BM=bm, BN=bn, BK=bk, GROUP_M=gm, R_PAD=16, **base)
    cases = {"dx": (_gemm_kernel, f32s, dict(main, EPI=1), warps, stages)}
    for r_pad in (16, 32, 64):
        cases[f"fwd-r{r_pad}"] = (_gemm_kernel, f32s, dict(main, EPI=2, R_PAD=r_pad), warps, stages)
    bm, bn, bk, w = REDUCE_BLOCKS  # dA, deterministic dB: fp32 partials or atomics
    for atomic in (False, True):
        cases["reduce-atomic" if atomic else "reduce"] = (
            _gemm_kernel, {**f32s, "c_ptr": "fp32"}, dict(main, EPI=1, ATOMIC=atomic, BM=bm, BN=bn, BK=bk, GROUP_M=1),
            w, 3)
    bm, bn, warps, stages = GPU_DSDB
    for need_db in (True, False):
        for r_pad in (16, 32, 64):
            cases[f"dsdb{'-db' if need_db else ''}-r{r_pad}"] = (
                _ds_db_kernel, {"rscale_ptr": "fp32", "db_ptr": "fp32"},
                dict(R_PAD=r_pad, NEED_DB=need_db, BM=bm, BN=bn, **base), warps, stages)
    return cases
