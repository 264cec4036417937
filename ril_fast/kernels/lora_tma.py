"""Hopper variant of the LoRA group's main GEMM: persistent programs, TMA loads and stores.

Same contract as ``lora_group._gemm_kernel`` for the GEMMs that carry the whole layer (the
forward's base GEMM with the LoRA shrink in its K-loop or the LoRA expand in its epilogue, and
dX = dY·W + dS·A_cat), for 16-bit I/O only. Why a second kernel: on the H200 the pointer kernel
ran the base GEMM of SDXL's 64k×640×640 layer at about half cuBLAS' rate (176 against 93 µs,
``benchmarks/results/nvidia-h200``), and its LoRA work was not the cost (R 4..64 all took
170-180 µs). With K = 320..1280 every tile runs only 5-20 K-steps, so the prologue (filling the
pipeline) and the epilogue (the store) are a large share of each tile. This kernel:

- launches one program per SM and walks the output tiles (GROUP_M-swizzled) in a flattened
  ``tl.range`` loop, so Triton's pipeliner issues the next tile's loads during this tile's
  epilogue;
- loads X, W (and A_cat for the in-loop shrink) with TMA descriptors: no address arithmetic or
  masks in the K-loop, tails zero-filled by the hardware;
- stores C through a TMA descriptor, optionally in two half-width slices (less shared memory for
  the epilogue's staging buffer, so more pipeline stages fit).

It also has a role the pointer kernel lacks, the fused backward (EPI 3): dX, dS and dB of the
trainable slice from one read of dY (``lora_group.dx_ds_db_launch``), optionally with dA reduced
in the same epilogue (``DA``: the whole backward in one launch).

The small LoRA operands (S or dS, B_cat or A_cat, the scales, bias) keep pointer loads: they
are a few KB per tile, their rank R is often not a multiple of 8 (TMA needs 16-byte row
strides), and they live in L2.

Whether it beats the pointer kernel is a per-GPU, per-shape measurement: the tuning table picks
it with a 7-entry tile config whose last entry is :data:`VARIANTS` (``benchmarks/tune_lora.py``).
Selected only on Hopper GPUs (compute capability 9, see :func:`available`) and when every TMA operand is 2-D,
row-contiguous, 16-byte aligned; anything else runs the pointer kernel. The interpreter runs it
on CPU tensors for the tests (programs = 4 there, so each walks several tiles).
"""

from __future__ import annotations

import dataclasses
import os

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# Tile-config variant codes (7th entry of a tuned config): 0 = pointer kernel (lora_group),
# 1 = this kernel, 2 = this kernel storing C in two half-width slices.
VARIANTS = {"pointer": 0, "tma": 1, "tma_subtile": 2}
INTERP_PROGRAMS = 4
# Tile configs (BM, BN, BK, GROUP_M, warps, stages) the tuner tries with this kernel. Its epilogue
# stages C in shared memory next to the pipeline buffers, so the 128x256 tile gets 2 stages (3 need
# 264 KB with the fused shrink; sm_90 has 227 KB) and 128x128 also tries 4. 128x64 with 3 stages
# fits two CTAs on an SM (94-113 KB, 141-161 registers at SDXL shapes: :func:`occupancy`), so one
# CTA's epilogue runs under the other's main loop, as cuBLAS' two consumer warp groups do. With 2
# stages it also fits twice where 3 do not: the fused backward with dA (100 KB, 198 registers at R 16
# against 128 KB) and the R 64 roles.
TILES = [(128, 64, 64, 8, 4, 4), (128, 128, 64, 8, 8, 3), (128, 128, 64, 8, 8, 4), (64, 64, 64, 8, 4, 4),
         (64, 128, 64, 8, 4, 4), (128, 256, 64, 8, 8, 2), (128, 64, 64, 8, 4, 3), (128, 64, 64, 8, 4, 2)]
