"""Fused multi-adapter LoRA linear in Triton (forward + backward).

Every token passes through all k adapters, so the group is one LoRA of rank ``R = Σ r_i``:
``A_cat`` (R×d_in) and ``B_cat`` (d_out×R) are the concatenated adapters and the per-adapter
scales become a per-rank vector ``rscale`` (R,) applied to ``S = X·A_catᵀ`` in fp32, so B stays
the raw parameter. Tiles cover ``R_PAD`` = next power of two ≥ max(16, R); padding is masked.

Forward: F1 ("fused", narrow layers) runs the shrink inside the base GEMM's K-loop and the
expand in its epilogue; F2 ("split", wide layers or R > 64) computes S first, then the base
GEMM with ``S·B_catᵀ`` in the epilogue. Backward (kernels-research §7.3): one read of dY gives
dS and dB of the trainable slice; ``dX = dY·W + dS·A_cat`` is one GEMM with the LoRA term in
the epilogue; dA of the trainable slice is a split-K reduction over M. On sm_90+ the
persistent TMA kernel (:mod:`lora_tma`) can also run dS, dB and dX as one GEMM ("fused"), and
reduce dA in that GEMM's epilogue too ("fused_da": the whole backward in one launch). Deterministic mode
(``RIL_FAST_DETERMINISTIC=1`` or torch deterministic algorithms) uses fp32 partials and an
ordered sum instead of atomics. Accumulation is fp32 (fp64 for fp64 inputs).

Which implementation runs each GEMM-sized part is a per-GPU, per-shape choice
(:mod:`ril_fast.kernels.lora_tuning`): the forward may instead be cuBLAS (base GEMM + bias, then
one ``addmm_`` adding the LoRA term) and the backward cuBLAS GEMMs (:func:`backward_cublas`,
fp32-output dA/dB of the trainable slice only). The tuning table also picks the Triton tile
config from :data:`GEMM_CANDIDATES`; untuned GPUs run the Triton forward and the cuBLAS backward
(see :func:`forward_mode`, :func:`backward_plan` for the measurements behind that).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional

import torch
import triton
import triton.language as tl

from ril_fast.kernels import lora_tma, lora_tuning

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
MAX_FUSED_R = 64  # F1 keeps the whole S tile in registers
MAX_DSDB_R = 128  # the dS/dB kernel keeps the whole dS row tile in registers
RB = 32  # R chunk of the EPI 1 epilogue (any R, one compiled variant)

# Fixed tiles picked by shape (no autotune: its per-call Python and first-call benchmarking cost
# more than these small GEMMs). (BM, BN, BK, GROUP_M, num_warps, num_stages).
_GPU_MAIN = [(128, 64, 64, 8, 4, 4), (128, 128, 64, 8, 8, 3)]
# Every tile config a tuning table (lora_tuning, benchmarks/tune_lora.py) may pick for the main
# GEMM; the compile gate builds all of them.
GEMM_CANDIDATES = _GPU_MAIN + [(64, 64, 64, 8, 4, 4), (64, 128, 64, 8, 4, 4), (128, 256, 64, 8, 8, 3)]
FWD_CODES = {"cublas": 0, "split": 1, "fused": 2}
_GPU_DSDB = (64, 64, 4, 3)  # (BM, BN, num_warps, num_stages)
# The interpreter costs tens of ms per program instance: few, big tiles.
_INTERP_MAIN = (64, 64, 64, 4, 4, 1)
_INTERP_DSDB = (64, 64, 4, 1)
DSDB_CFG = _INTERP_DSDB if INTERPRET else _GPU_DSDB


def main_config(N: int) -> tuple:
    """Tiles of the main GEMM: 128-wide N tiles only where N is wide enough to fill them."""
    if INTERPRET:
        return _INTERP_MAIN
    return _GPU_MAIN[1] if N >= 1024 else _GPU_MAIN[0]


# Host-side integer helpers in plain Python: triton.cdiv / next_power_of_2 are constexpr functions
# in Triton 3.7 and cost microseconds per call, a dozen times per layer call.
def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_pow2 = lora_tma._pow2  # rank tile: next power of two >= max(n, 16)


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
@triton.jit(do_not_specialize=["HAS_BIAS", "ESCALE", "CSCALE"])
def _gemm_kernel(
    a_ptr, b_ptr, c_ptr, bias_ptr, g_ptr, e_ptr, f_ptr, escale_ptr, s_ptr, cscale_ptr,
    M, N, K, R, SPLIT_K, HAS_BIAS, ESCALE, CSCALE,
    s_am, s_ak, s_bk, s_bn, s_cz, s_cm, s_cn, s_gk, s_gr, s_em, s_er, s_fr, s_fn, s_sm, s_sr,
    EPI: tl.constexpr, ATOMIC: tl.constexpr,
    R_PAD: tl.constexpr, RB: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = A·B (+ LoRA epilogue) (+ bias), C is M×N, A is M×K, B is K×N (any strides).

    EPI 1: ``+ (E·diag(escale))·F`` with E (M×R), F (R×N) in memory (R = 0: plain GEMM).
    EPI 2: in-tile shrink ``S = A·G`` (G is K×R) alongside the main K-loop, then
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

    # small epilogue operands first, none behind a branch: their round trips overlap (lora_tma)
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
            sc1 = tl.load(escale_ptr + rr1, mask=mr & (ESCALE != 0), other=1.0)  # predicated, not a branch
            e = (e.to(ACC) * sc1[None, :].to(ACC)).to(f_ptr.dtype.element_ty)
            if UPCAST:
                e = e.to(tl.float32)
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
    M, N, R, LO, RT, N_PER,
    s_dym, s_dyn, s_bn, s_br, s_sm, s_sr, s_dsz, s_dsm, s_dsr, s_dbn, s_dbr,
    NEED_DB: tl.constexpr, DS_ATOMIC: tl.constexpr, R_PAD: tl.constexpr, DY_TWICE: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr, ACC: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """One read of dY per (M-tile, N-range): ``dS = (dY·B_cat)·diag(rscale)`` for all R columns
    and ``dB[:, LO:LO+RT] += dYᵀ·(S·diag(rscale))[:, LO:LO+RT]`` (fp32 atomics).

    Grid axis 1 splits N into ranges of N_PER columns so small-M layers still fill the GPU (at
    M = 2048 the M-tiles alone are 32 programs). One range stores dS in its dtype; several either
    add into a zeroed fp32 dS (DS_ATOMIC) or store fp32 partials ``s_dsz`` apart, which the
    deterministic mode sums in order. DS_ATOMIC is a constexpr so atomics are only ever compiled
    for fp32 (bf16 atomics need sm_90). ``bc`` is B_cat zero-padded to R_PAD columns
    (``lora_tma.rank_padded``): its tile loads need no rank mask, so they vectorise and the
    pipeliner prefetches them at any R (at R = 4 or 20 the masked loads were synchronous).

    NEED_DB must stay a constexpr: as a runtime ``if`` around the second dot, Triton's
    pipeliner (num_stages ≥ 2) issued the prefetch of tile n+2 into the dY shared-memory slot
    before the branch read ``trans(dy)`` from it, so dB summed the wrong (often zero) tiles on
    GPU while the interpreter, which does not pipeline, was right.

    DY_TWICE (sm_8x and sm_12x, :func:`needs_dy_twice`): dB's dot reads its own, transposed, load of
    the dY tile. There (``mma.sync``, register operands) the two dots want dY in two register
    layouts and the pipeliner left the single load synchronous in every K-step (launch gate, sm_86
    and sm_120); the second load hits L1/L2. On sm_90 one shared-memory copy feeds both wgmmas."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    n_lo = pid_n * N_PER
    n_hi = tl.minimum(n_lo + N_PER, N)
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
    for n0 in range(n_lo, n_hi, BN):
        rn = n0 + tl.arange(0, BN)
        mn = rn < n_hi
        dy = _ld(dy_ptr + rm[:, None] * s_dym + rn[None, :] * s_dyn, mm[:, None] & mn[None, :], UPCAST)
        bt = _ld(bc_ptr + rn[:, None] * s_bn + rr[None, :] * s_br, mn[:, None], UPCAST)
        if NEED_DB:  # first: its result is needed at once, and the wait for it then leaves dS's dot running
            if DY_TWICE:
                dyt = _ld(dy_ptr + rn[:, None] * s_dyn + rm[None, :] * s_dym, mn[:, None] & mm[None, :], UPCAST)
            else:
                dyt = tl.trans(dy)
            part = _mma(dyt, st, tl.zeros((BN, R_PAD), dtype=ACC), IEEE)
        ds = _mma(dy, bt, ds, IEEE)
        if NEED_DB:
            tl.atomic_add(db_ptr + rn[:, None] * s_dbn + rt[None, :] * s_dbr, part, mask=mn[:, None] & mt[None, :],
                          sem="relaxed")  # consumed after the kernel: no ordering needed, no fences
    sc = tl.load(rscale_ptr + rr, mask=mr, other=0.0).to(ACC)
    ds = ds * sc[None, :]
    ds_ptrs = ds_ptr + rm[:, None] * s_dsm + rr[None, :] * s_dsr
    if DS_ATOMIC:
        tl.atomic_add(ds_ptrs, ds, mask=mm[:, None] & mr[None, :], sem="relaxed")
    else:
        tl.store(ds_ptrs + pid_n * s_dsz, ds.to(ds_ptr.dtype.element_ty), mask=mm[:, None] & mr[None, :])