TMA_DTYPES = (torch.float16, torch.bfloat16)
RB_MAX = 32  # rank chunk of the EPI 1 epilogue
# EPI 1 unrolls its rank chunks up to this R_PAD (2 chunks); at 128 and above the unrolled loads
# spilled registers on every tile (ptxas -v for sm_90: 100-5300 B), so larger ranks loop at run time.
MAX_UNROLLED_R = tl.constexpr(64)  # a constexpr global: the kernel reads it
# The fused backward (EPI 3) also pipelines B_cat tiles and stages S_t and dYᵀ: 4 stages of a
# 128x128 tile need 240 KB of shared memory there (compile gate), so it runs with at most 3.
EPI3_MAX_STAGES = 3
# ... and with dA (DA) it also stages X's (BM, BN) tile and dS for the epilogue's dA dot: +37 KB at
# 128x128, R 16 (launch gate, SDXL 640 -> 640). 128x128 at R_PAD 64 then needs 234 KB with 3 stages
# (2 fit), and 128x256 237-270 KB at R_PAD >= 32 with its 2: that tile takes dA in a separate kernel.


def da_fits(bn: int) -> bool:
    """Whether the fused backward can also reduce dA on tiles ``bn`` wide (else dA runs after it)."""
    return bn <= 128


def takes_da(bn: int, x: torch.Tensor) -> bool:
    """The fused backward reduces dA itself: the tile has room (:func:`da_fits`) and TMA can load X."""
    return da_fits(bn) and tma_ok(x)


def epi3_stages(stages: int, bm: int, bn: int, r_pad: int, with_da: bool) -> int:
    """Pipeline stages the fused backward (EPI 3) runs a tile config's ``stages`` with."""
    stages = min(stages, EPI3_MAX_STAGES)
    return min(stages, 2) if with_da and bm * bn >= 128 * 128 and r_pad >= 64 else stages


def split_store(variant: int, epi: int, bn: int) -> bool:
    """C stored in two half-width slices: variant 2, and the fused backward on 256-wide tiles (its
    B_cat and S_t tiles left no room for a whole 128x256 staging buffer: 240 KB with 2 stages)."""
    return variant == VARIANTS["tma_subtile"] or (epi == 3 and bn >= 256)