# ----------------------------------------------------------------------------------------------
# host side


_FLAGS: dict = {}


def _flags(dtype: torch.dtype) -> dict:
    """Dtype constexprs of the kernels (cached: built once per dtype)."""
    flags = _FLAGS.get(dtype)
    if flags is None:
        flags = _FLAGS[dtype] = _dtype_flags(dtype)
    return flags


def _dtype_flags(dtype: torch.dtype) -> dict:
    if dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        raise ValueError(f"lora_group_linear supports float16/bfloat16/float32/float64 inputs, got {dtype}; "
                         "cast x first")
    if dtype == torch.float64 and not INTERPRET:  # (RIL_FAST_KERNELS=auto sends fp64 to torch on a GPU)
        raise ValueError("the Triton LoRA kernels take float16/bfloat16/float32 on a GPU (compile-gated for "
                         "those); float64 runs only in the interpreter. Cast x, or set RIL_FAST_KERNELS=auto "
                         "(fp64 then runs torch's exact path)")
    return {
        "UPCAST": INTERPRET and dtype == torch.bfloat16,
        "IEEE": dtype in (torch.float32, torch.float64),
        "ACC": tl.float64 if dtype == torch.float64 else tl.float32,
    }


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the reduction buffers (dA, dB, split partials) and of the rank scales: fp32, or fp64
    for fp64 inputs, so an fp64 run (gradcheck, the exact reference tests) rounds nothing to fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def deterministic() -> bool:
    return os.environ.get("RIL_FAST_DETERMINISTIC", "0") == "1" or torch.are_deterministic_algorithms_enabled()


def _env_choice(name: str, allowed: tuple) -> str:
    value = os.environ.get(name, "auto")
    if value not in allowed:
        raise ValueError(f"{name}={value!r} is not one of {'|'.join(allowed)}; unset it or pick one")
    return value


def forward_mode(r: int) -> int:
    """Untuned Triton choice: 2 = F1 (shrink in the GEMM's K-loop), 1 = F2 (split).

    F1 only for R ≤ 16: on the H100 (graph replay, fixed tiles) F1 at R ≤ 16 beat cuBLAS
    (torch-stacked) on all 4 shapes measured, F1 at R = 64 lost on 3 of 4 (its S tile costs
    registers), while F2 at R = 128 won on 3 of 4.
    """
    return 2 if _pow2(r) <= 16 else 1


def forward_plan(device, dtype, m: int, d_in: int, d_out: int, r: int) -> tuple[int, Optional[list]]:
    """(mode, tile config or None): 2 = F1 fused, 1 = F2 split, 0 = cuBLAS base + LoRA addmm.

    ``RIL_FAST_LORA_FWD=fused|split|cublas`` forces one and ``triton`` the untuned Triton choice;
    else the GPU's tuning table (:mod:`ril_fast.kernels.lora_tuning`), else (off CUDA) the
    untuned Triton choice.
    """
    force = _env_choice("RIL_FAST_LORA_FWD", ("auto", "fused", "split", "cublas", "triton"))
    if force == "triton":
        return forward_mode(r), None
    if force != "auto":
        mode = FWD_CODES[force]
        return (1 if mode == 2 and r > MAX_FUSED_R else mode), None
    tuned = lora_tuning.plan(device, dtype, m, d_in, d_out, r)
    if tuned is None:
        return forward_mode(r), None
    mode = FWD_CODES[tuned["fwd"]]
    return (1 if mode == 2 and r > MAX_FUSED_R else mode), tuned["fwd_cfg"]


def backward_plan(device, dtype, m: int, d_in: int, d_out: int, r: int) -> tuple[str, Optional[list]]:
    """("triton" | "cublas" | "fused" | "fused_da", dX tile config or None); ``RIL_FAST_LORA_BWD``
    forces one.

    "fused" is the Triton backward with dS, dB and dX in one kernel (one read of dY; the TMA
    kernel's EPI 3; in deterministic mode dB from stored per-M-tile partials), where it can run
    (sm_90+ or the interpreter, 16-bit aligned operands, R <= 64, dX needed); elsewhere it runs
    as "triton". "fused_da" also reduces dA in that kernel's epilogue (X's tile is the dX tile's
    columns): the whole backward in one launch, no dS round trip through memory.

    Untuned default on CUDA: cuBLAS. On the H100 the autograd backward of torch-stacked (cuBLAS)
    took 1.3-3.5x less time than the Triton backward on all 16 graph-replay cases (its dS/dB
    kernel parallelises over M only: 32 programs at M = 2048). Off CUDA (the interpreter in
    tests): Triton.
    """
    force = _env_choice("RIL_FAST_LORA_BWD", ("auto", "triton", "cublas", "fused", "fused_da"))
    if force != "auto":
        return force, None
    tuned = lora_tuning.plan(device, dtype, m, d_in, d_out, r)
    if tuned is None:
        return ("cublas" if device.type == "cuda" else "triton"), None
    return tuned["bwd"], tuned["bwd_cfg"]


def _main_tiles(n: int, cfg) -> tuple:
    """(BM, BN, BK, GROUP_M, warps, stages) of a main GEMM: the tuned config's first six entries,
    else (and always in the interpreter) the fixed tiles of :func:`main_config`."""
    return main_config(n) if cfg is None or INTERPRET else tuple(cfg[:6])


def gemm_variant(cfg) -> int:
    """Kernel of a main GEMM (:data:`lora_tma.VARIANTS`): ``RIL_FAST_LORA_GEMM`` forces one, else the
    tuned config's 7th entry, else 0 (the pointer kernel)."""
    force = _env_choice("RIL_FAST_LORA_GEMM", ("auto", *lora_tma.VARIANTS))
    if force != "auto":
        return lora_tma.VARIANTS[force]
    return cfg[6] if cfg is not None and len(cfg) > 6 else 0


def _gemm(a, b, c, *, M, N, K, bias=None, g=None, e=None, f=None, escale=None, s=None, cscale=None,
          epi=1, r=0, split_k=1, atomic=False, blocks=None, sa=None, sb=None, sc=None, se=None, sf=None, sg=None,
          cfg=None):
    """Launch ``_gemm_kernel``; ``sa``.. are (row, col) strides of the logical operands; ``cfg``: a
    tuned (BM, BN, BK, GROUP_M, warps, stages[, variant]) for the main GEMM (tiles ignored by the
    interpreter). A main GEMM (no split-K) whose variant is TMA runs :mod:`lora_tma` instead where
    its operands allow (16-bit, row-contiguous, 16-byte aligned, sm_90+)."""
    fl = _flags(a.dtype)
    variant = gemm_variant(cfg) if blocks is None and split_k == 1 and sa is None and sc is None else 0
    if variant:
        b_nk = sb is not None and sb[0] == 1 and b.shape[0] == N  # B given as the transpose of W (N, K)
        if (b_nk or sb is None) and lora_tma.usable(a, b, c, g if epi == 2 else None):
            lora_tma.gemm(a, b, c, b_nk=b_nk, M=M, N=N, K=K, cfg=_main_tiles(N, cfg), variant=variant,
                          upcast=fl["UPCAST"], bias=bias, g=g, e=e, f=f, escale=escale, s=s, cscale=cscale, epi=epi,
                          r=r, se=se, sf=sf)
            return
    dummy = c
    args = (a, b, c, bias if bias is not None else dummy, g if g is not None else dummy,
            e if e is not None else dummy, f if f is not None else dummy,
            escale if escale is not None else dummy, s if s is not None else dummy,
            cscale if cscale is not None else dummy, M, N, K, r, split_k,
            int(bias is not None), int(escale is not None and epi == 1), int(cscale is not None),
            *(sa or a.stride()), *(sb or b.stride()), *(sc or (c.stride() if c.dim() == 3 else (0, *c.stride()))),
            *(sg or (0, 0)), *(se or (0, 0)), *(sf or (0, 0)), *(s.stride() if s is not None else (0, 0)))
    if blocks is None:
        bm, bn, bk, gm, warps, stages = _main_tiles(N, cfg)
    else:
        (bm, bn, bk, warps), gm, stages = blocks, 1, 1 if INTERPRET else 3
    # R_PAD only shapes EPI 2's register tile; EPI 1 walks R in RB-wide chunks
    _gemm_kernel[(_cdiv(M, bm) * _cdiv(N, bn), split_k)](
        *args, EPI=epi, ATOMIC=bool(atomic), R_PAD=_pow2(r) if epi == 2 else 16, RB=RB, **fl,
        BM=bm, BN=bn, BK=bk, GROUP_M=gm, num_warps=warps, num_stages=stages)


# Split-K reductions over M (dA, deterministic dB): rows/cols below 64 are masked (tiny dots).
REDUCE_BLOCKS = (64, 64, 64, 4)


_DY_TWICE: dict = {}  # device index -> needs_dy_twice of its compute capability


def needs_dy_twice(major: int) -> bool:
    """The dS/dB kernel loads dY a second time for dB's dot on GPUs whose dots take register
    operands (``mma.sync``): sm_8x and the sm_12x consumer Blackwells (RTX 50xx). Hopper (wgmma)
    and sm_10x (tcgen05) read one shared-memory copy."""
    return major < 9 or major == 12


def _dy_twice(device: torch.device) -> bool:
    """:func:`needs_dy_twice` for ``device`` (cached per device: once per dS/dB launch)."""
    if device.type != "cuda":
        return False
    if device.index not in _DY_TWICE:
        _DY_TWICE[device.index] = needs_dy_twice(torch.cuda.get_device_capability(device)[0])
    return _DY_TWICE[device.index]