@triton.jit
def _tile_coords(tile, group, num_m, GROUP_M: tl.constexpr):
    """GROUP_M-swizzled (pid_m, pid_n) of linear tile ``tile`` (as the pointer kernel's grid)."""
    first_m = (tile // group) * GROUP_M
    gsize = tl.minimum(num_m - first_m, GROUP_M)
    return first_m + (tile % group) % gsize, (tile % group) // gsize


@triton.jit
def _lora_chunk(acc, e_ptr, f_ptr, escale_ptr, rm, rn, mm, mn, r0, R, s_em, s_er, s_fr, s_fn, ESCALE,
                RB: tl.constexpr, UPCAST: tl.constexpr):
    """acc + (E·diag(escale))[:, r0:r0+RB]·F[r0:r0+RB, :] for the tile's rows rm and columns rn."""
    rr1 = r0 + tl.arange(0, RB)
    mr = rr1 < R
    e = tl.load(e_ptr + rm[:, None] * s_em + rr1[None, :] * s_er, mask=mm[:, None] & mr[None, :], other=0.0)
    # ESCALE predicates the load (1.0 without it, an exact product) rather than branching around it
    sc1 = tl.load(escale_ptr + rr1, mask=mr & (ESCALE != 0), other=1.0)
    e = (e.to(tl.float32) * sc1[None, :]).to(f_ptr.dtype.element_ty)
    f = tl.load(f_ptr + rr1[:, None] * s_fr + rn[None, :] * s_fn, mask=mr[:, None] & mn[None, :], other=0.0)
    if UPCAST:
        e = e.to(tl.float32)
        f = f.to(tl.float32)
    return tl.dot(e, f, acc)


@triton.jit(do_not_specialize=["HAS_BIAS", "ESCALE", "CSCALE"])
def _gemm_tma_kernel(
    a_desc, b_desc, c_desc, g_desc, x_desc,
    bias_ptr, e_ptr, f_ptr, escale_ptr, s_ptr, cscale_ptr, db_ptr, st_ptr, stscale_ptr, da_ptr,
    M, N, K, R, RT, LO, NUM_PROGRAMS, HAS_BIAS, ESCALE, CSCALE,
    s_em, s_er, s_fr, s_fn, s_sm, s_sr, s_dbz, s_dbk, s_dbr, s_stm, s_str, s_daz, s_dar, s_dan,
    EPI: tl.constexpr, B_NK: tl.constexpr, SUBTILE: tl.constexpr, DB_PARTIAL: tl.constexpr, DA: tl.constexpr,
    R_PAD: tl.constexpr, RB: tl.constexpr, RT_PAD: tl.constexpr, UPCAST: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """C = A·B (+ LoRA) (+ bias), persistent over output tiles; A (M×K) by ``a_desc``, B by
    ``b_desc`` as N×K (``B_NK``: W of the forward) or K×N (W of dX), C (M×N) by ``c_desc``.

    EPI 0: plain GEMM. EPI 1: ``+ (E·diag(escale))·F``, E (M×R) and F (R×N) by pointers, in
    RB-wide rank chunks (unrolled up to R_PAD <= MAX_UNROLLED_R, else a runtime loop).
    EPI 2 (forward F1): ``S = A·Gᵀ`` alongside the K-loop (G = A_cat, R×K, by ``g_desc`` with
    R_PAD rows, zero-filled past R), then ``+ (S·diag(escale))·F``; the pid_n == 0 tile stores S.
    EPI 3 (the whole backward but dA, one read of dY): A = dY, B = W (K×N), so C = dX. Alongside
    the K-loop ``dS = (dY·G)·diag(escale)`` with G = B_cat zero-padded to R_PAD columns (K×R_PAD,
    by ``g_desc``: see :func:`rank_padded`), and ``dB[:, :RT] += dYᵀ·(S_t·diag(stscale))`` for
    the trainable slice S_t (M×RT, ``st_ptr``): every program computes its K-step's partial and
    the one whose pid_n is the K-step index mod the N-tile count adds it (fp32 atomics; computing
    it everywhere keeps the dY tile's shared-memory read out of a branch, see
    ``lora_group._ds_db_kernel``). ``DB_PARTIAL``: it stores it instead, into its M-tile's slice
    ``s_dbz`` apart, for an ordered sum after the kernel (deterministic mode). Epilogue ``+ dS·F`` with
    F = A_cat; the pid_n == 0 tile stores dS.
    EPI 3 with ``DA`` (the whole backward in one kernel): instead of storing dS, each tile adds
    ``dA[:, n-block] += (dS·diag(escale))[:, LO:LO+RT]ᵀ · X[m-block, n-block]`` (X, M×N, ``x_desc``:
    the forward's input, whose columns are dX's), computed as ``Xᵀ·dS`` (BN×R_PAD; the rank
    columns outside the trainable slice masked off), by fp32 atomics into ``da_ptr`` (RT×N), or
    with ``DB_PARTIAL`` stored into its M-tile's slice ``s_daz`` apart.
    """
    start = tl.program_id(0)
    num_m = tl.cdiv(M, BM)
    num_n = tl.cdiv(N, BN)
    k_tiles = tl.cdiv(K, BK)
    group = GROUP_M * num_n
    # The epilogue recomputes its tile from its own counter: with the loop flattened, values
    # carried from the prologue into the epilogue defeat the pipeliner (Triton tutorial 09).
    tile_c = start - NUM_PROGRAMS
    for tile in tl.range(start, num_m * num_n, NUM_PROGRAMS, flatten=True):
        pid_m, pid_n = _tile_coords(tile, group, num_m, GROUP_M)
        off_m = pid_m * BM
        off_n = pid_n * BN
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        if EPI >= 2:
            s_acc = tl.zeros((BM, R_PAD), dtype=tl.float32)
        if EPI == 3:  # this M-tile's rows of S_t·diag(stscale), rounded once as the dot input
            rt = tl.arange(0, RT_PAD)
            rm0 = off_m + tl.arange(0, BM)
            st = tl.load(st_ptr + rm0[:, None] * s_stm + rt[None, :] * s_str,
                         mask=(rm0[:, None] < M) & (rt[None, :] < RT), other=0.0)
            st_sc = tl.load(stscale_ptr + rt, mask=rt < RT, other=0.0)
            st = (st.to(tl.float32) * st_sc[None, :]).to(st_ptr.dtype.element_ty)
            if UPCAST:
                st = st.to(tl.float32)
        for ki in range(k_tiles):
            off_k = ki * BK
            a = a_desc.load([off_m, off_k])
            if B_NK:
                b = b_desc.load([off_n, off_k])
            else:
                b = b_desc.load([off_k, off_n])
            if UPCAST:  # bf16 dots are wrong in the interpreter
                a = a.to(tl.float32)
                b = b.to(tl.float32)
            if EPI == 3:  # dB's partial first: its result is needed at once (the atomics), so Triton
                # waits for the wgmma queue right after it; issued before the main dot, that wait
                # leaves this K-step's main and dS dots running under the atomics and the next
                # K-step's loads (issued after them, every K-step drained the queue: TTGIR pendings 0)
                part = tl.dot(tl.trans(a), st, tl.zeros((BK, RT_PAD), dtype=tl.float32))
            if B_NK:
                acc = tl.dot(a, b.T, acc)
            else:
                acc = tl.dot(a, b, acc)
            if EPI == 2:
                g = g_desc.load([0, off_k])
                if UPCAST:
                    g = g.to(tl.float32)
                s_acc = tl.dot(a, g.T, s_acc)
            if EPI == 3:
                kk = off_k + tl.arange(0, BK)
                mk = kk < K
                g = g_desc.load([off_k, 0])
                if UPCAST:
                    g = g.to(tl.float32)
                s_acc = tl.dot(a, g, s_acc)
                mine = (ki % num_n) == pid_n
                db_mask = (mk[:, None] & (rt[None, :] < RT)) & mine
                if DB_PARTIAL:  # deterministic: this M-tile's own slice of (M-tiles, K, RT) partials
                    tl.store(db_ptr + pid_m * s_dbz + kk[:, None] * s_dbk + rt[None, :] * s_dbr, part, mask=db_mask)
                else:
                    tl.atomic_add(db_ptr + kk[:, None] * s_dbk + rt[None, :] * s_dbr, part, mask=db_mask,
                                  sem="relaxed")

        tile_c += NUM_PROGRAMS
        pid_m, pid_n = _tile_coords(tile_c, group, num_m, GROUP_M)
        rm = pid_m * BM + tl.arange(0, BM)
        rn = pid_n * BN + tl.arange(0, BN)
        mm = rm < M
        mn = rn < N
        # The epilogue's small operands are all loaded first and none behind a branch (bias and
        # column scale predicated by their runtime flags), so their global round trips overlap: behind
        # `if HAS_BIAS` / `if CSCALE` and after the S store they ran one after another, every tile,
        # with the tensor cores idle (TTGIR of the real launches). S is stored after the LoRA dot:
        # with F loaded before that store, F's staging buffer took 16 KB more shared memory (237 KB
        # for EPI 3 at 128x128, over the limit).
        cs = tl.load(cscale_ptr + rn, mask=mn & (CSCALE != 0), other=1.0).to(tl.float32)
        bias = tl.load(bias_ptr + rn, mask=mn & (HAS_BIAS != 0), other=0.0).to(tl.float32)
        if EPI >= 2:
            rr = tl.arange(0, R_PAD)
            sc = tl.load(escale_ptr + rr, mask=rr < R, other=0.0)
            f = tl.load(f_ptr + rr[:, None] * s_fr + rn[None, :] * s_fn, mask=(rr[:, None] < R) & mn[None, :],
                        other=0.0)
            if DA:  # X's tile by TMA, straight into shared memory as the dA dot's operand (by pointers it
                # took 24 more registers). Triton waits on the copy at once, and F's staging store waits on
                # F before it, so this is a second round trip after the small loads'. Loaded at the tile
                # start instead, it was carried through the K-loop in registers (255, spills).
                x = x_desc.load([pid_m * BM, pid_n * BN])
            s_q = (s_acc * sc[None, :]).to(f_ptr.dtype.element_ty)  # round S once, as the dot input
            if UPCAST:
                acc = tl.dot(s_q.to(tl.float32), f.to(tl.float32), acc)
            else:
                acc = tl.dot(s_q, f, acc)
            if DA:  # dAᵀ's (BN, R_PAD) partial of this M-tile: its rank columns LO..LO+RT are dA's rows
                if UPCAST:
                    da_t = tl.dot(tl.trans(x.to(tl.float32)), s_q.to(tl.float32))
                else:
                    da_t = tl.dot(tl.trans(x), s_q)
                da_mask = mn[:, None] & (rr[None, :] >= LO) & (rr[None, :] < LO + RT)
                da_off = (rr[None, :] - LO) * s_dar + rn[:, None] * s_dan
                if DB_PARTIAL:
                    tl.store(da_ptr + pid_m * s_daz + da_off, da_t, mask=da_mask)
                else:
                    tl.atomic_add(da_ptr + da_off, da_t, mask=da_mask, sem="relaxed")
            elif pid_n == 0:  # S (forward, unscaled) or dS (backward, scaled) for the later kernels
                if EPI == 2:
                    s_out = s_acc.to(s_ptr.dtype.element_ty)
                else:
                    s_out = s_q.to(s_ptr.dtype.element_ty)
                tl.store(s_ptr + rm[:, None] * s_sm + rr[None, :] * s_sr, s_out, mask=mm[:, None] & (rr[None, :] < R))
        if EPI == 1:
            if R_PAD <= MAX_UNROLLED_R:  # unrolled, so the tile loop can flatten (a runtime loop here stops it)
                for r0 in tl.static_range(0, R_PAD, RB):
                    acc = _lora_chunk(acc, e_ptr, f_ptr, escale_ptr, rm, rn, mm, mn, r0, R, s_em, s_er, s_fr, s_fn,
                                      ESCALE, RB, UPCAST)
            else:  # 4+ unrolled chunks spill registers (ptxas): loop at run time, the tile loop unflattened
                for r0 in range(0, R, RB):
                    acc = _lora_chunk(acc, e_ptr, f_ptr, escale_ptr, rm, rn, mm, mn, r0, R, s_em, s_er, s_fr, s_fn,
                                      ESCALE, RB, UPCAST)
        acc = acc * cs[None, :] + bias[None, :]
        off_m = pid_m * BM
        off_n = pid_n * BN
        if SUBTILE:  # two (BM, BN/2) stores: half the staging buffer
            halves = tl.permute(tl.reshape(acc, (BM, 2, BN // 2)), (0, 2, 1))
            c0, c1 = tl.split(halves)
            c_desc.store([off_m, off_n], c0.to(c_desc.dtype))
            c_desc.store([off_m, off_n + BN // 2], c1.to(c_desc.dtype))
        else:
            c_desc.store([off_m, off_n], acc.to(c_desc.dtype))


# ----------------------------------------------------------------------------------------------
# host side

# TensorDescriptor's own __init__ re-validates alignment and block shape (3.4 µs each, 4 per GEMM
# call); :func:`usable` has checked the operands, so build the dataclass directly when its fields
# are the ones this code knows (else, on another Triton, take the validating constructor).
_DESC_FIELDS = ("base", "shape", "strides", "block_shape", "padding", "round_f32_to_tf32")
_FAST_DESC = tuple(f.name for f in dataclasses.fields(TensorDescriptor)) == _DESC_FIELDS


def _desc(t: torch.Tensor, shape: list, block: list) -> TensorDescriptor:
    """TMA descriptor of row-contiguous 2-D ``t`` viewed as ``shape``, loading ``block`` tiles."""
    strides = [t.stride(0), 1]
    if not _FAST_DESC:
        return TensorDescriptor(t, shape, strides, block)
    d = object.__new__(TensorDescriptor)
    d.base, d.shape, d.strides, d.block_shape, d.padding, d.round_f32_to_tf32 = t, shape, strides, block, "zero", False
    return d


def rank_padded(t: torch.Tensor, r_pad: int) -> torch.Tensor:
    """``t`` (n, r) as a row-contiguous (n, r_pad) tensor, zero past column r (``t`` itself when it
    already is one).

    A rank-minor operand (B_cat is d_out × R) loaded per K-step needs this: with R = 4 or 20 its rows
    are not 16-byte aligned and the rank mask splits every row, so the loads were 2-byte gathers the
    pipeliner could not prefetch (each K-step waited on memory; ``tests/test_kernels_launch_lora.py``).
    Padded, the tile is one TMA box; the zero columns add nothing to the dot."""
    if t.shape[1] == r_pad and t.stride(1) == 1 and (t.stride(0) == r_pad or t.shape[0] == 1):
        return t
    return torch.nn.functional.pad(t, (0, r_pad - t.shape[1])).contiguous()


def _pow2(n: int) -> int:
    """Rank tile: the next power of two >= max(n, 16) (lora_group uses this one too)."""
    return max(16, 1 << (max(int(n), 1) - 1).bit_length())


_PROGRAMS: dict = {}
# CTAs per SM of each compiled variant (registers and shared memory from its first launch), keyed
# by what selects the binary: device, tile config, roles, dtype
_OCCUPANCY: dict = {}
SM90_REGS, SM90_SMEM = 65536, 233472  # per SM: registers, shared memory (228 KB)


def occupancy(n_regs: int, shared: int, warps: int, regs_per_sm: int = SM90_REGS, smem_per_sm: int = SM90_SMEM,
              max_warps: int = 64, max_ctas: int = 32) -> int:
    """CTAs of one kernel an SM holds at once (sm_90 defaults: 64K registers, 228 KB of shared memory
    with 1 KB reserved per CTA, 64 warps). Registers are allocated per warp in units of 256.

    The persistent grid is this many programs per SM: a 4-warp tile using under half the register
    file and shared memory runs two CTAs, so one's epilogue overlaps the other's main loop (one per SM
    left half of such an SM idle; 8-warp tiles use more than half the registers and stay at one)."""
    per_warp = -(-max(n_regs, 1) * 32 // 256) * 256
    by_regs = regs_per_sm // (per_warp * warps)
    by_smem = smem_per_sm // (shared + 1024)
    return max(1, min(by_regs, by_smem, max_warps // warps, max_ctas))


def _programs(device: torch.device) -> int:
    """One program per SM (cached per device); a few in the interpreter, so each walks tiles."""
    if INTERPRET or device.type != "cuda":
        return INTERP_PROGRAMS
    n = _PROGRAMS.get(device.index)
    if n is None:
        n = _PROGRAMS[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return n


def tma_ok(t: torch.Tensor) -> bool:
    """TMA can address ``t``: 2-D, row-contiguous, 16-byte aligned base and row stride."""
    st = t.stride()  # one call, not dim() + two stride(i): this runs for 4-6 tensors per GEMM call
    return len(st) == 2 and st[1] == 1 and (st[0] * t.element_size()) % 16 == 0 and t.data_ptr() % 16 == 0


_CAPABLE: dict = {}


# The kernel is built and gated for Hopper (sm_90: wgmma, 227 KB of shared memory a block). Others
# run the pointer kernel: sm_100 (B200), where Triton 3.7.1 fails to compile every role of it (the
# TritonGPUHoistTMEMAlloc pass; launch-faithful compile, while the pointer kernel compiles), and
# sm_120 (RTX 50xx), which has TMA but 99 KB a block, less than most TILES need.
MIN_BLOCK_SMEM = 200 * 1024


def available(device: torch.device) -> bool:
    """This kernel can run on ``device``: the interpreter, or a Hopper GPU (sm_90, TMA) with the
    shared memory its tiles are sized for (:data:`MIN_BLOCK_SMEM`)."""
    if INTERPRET:
        return True
    if device.type != "cuda" or torch.version.hip is not None:  # (MI300 reports major 9 too)
        return False
    ok = _CAPABLE.get(device.index)
    if ok is None:
        props = torch.cuda.get_device_properties(device)
        smem = getattr(props, "shared_memory_per_block_optin", SM90_SMEM)
        ok = _CAPABLE[device.index] = props.major == 9 and smem >= MIN_BLOCK_SMEM
    return ok


def usable(a, b, c, g=None) -> bool:
    """Every TMA operand fits (dtype, layout, not empty: a descriptor needs positive sizes), on a
    device that has TMA."""
    if a.dtype not in TMA_DTYPES or not available(a.device):
        return False
    for t in (a, b, c) if g is None else (a, b, c, g):  # (a loop: all() over a generator costs µs here)
        if not (t.numel() and tma_ok(t)):
            return False
    return True


def gemm(a, b, c, *, b_nk: bool, M, N, K, cfg, variant, upcast, bias=None, g=None, e=None, f=None,
         escale=None, s=None, cscale=None, epi=1, r=0, se=None, sf=None, db=None, st=None, stscale=None,
         db_partial=False, x=None, da=None, lo=0):
    """Launch :func:`_gemm_tma_kernel`. ``b`` is the tensor itself, (N, K) if ``b_nk`` else
    (K, N); ``cfg`` = (BM, BN, BK, GROUP_M, warps, stages); ``variant`` 1 or 2 (:data:`VARIANTS`).
    EPI 3 (see the kernel): ``g`` = B_cat (K, R; padded here by :func:`rank_padded`), ``db`` a
    zeroed fp32 (K, RT) accumulator, or with ``db_partial`` an fp32 (cdiv(M, BM), K, RT) buffer of
    per-M-tile partials (every element is written), ``st`` = S[:, lo:hi] (M, RT), ``stscale`` its
    rank scales. With ``x`` (M, N: the forward's input) and ``da`` (EPI 3 only) the kernel also
    reduces dA of rank rows [lo, lo + RT) into ``da``: zeroed fp32 (RT, N), or with ``db_partial``
    (cdiv(M, BM), RT, N), every element written; it then stores no dS. Callers check :func:`usable`
    first."""
    bm, bn, bk, gm, warps, stages = cfg
    if r == 0:
        epi = 0
    r_pad = _pow2(r)
    with_da = epi == 3 and da is not None
    if with_da and not takes_da(bn, x):
        raise ValueError(f"the fused backward takes dA on tiles up to 128 wide (not {bn}: lora_tma.da_fits), "
                         "with X TMA-addressable (lora_tma.tma_ok)")
    if epi == 3:
        stages = epi3_stages(stages, bm, bn, r_pad, with_da)
    subtile = split_store(variant, epi, bn)
    a_desc = _desc(a, [M, K], [bm, bk])
    b_desc = _desc(b, [N, K], [bn, bk]) if b_nk else _desc(b, [K, N], [bk, bn])
    c_desc = _desc(c, [M, N], [bm, bn // 2 if subtile else bn])
    if epi == 2:  # A_cat (R, K): TMA zero-fills the rows past R
        g_desc = _desc(g, [r, K], [r_pad, bk])
    elif epi == 3:  # B_cat (K, R) -> (K, R_PAD), a whole rank tile per box
        g_desc = _desc(rank_padded(g, r_pad), [K, r_pad], [bk, r_pad])
    else:
        g_desc = None
    rt = st.shape[1] if epi == 3 else 0
    rt_pad, db_partial = _pow2(rt), bool(db_partial) and epi == 3
    dummy = c
    tiles = -(-M // bm) * -(-N // bn)
    variant_key = (a.device, a.dtype, tuple(cfg), epi, b_nk, subtile, db_partial, with_da, r_pad, rt_pad, upcast)
    programs = min(_programs(a.device) * _OCCUPANCY.get(variant_key, 1), tiles)
    x_desc = _desc(x, [M, N], [bm, bn]) if with_da else None
    kernel = _gemm_tma_kernel[(programs,)](
        a_desc, b_desc, c_desc, g_desc, x_desc,
        bias if bias is not None else dummy, e if e is not None else dummy, f if f is not None else dummy,
        escale if escale is not None else dummy, s if s is not None else dummy,
        cscale if cscale is not None else dummy, db if epi == 3 else dummy,
        st if epi == 3 else dummy, stscale if epi == 3 else dummy, da if with_da else dummy,
        M, N, K, r, rt, lo if with_da else 0, programs, int(bias is not None), int(escale is not None and epi == 1),
        int(cscale is not None),
        *(se or (0, 0)), *(sf or (0, 0)), *(s.stride() if s is not None and not with_da else (0, 0)),
        *((db.stride() if db_partial else (0, *db.stride())) if epi == 3 else (0, 0, 0)),
        *(st.stride() if epi == 3 else (0, 0)),
        *((da.stride() if db_partial else (0, *da.stride())) if with_da else (0, 0, 0)),
        EPI=epi, B_NK=bool(b_nk), SUBTILE=subtile, DB_PARTIAL=db_partial, DA=with_da, R_PAD=r_pad,
        RB=min(RB_MAX, r_pad), RT_PAD=rt_pad, UPCAST=upcast,
        BM=bm, BN=bn, BK=bk, GROUP_M=gm, num_warps=warps, num_stages=stages)
    if variant_key not in _OCCUPANCY and not INTERPRET:  # first launch of this binary: size later grids
        _OCCUPANCY[variant_key] = _measured_occupancy(kernel, warps, a.device)


def _measured_occupancy(kernel, warps: int, device: torch.device) -> int:
    """CTAs per SM of a launched Triton kernel (1 when its handles or the device's limits are unknown)."""
    n_regs, shared = getattr(kernel, "n_regs", None), getattr(getattr(kernel, "metadata", None), "shared", None)
    if not n_regs or shared is None:
        return 1
    props = torch.cuda.get_device_properties(device)
    return occupancy(n_regs, shared, warps, getattr(props, "regs_per_multiprocessor", SM90_REGS),
                     getattr(props, "shared_memory_per_multiprocessor", SM90_SMEM))


def gpu_launch_cases(dtype: str = "bf16") -> list:
    """The launch variants the AOT compile gate builds for sm_90 (tests/test_kernels_compile_lora.py):
    ``(jit_fn, arg types, constexprs, num_warps, num_stages)``; arg types name every ``*_desc``
    (``tensordesc<dtype[block]>``) and the fp32 pointers, other pointers take ``dtype``.

    Per tile of :data:`TILES`: the fused forward and the fused backward (EPI 3, also its
    deterministic variant, and the one reducing dA too) at the largest rank tiles (R_PAD = RT_PAD =
    64), the split forward and
    dX with the largest unrolled epilogue (R_PAD 64) and with the runtime rank loop (R_PAD 128, the
    code of every larger R); with split stores (which change only the store, and need less shared
    memory) the fused forward and backward, the roles with the most shared memory. The plain GEMM
    (benchmarks only) with the two fixed tiles of ``lora_group.main_config``. Smaller R_PAD only
    shorten the same code.
    """
    from ril_fast.kernels.lora_group import _GPU_MAIN

    roles = {VARIANTS["tma"]: ((2, True, 64), (1, True, 64), (1, False, 64), (1, True, 128), (1, False, 128),
                               (3, False, 64)),
             VARIANTS["tma_subtile"]: ((2, True, 64), (3, False, 64))}
    cases = []
    for variant, role in roles.items():
        for bm, bn, bk, gm, warps, stages in TILES:
            plain = ((0, False, 16),) if variant == 1 and (bm, bn, bk, gm, warps, stages) in _GPU_MAIN else ()
            for epi, b_nk, r_pad in role + plain:
                types = {"a_desc": f"tensordesc<{dtype}[{bm}, {bk}]>",
                         "b_desc": f"tensordesc<{dtype}[{bn}, {bk}]>" if b_nk else f"tensordesc<{dtype}[{bk}, {bn}]>",
                         "c_desc": f"tensordesc<{dtype}[{bm}, {bn // 2 if split_store(variant, epi, bn) else bn}]>",
                         "escale_ptr": "fp32", "cscale_ptr": "fp32", "db_ptr": "fp32", "stscale_ptr": "fp32",
                         "da_ptr": "fp32"}
                cx = dict(EPI=epi, B_NK=b_nk, SUBTILE=split_store(variant, epi, bn), DB_PARTIAL=False, DA=False,
                          R_PAD=r_pad,
                          RB=min(RB_MAX, r_pad),
                          RT_PAD=r_pad if epi == 3 else 16, UPCAST=False, BM=bm, BN=bn, BK=bk, GROUP_M=gm)
                if epi == 2:
                    types["g_desc"] = f"tensordesc<{dtype}[{r_pad}, {bk}]>"
                elif epi == 3:
                    types["g_desc"] = f"tensordesc<{dtype}[{bk}, {r_pad}]>"
                else:
                    cx["g_desc"] = None
                case = (_gemm_tma_kernel, types, dict(cx, x_desc=None),
                        warps, epi3_stages(stages, bm, bn, r_pad, False) if epi == 3 else stages)
                if case not in cases:  # EPI 3's stage cap makes two 128x128 tiles one kernel
                    cases.append(case)
                if epi == 3 and variant == 1:  # deterministic (dB partials stored); with dA where it fits
                    # (the launch gate also builds dA with partials stored, at real shapes)
                    more = [(_gemm_tma_kernel, types, dict(case[2], DB_PARTIAL=True), warps, case[4])]
                    if da_fits(bn):
                        more.append((_gemm_tma_kernel, dict(types, x_desc=f"tensordesc<{dtype}[{bm}, {bn}]>"),
                                     dict(cx, DA=True), warps, epi3_stages(stages, bm, bn, r_pad, True)))
                    cases += [c for c in more if c not in cases]
    return cases