def _dsdb_split(m_tiles: int, n_chunks: int) -> int:
    """N-ranges of the dS/dB kernel: about two waves of programs on a 132-SM GPU (one range in the
    interpreter, where every program costs tens of ms; tests force more)."""
    if INTERPRET:
        return 1
    return max(1, min(n_chunks, _cdiv(264, max(m_tiles, 1))))


def _split_for(M: int, tiles: int) -> int:
    if INTERPRET:
        return 1 if M <= 128 else 2
    return max(1, min(64, _cdiv(264, max(tiles, 1)), _cdiv(M, 256)))


# ----------------------------------------------------------------------------------------------
# launchers: plain functions the autograd Function calls directly (a custom-op dispatch costs
# tens of µs, more than these GEMMs); the custom ops below wrap them for torch.compile.


def fwd_launch(x, weight, bias, a_cat, b_cat, rscale, mode, cfg=None):
    """x (M, d_in) -> (y (M, d_out), S = x·A_catᵀ (M, R)). mode 2 = F1 fused, 1 = F2 split,
    0 = cuBLAS: base GEMM with the bias, the shrink, and ``y += S·(B_cat·diag(rscale))ᵀ`` as one
    ``addmm_`` that reads y once (two extra passes over y, no extra kernel of ours)."""
    M, K = x.shape
    N, R = weight.shape[0], a_cat.shape[0]
    if mode == 0:
        s = torch.mm(x, a_cat.t())
        y = torch.addmm(bias, x, weight.t()) if bias is not None else torch.mm(x, weight.t())
        y.addmm_(s, (b_cat * _as(rscale, b_cat.dtype)).t())
        return y, s
    y = torch.empty(M, N, device=x.device, dtype=x.dtype)
    s = torch.empty(M, R, device=x.device, dtype=x.dtype)
    if mode == 1:  # F2: S = X·A_catᵀ, then the base GEMM with S·B_catᵀ in the epilogue
        _gemm(x, a_cat, s, M=M, N=R, K=K, sb=(a_cat.stride(1), a_cat.stride(0)))
        _gemm(x, weight, y, M=M, N=N, K=K, bias=bias, e=s, f=b_cat, escale=rscale, epi=1, r=R,
              sb=(weight.stride(1), weight.stride(0)), se=s.stride(), sf=(b_cat.stride(1), b_cat.stride(0)), cfg=cfg)
    else:
        _gemm(x, weight, y, M=M, N=N, K=K, bias=bias, g=a_cat, f=b_cat, escale=rscale, s=s, epi=2, r=R,
              sb=(weight.stride(1), weight.stride(0)), sg=(a_cat.stride(1), a_cat.stride(0)),
              sf=(b_cat.stride(1), b_cat.stride(0)), cfg=cfg)
    return y, s


def ds_db_launch(dy, b_cat, s, rscale, lo, hi, deterministic, db=None, split_n=None):
    """dS = (dY·B_cat)·diag(rscale) (M, R) in dY's dtype; dB of columns [lo, hi) in fp32 (d_out, hi-lo).

    ``db``: optional zeroed fp32 (d_out, hi-lo) buffer to accumulate into (the atomics path).
    ``split_n``: N-ranges (grid axis 1); default :func:`_dsdb_split`."""
    M, N = dy.shape
    R, rt = b_cat.shape[1], hi - lo
    ds = torch.empty(M, R, device=dy.device, dtype=dy.dtype)
    b_full = lora_tma.rank_padded(b_cat, _pow2(R)) if _pow2(R) <= MAX_DSDB_R else b_cat
    fused_db = rt > 0 and not deterministic and _pow2(R) <= MAX_DSDB_R
    if fused_db and db is None:
        db = torch.zeros(N, rt, device=dy.device, dtype=_acc_dtype(dy.dtype))
    if _pow2(R) <= MAX_DSDB_R:
        bm, bn, warps, stages = DSDB_CFG
        n_chunks = _cdiv(N, bn)
        split = min(split_n or _dsdb_split(_cdiv(M, bm), n_chunks), n_chunks)
        n_per = _cdiv(n_chunks, split) * bn
        split = _cdiv(N, n_per)
        if split == 1:
            out, mode = ds, 0
        elif deterministic:  # an fp32 (fp64) partial per N-range, summed in order below
            out, mode = torch.empty(split, M, R, device=dy.device, dtype=_acc_dtype(dy.dtype)), 2
        else:
            out, mode = torch.zeros(M, R, device=dy.device, dtype=_acc_dtype(dy.dtype)), 1
        _ds_db_kernel[(_cdiv(M, bm), split)](
            dy, b_full, s, rscale, out, db if fused_db else ds, M, N, R, lo, rt, n_per, *dy.stride(),
            *b_full.stride(), *s.stride(), out.stride(0) if mode == 2 else 0, *out.stride()[-2:],
            *(db.stride() if fused_db else (0, 0)), NEED_DB=fused_db, DS_ATOMIC=mode == 1, R_PAD=_pow2(R),
            DY_TWICE=fused_db and _dy_twice(dy.device), **_flags(dy.dtype), BM=bm, BN=bn, num_warps=warps,
            num_stages=stages)
        if mode:
            ds.copy_(out.sum(0) if mode == 2 else out)
    else:  # wide stacks: dS as a plain GEMM with the rank scale in the epilogue
        _gemm(dy, b_cat, ds, M=M, N=R, K=N, cscale=rscale)
    if rt > 0 and not fused_db:  # dB = dYᵀ·(S·diag(rscale)) as a split-K reduction over M, ordered sum
        blocks = REDUCE_BLOCKS
        split = _split_for(M, _cdiv(N, blocks[0]) * _cdiv(rt, blocks[1]))
        part = torch.empty(split, N, rt, device=dy.device, dtype=_acc_dtype(dy.dtype))
        s_t, st_strides = _rank_slice(s, lo, hi)
        _gemm(dy, s_t, part, M=N, N=rt, K=M, cscale=rscale[lo:hi], split_k=split, blocks=blocks,
              sa=(dy.stride(1), dy.stride(0)), sb=st_strides)
        red = part.sum(0) if split > 1 else part[0]
        if db is None:
            db = red
        else:
            db.copy_(red)
    if db is None:
        db = torch.zeros(N, 0, device=dy.device, dtype=_acc_dtype(dy.dtype))
    return ds, db


def dx_launch(dy, weight, ds, a_cat, cfg=None):
    """dX = dY·W + dS·A_cat (M, d_in); the LoRA term is the GEMM's epilogue."""
    M, N = dy.shape
    K, R = weight.shape[1], a_cat.shape[0]
    dx = torch.empty(M, K, device=dy.device, dtype=dy.dtype)
    _gemm(dy, weight, dx, M=M, N=K, K=N, e=ds, f=a_cat, epi=1, r=R, se=ds.stride(), sf=a_cat.stride(), cfg=cfg)
    return dx


def dx_ds_db_launch(dy, weight, a_cat, b_cat, s, rscale, lo, hi, db, cfg=None, deterministic=False, x=None,
                    da=None):
    """dS, dX and dB of rank columns [lo, hi) from one read of dY: the TMA kernel's EPI 3
    (:mod:`lora_tma`). ``db``: zeroed fp32 (d_out, hi-lo), accumulated with atomics, or with
    ``deterministic`` written from per-M-tile partials summed in order. Returns (dS in dY's dtype,
    dX, db). Callers check :func:`fused_backward_fits` and R <= :data:`MAX_FUSED_R`.

    With ``x`` (the forward's input, M×d_in) and ``da`` (zeroed fp32 (hi-lo, d_in)) dA is also
    reduced into ``da``: by the same kernel where the tile and X allow (:func:`lora_tma.takes_da`),
    which is the whole backward in one launch ("fused_da"; no dS stored, the first result None);
    else by :func:`da_launch` after it."""
    M, N = dy.shape
    K, R = weight.shape[1], a_cat.shape[0]
    tiles = _main_tiles(K, cfg)
    if da is not None and not lora_tma.takes_da(tiles[1], x):
        ds, dx, db = dx_ds_db_launch(dy, weight, a_cat, b_cat, s, rscale, lo, hi, db, cfg, deterministic)
        da_launch(ds, x, lo, hi, deterministic, da=da)
        return ds, dx, db
    with_da = da is not None
    dx = torch.empty(M, K, device=dy.device, dtype=dy.dtype)
    ds = None if with_da else torch.empty(M, R, device=dy.device, dtype=dy.dtype)
    variant = gemm_variant(cfg) or lora_tma.VARIANTS["tma"]
    # one fp32 partial per M-tile, each element written once: no memset needed
    m_tiles = _cdiv(M, tiles[0])
    part = torch.empty(m_tiles, N, hi - lo, device=dy.device, dtype=torch.float32) if deterministic else db
    part_a = (torch.empty(m_tiles, hi - lo, K, device=dy.device, dtype=torch.float32) if deterministic else da
              ) if with_da else None
    lora_tma.gemm(dy, weight, dx, b_nk=False, M=M, N=K, K=N, cfg=tiles, variant=variant,
                  upcast=_flags(dy.dtype)["UPCAST"], g=b_cat, f=a_cat, escale=rscale, s=ds, epi=3, r=R,
                  sf=a_cat.stride(), db=part, st=s[:, lo:hi], stscale=rscale[lo:hi], db_partial=deterministic,
                  x=x if with_da else None, da=part_a, lo=lo)
    if deterministic:
        torch.sum(part, dim=0, out=db)
        if with_da:
            torch.sum(part_a, dim=0, out=da)
    return ds, dx, db


def _rank_slice(t, lo, hi):
    """``t[:, lo:hi]`` (M×rt: S or dS) as an operand of a reduction over M: (tensor, (stride over
    M, stride over rank)).

    Its tile loads are vectorised (and prefetched by the pipeliner) only when the rank axis is
    whole 16-element runs: 16-byte aligned rows, rt and the row stride multiples of 16. Otherwise
    (R = 4, a slice at rank 4, ...) the loads were 2-byte gathers under the rank mask, synchronous in
    every K-step (``tests/test_kernels_launch_lora.py``). Those take a transposed copy (rt, M)
    instead, contiguous along M, the reduction axis: one small copy (M·rt elements) for loads the
    pipeliner can take. Not when M is not a multiple of 16 (77-token prompts): the K-tail mask
    then splits the runs along M too, so the copy would buy nothing."""
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
    blocks = REDUCE_BLOCKS
    split = _split_for(M, _cdiv(rt, blocks[0]) * _cdiv(K, blocks[1]))
    ds_t, (s_m, s_r) = _rank_slice(ds, lo, hi)
    if deterministic or split == 1:
        out = da if da is not None and split == 1 else torch.empty(split, rt, K, device=x.device,
                                                                   dtype=_acc_dtype(x.dtype))
        _gemm(ds_t, x, out, M=rt, N=K, K=M, split_k=split, blocks=blocks, sa=(s_r, s_m),
              sc=(0, *out.stride()) if out.dim() == 2 else None)
        red = out if out.dim() == 2 else (out.sum(0) if split > 1 else out[0])
        if da is None:
            return red
        if red is not da:
            da.copy_(red)
        return da
    if da is None:
        da = torch.zeros(rt, K, device=x.device, dtype=_acc_dtype(x.dtype))
    _gemm(ds_t, x, da, M=rt, N=K, K=M, split_k=split, atomic=True, blocks=blocks, sa=(s_r, s_m),
          sc=(0, *da.stride()))
    return da


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a·b with fp32 output (fp32 accumulation, one rounding), as the Triton dA/dB reductions give.

    Half-precision inputs use cuBLAS' fp32-output GEMM on CUDA (``torch.mm(..., out_dtype)``, which
    torch has only there); elsewhere (the interpreter tests) they are upcast."""
    if a.dtype in (torch.float32, torch.float64):
        return torch.mm(a, b)
    if a.is_cuda:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def backward_cublas(dy, x, weight, a_cat, b_cat, s, rscale, lo, hi, need_x, need_a, need_b):
    """The backward as cuBLAS GEMMs: (dX or None, dA of rows [lo, hi) fp32 or None, dB of columns
    [lo, hi) fp32 or None). Frozen adapters cost nothing beyond their share of dS (dX needs it)."""
    b_scaled = b_cat * _as(rscale, b_cat.dtype)  # (d_out, R): the scale folded into the tiny operand
    ds = torch.mm(dy, b_scaled) if (need_x or need_a) else None  # (M, R)
    dx = torch.mm(dy, weight).addmm_(ds, a_cat) if need_x else None
    da = _mm_f32(ds[:, lo:hi].t(), x) if need_a else None
    db = _mm_f32(dy.t(), s[:, lo:hi] * _as(rscale[lo:hi], s.dtype)) if need_b else None
    return dx, da, db


@torch.library.custom_op("ril_fast::lora_group_fwd", mutates_args=())
def lora_fwd(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], a_cat: torch.Tensor,
             b_cat: torch.Tensor, rscale: torch.Tensor, mode: int,
             cfg: Optional[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom-op form of :func:`fwd_launch` (opaque to torch.compile, with a fake impl)."""
    return fwd_launch(x, weight, bias, a_cat, b_cat, rscale, mode, cfg)


@lora_fwd.register_fake
def _(x, weight, bias, a_cat, b_cat, rscale, mode, cfg):
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
def lora_bwd_dx(dy: torch.Tensor, weight: torch.Tensor, ds: torch.Tensor, a_cat: torch.Tensor,
                cfg: Optional[list[int]]) -> torch.Tensor:
    """Custom-op form of :func:`dx_launch`."""
    return dx_launch(dy, weight, ds, a_cat, cfg)


@lora_bwd_dx.register_fake
def _(dy, weight, ds, a_cat, cfg):
    return dy.new_empty(dy.shape[0], weight.shape[1])


def fused_backward_fits(dy: torch.Tensor, weight: torch.Tensor) -> bool:
    """The fused backward's TMA operands fit: dY, W, and dX (fresh M×d_in, rows as long as W's)."""
    return lora_tma.usable(dy, weight, weight)


def _fused_backward(dy, weight, a_cat, b_cat, s, rscale, lo, hi, deterministic, cfg, x=None, da=None):
    """(dS or None, dX, fp32 dB of columns [lo, hi)) from :func:`dx_ds_db_launch` (with dA into
    ``da``, given) where its TMA operands fit, checked here on real tensors; else from the dS/dB,
    dX (and dA) kernels. The body of the fused custom ops."""
    db = torch.zeros(dy.shape[1], hi - lo, device=dy.device, dtype=_acc_dtype(dy.dtype))
    if fused_backward_fits(dy, weight):
        return dx_ds_db_launch(dy, weight, a_cat, b_cat, s, rscale, lo, hi, db, cfg, deterministic=deterministic,
                               x=x, da=da)
    ds, db = ds_db_launch(dy, b_cat, s, rscale, lo, hi, deterministic, db=db)
    if da is not None:
        da_launch(ds, x, lo, hi, deterministic, da=da)
    return ds, dx_launch(dy, weight, ds, a_cat, cfg), db


@torch.library.custom_op("ril_fast::lora_group_bwd_fused_da", mutates_args=())
def lora_bwd_fused_da(dy: torch.Tensor, weight: torch.Tensor, x: torch.Tensor, a_cat: torch.Tensor,
                      b_cat: torch.Tensor, s: torch.Tensor, rscale: torch.Tensor, lo: int, hi: int, deterministic: bool,
                      cfg: Optional[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Custom-op form of the one-kernel backward: (dX, fp32 dA of rank rows [lo, hi), fp32 dB of
    columns [lo, hi)), see :func:`_fused_backward`."""
    da = torch.zeros(hi - lo, x.shape[1], device=dy.device, dtype=_acc_dtype(dy.dtype))
    _, dx, db = _fused_backward(dy, weight, a_cat, b_cat, s, rscale, lo, hi, deterministic, cfg, x=x, da=da)
    return dx, da, db


@lora_bwd_fused_da.register_fake
def _(dy, weight, x, a_cat, b_cat, s, rscale, lo, hi, deterministic, cfg):
    acc = _acc_dtype(dy.dtype)
    return (dy.new_empty(dy.shape[0], weight.shape[1]), x.new_empty(hi - lo, x.shape[1], dtype=acc),
            dy.new_empty(dy.shape[1], hi - lo, dtype=acc))


@torch.library.custom_op("ril_fast::lora_group_bwd_fused", mutates_args=())
def lora_bwd_fused(dy: torch.Tensor, weight: torch.Tensor, a_cat: torch.Tensor, b_cat: torch.Tensor,
                   s: torch.Tensor, rscale: torch.Tensor, lo: int, hi: int, deterministic: bool,
                   cfg: Optional[list[int]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Custom-op form of the fused backward: (dS, dX, fp32 dB of columns [lo, hi)), see
    :func:`_fused_backward`."""
    return _fused_backward(dy, weight, a_cat, b_cat, s, rscale, lo, hi, deterministic, cfg)


@lora_bwd_fused.register_fake
def _(dy, weight, a_cat, b_cat, s, rscale, lo, hi, deterministic, cfg):
    return (dy.new_empty(dy.shape[0], a_cat.shape[0]), dy.new_empty(dy.shape[0], weight.shape[1]),
            dy.new_empty(dy.shape[1], hi - lo, dtype=_acc_dtype(dy.dtype)))


@torch.library.custom_op("ril_fast::lora_group_bwd_da", mutates_args=())
def lora_bwd_da(ds: torch.Tensor, x: torch.Tensor, lo: int, hi: int, deterministic: bool) -> torch.Tensor:
    """Custom-op form of :func:`da_launch`."""
    return da_launch(ds, x, lo, hi, deterministic)


@lora_bwd_da.register_fake
def _(ds, x, lo, hi, deterministic):
    return x.new_empty(hi - lo, x.shape[1], dtype=_acc_dtype(x.dtype))


def _compiling() -> bool:
    return torch.compiler.is_compiling()


def _forward(x, weight, bias, rscale, a_list, b_list):
    """The forward launch shared by the autograd Function and the no-grad path: (x2, a_cat, b_cat,
    plan key, y (M, d_out), S)."""
    d_in, d_out, dt = x.shape[-1], weight.shape[0], x.dtype
    x2 = x.reshape(-1, d_in)
    a_cat, b_cat = _stacked(a_list, b_list, dt)
    shape = (x2.device, dt, x2.shape[0], d_in, d_out, a_cat.shape[0])
    args = (x2, _as(weight, dt), None if bias is None else _as(bias, dt), a_cat, b_cat, rscale,
            *forward_plan(*shape))
    y, s = lora_fwd(*args) if _compiling() else fwd_launch(*args)
    return x2, a_cat, b_cat, shape, y, s


class _LoraGroupFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, rscale, ranks, *ab):
        k = len(ranks)
        x2, a_cat, b_cat, shape, y, s = _forward(x, weight, bias, rscale, ab[:k], ab[k:])
        ctx.save_for_backward(x2, weight, a_cat, b_cat, s, rscale)
        ctx.ranks, ctx.x_shape, ctx.bwd_plan = ranks, x.shape, backward_plan(*shape)
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
        dy = _as(gy.reshape(-1, gy.shape[-1]), x2.dtype).contiguous()
        gx = gw = gb = None
        grads_a, grads_b = [None] * k, [None] * k
        if need[0] or train:
            need_b = any(need[5 + k + i] for i in train)
            need_a = any(need[5 + i] for i in train)
            impl, cfg = ctx.bwd_plan
            if impl in ("fused", "fused_da") and (not need[0] or _pow2(a_cat.shape[0]) > MAX_FUSED_R):
                impl = "triton"  # the fused backward: dX needed, dS tile in registers
            if impl == "cublas":
                gx, da, db = backward_cublas(dy, x2, _as(weight, x2.dtype), a_cat, b_cat, s, rscale, lo, hi,
                                             need[0], need_a, need_b)
                gx = None if gx is None else gx.reshape(ctx.x_shape)
            else:
                gx, da, db = _backward_triton(ctx, dy, x2, weight, a_cat, b_cat, s, rscale, lo, hi, need_a, need_b,
                                              det, ops, cfg, train, fused=impl in ("fused", "fused_da"),
                                              with_da=impl == "fused_da")
            for i in train:
                sl = slice(offs[i] - lo, offs[i + 1] - lo)
                if need[5 + i]:
                    grads_a[i] = _as(da[sl], ctx.dtypes[-2 * k + i])
                if need[5 + k + i]:
                    grads_b[i] = _as(db[:, sl], ctx.dtypes[-k + i])
        if need[1]:  # W is frozen by contract; a trainable W still gets its exact gradient
            acc = _acc_dtype(x2.dtype)
            gw = (dy.t().to(acc) @ x2.to(acc)).to(weight.dtype)
        if need[2]:
            gb = dy.to(_acc_dtype(x2.dtype)).sum(0).to(ctx.dtypes[1])
        return (gx, gw, gb, None, None, *grads_a, *grads_b)


def _backward_triton(ctx, dy, x2, weight, a_cat, b_cat, s, rscale, lo, hi, need_a, need_b, det, ops, cfg, train,
                     fused=False, with_da=False):
    """dS/dB in one read of dY, dX with the LoRA epilogue, dA split-K: (dX, dA, dB). ``fused``: dS,
    dB and dX in one read of dY (:func:`dx_ds_db_launch`) where the TMA kernel can run;
    ``with_da``: dA in that kernel too (the whole backward in one launch)."""
    k, need = len(ctx.ranks), ctx.needs_input_grad
    rt, n_out, n_in = hi - lo, dy.shape[1], x2.shape[1]
    gx = da = None
    w = _as(weight, x2.dtype)
    if fused and not ops:  # (under torch.compile the custom op checks, on real tensors)
        fused = fused_backward_fits(dy, w)
    with_da = with_da and fused and need_a
    has_b = need_b or fused  # the fused kernel always accumulates dB (masked atomics, a few % of its work)
    if ops and with_da:
        gx, da, db = lora_bwd_fused_da(dy, w, x2, a_cat, b_cat, s, rscale, lo, hi, det, cfg)
        gx = gx.reshape(ctx.x_shape)
    elif ops and fused:
        ds, gx, db = lora_bwd_fused(dy, w, a_cat, b_cat, s, rscale, lo, hi, det, cfg)
        gx = gx.reshape(ctx.x_shape)
    elif ops:
        ds, db = lora_bwd_ds_db(dy, b_cat, s, rscale, lo, hi if need_b else lo, det)
    else:  # one zeroed fp32 (fp64) buffer for dB and dA: one memset, and one cast at the end
        acc = torch.zeros(n_out * rt * has_b + rt * n_in * need_a, device=dy.device,
                          dtype=_acc_dtype(dy.dtype)) if train or fused else None
        db_buf = acc[:n_out * rt].view(n_out, rt) if has_b else None
        da_buf = acc[n_out * rt * has_b:].view(rt, n_in) if need_a else None
        if fused:
            ds, gx, db = dx_ds_db_launch(dy, w, a_cat, b_cat, s, rscale, lo, hi, db_buf, cfg, deterministic=det,
                                         x=x2 if with_da else None, da=da_buf if with_da else None)
            gx = gx.reshape(ctx.x_shape)
            da = da_buf if with_da else None
        else:
            ds, db = ds_db_launch(dy, b_cat, s, rscale, lo, hi if need_b else lo, det, db=db_buf)
    if need[0] and gx is None:
        gx = (lora_bwd_dx(dy, w, ds, a_cat, cfg) if ops else dx_launch(dy, w, ds, a_cat, cfg)).reshape(ctx.x_shape)
    if need_a and not with_da:
        da = (lora_bwd_da(ds, x2, lo, hi, det) if ops
              else da_launch(ds, x2, lo, hi, det, da=da_buf))
    dts = {ctx.dtypes[-2 * k + i] for i in train if need[5 + i]} | {
        ctx.dtypes[-k + i] for i in train if need[5 + k + i]}
    if not ops and len(dts) == 1:  # cast dA and dB together
        acc = _as(acc, dts.pop())
        db = acc[:n_out * rt].view(n_out, rt) if has_b else None
        da = acc[n_out * rt * has_b:].view(rt, n_in) if need_a else None
    return gx, da, db


# Stacks of all-frozen groups (EMA teacher, inference) are cached and re-copied only where a
# version counter moved (edits through ``.data`` do not move it: call clear_stack_cache() after
# those). Entries hold weak references, so a freed tensor whose address is reused misses.
_STACK_CACHE: dict = {}
_STACK_CACHE_MAX = 512


def clear_stack_cache() -> None:
    _STACK_CACHE.clear()


def _as(t: torch.Tensor, dt: torch.dtype) -> torch.Tensor:
    """``t.to(dt)`` without the dispatcher round trip when it is already ``dt`` (a few µs per call)."""
    return t if t.dtype == dt else t.to(dt)


def _cat_as(ts, dim: int, dt: torch.dtype) -> torch.Tensor:
    """Concatenate, then cast once: two kernels, not one cast per adapter plus the concatenation."""
    return _as(torch.cat(list(ts), dim=dim), dt)


def _stacked(a_list, b_list, dt):
    k = len(a_list)
    if k == 1 and a_list[0].dtype == dt and b_list[0].dtype == dt:
        return a_list[0], b_list[0]
    # With a trainable adapter, build fresh stacks (two launches, as many as refreshing slices):
    # several forwards before one backward (truncated backprop over K sampler steps) each save
    # their own stack, and a shared buffer rewritten in place would fail autograd's version check.
    # Not cached under no_grad either: DeepSpeed ZeRO writes updated weights through ``.data``, which
    # moves no version counter, so a cached stack of a trainable adapter would go stale.
    if _compiling() or any(t.requires_grad for t in (*a_list, *b_list)):
        if k == 1:  # nothing to stack, only a cast (fp32 adapters on a bf16 model, the default)
            return _as(a_list[0], dt), _as(b_list[0], dt)
        return _cat_as(a_list, 0, dt), _cat_as(b_list, 1, dt)
    ts = (*a_list, *b_list)
    key = (dt, *((t.data_ptr(), t.shape, t.stride()) for t in ts))
    ent = _STACK_CACHE.get(key)
    if ent is not None and all(r() is t for r, t in zip(ent[0], ts)):
        _, vers, a_cat, b_cat, offs = ent
        for i, t in enumerate(ts):
            if t._version != vers[i]:
                j = i % k
                (a_cat[offs[j]:offs[j + 1]] if i < k else b_cat[:, offs[j]:offs[j + 1]]).copy_(t)
                vers[i] = t._version
        return a_cat, b_cat
    import weakref

    a_cat = _cat_as(a_list, 0, dt)
    b_cat = _cat_as(b_list, 1, dt)
    offs = [0]
    for a in a_list:
        offs.append(offs[-1] + a.shape[0])
    if len(_STACK_CACHE) >= _STACK_CACHE_MAX:
        _STACK_CACHE.clear()
    _STACK_CACHE[key] = ([weakref.ref(t) for t in ts], [t._version for t in ts], a_cat, b_cat, offs)
    return a_cat, b_cat


_SCALE_CACHE: dict = {}


def _rank_scale(ranks, scales, device, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Per-rank scale vector (scale ``s_i`` repeated ``r_i`` times), cached so steady-state calls do
    no host-to-device copy. Built on the device by fills, which a CUDA graph can capture (a copy from
    pageable host memory cannot); one built during a capture lives in the graph's pool, so it is not
    cached (as the distillation ticket counters)."""
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


def lora_group_linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                      lora_a: Sequence[torch.Tensor], lora_b: Sequence[torch.Tensor], scales: Sequence[float],
                      backend: str = "triton") -> torch.Tensor:
    """``y = x Wᵀ + b + Σ_i s_i (x A_iᵀ) B_iᵀ``; see :func:`ril_fast.kernels.lora_group_linear`.

    Launches: forward = one GEMM (two for F2, three cuBLAS calls for the cuBLAS forward) plus,
    for k > 1 with a trainable adapter, two concatenations (all-frozen stacks are cached);
    backward = three GEMM-like kernels plus a memset and one cast (fp32 dA/dB accumulators), or
    five cuBLAS calls (dS, dX, its LoRA ``addmm_``, dA, dB) and two tiny scalings.
    """
    if backend == "cuda":
        from ril_fast.kernels import cuda_lib

        return cuda_lib.lora_group_linear(x, weight, bias, lora_a, lora_b, scales)
    if backend != "triton":
        raise ValueError(f"lora_group backend must be 'triton' or 'cuda', got {backend!r}; "
                         "use the reference for 'torch'")
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
    ranks = tuple(ranks)
    rscale = _rank_scale(ranks, scales, x.device, _acc_dtype(x.dtype))
    if not torch.is_grad_enabled():
        # No graph will be recorded (sampling steps, the EMA teacher): skip the autograd Function
        # and its saved tensors (host cost, measured by benchmarks/profile_lora_host.py).
        y = _forward(x, weight, bias, rscale, lora_a, lora_b)[4]
        return y.reshape(*x.shape[:-1], d_out)
    return _LoraGroupFn.apply(x, weight, bias, rscale, ranks, *lora_a, *lora_b)


def gpu_launch_cases(dtype: str = "bf16") -> list:
    """Every (kernel, pointer dtypes, constexprs, config) the GPU path may launch for one I/O dtype.

    Used by the AOT compile gate (tests/test_kernels_compile_lora.py). Each item is
    ``(jit_fn, ptr_types, constexprs, num_warps, num_stages)``; unnamed pointers take ``dtype``.
    """
    base = dict(UPCAST=False, IEEE=dtype == "fp32", ACC=tl.float32)
    f32s = {"escale_ptr": "fp32", "cscale_ptr": "fp32"}
    cases = []

    def gemm(cfgs, ptrs, **meta):
        for (bm, bn, bk, gm, warps, stages) in cfgs:
            m = dict(R_PAD=16, RB=RB, ATOMIC=False, **base)
            m.update(meta)
            m.update(BM=bm, BN=bn, BK=bk, GROUP_M=gm)
            cases.append((_gemm_kernel, {**f32s, **ptrs}, m, warps, stages))

    # F2 shrink and main, dX, wide dS: runtime flags pick bias/scales, R = 0 skips LoRA
    gemm(GEMM_CANDIDATES, {}, EPI=1)
    for r_pad in (16, 32, 64):
        gemm(GEMM_CANDIDATES, {}, EPI=2, R_PAD=r_pad)  # F1
    bm, bn, bk, w = REDUCE_BLOCKS
    for atomic in (False, True):  # dA, dB partials / dA atomics
        gemm([(bm, bn, bk, 1, w, 3)], {"c_ptr": "fp32"}, EPI=1, ATOMIC=atomic)
    bm, bn, warps, stages = _GPU_DSDB
    # (NEED_DB, DS_ATOMIC, dS pointer): one N-range; several with atomics; several, deterministic
    # (fp32 partials; dB then comes from the split-K GEMM, so NEED_DB is off)
    for need_db, atomic, ds in ((True, False, None), (False, False, None), (True, True, "fp32"),
                                (False, True, "fp32"), (False, False, "fp32")):
        for r_pad in (16, 32, 64, 128):
            ptrs = {"rscale_ptr": "fp32", "db_ptr": "fp32", **({"ds_ptr": ds} if ds else {})}
            for twice in (False, True) if need_db else (False,):  # True: what sm_8x/12x run (_dy_twice)
                m = dict(R_PAD=r_pad, NEED_DB=need_db, DS_ATOMIC=atomic, DY_TWICE=twice, BM=bm, BN=bn, **base)
                cases.append((_ds_db_kernel, ptrs, m, warps, stages))
    return cases
