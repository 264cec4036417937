"""Launch-faithful compile gate of the LoRA kernels: what the op launches on an H100/H200 for real
layer shapes compiles for sm_90 with pipelined K-loops (no synchronous loads, the wgmma queue not
drained where the design does not need it), within shared memory, without spills.

The AOT gate (``test_kernels_compile_lora.py``) builds every tile and role from generic
signatures. This one runs the op's own launchers (``lora_group.fwd_launch`` ...) on CPU tensors
of SD 1.5 / SDXL layer shapes, records each kernel launch instead of running it, and compiles
the record with the specialisation Triton's launcher gives it (``launch_capture``). Then it reads
the K-loop of each kernel in the TTGIR: a synchronous ``tt.load`` left there is an operand the
pipeliner could not prefetch, so every K-step waits a global-memory round trip. That is a GPU
speed defect the interpreter tests cannot see (it is how a rank-minor ``B_cat`` load at R = 4 or
20 was found: 2-byte loads under a rank mask, never copied asynchronously).

It also builds the untuned pointer-kernel launches for sm_86 and sm_120 and checks that they fit the
99 KB of shared memory a consumer GPU (RTX 3090 / 4090 / 5090) gives a block, with pipelined K-loops, and for
sm_100 (B200) that they compile.
"""

from __future__ import annotations

import contextlib
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aot_gate import fresh_triton_cache, print_report, run_worker  # noqa: E402

pytestmark = pytest.mark.compile_gate  # run last, compiled in the background meanwhile (conftest)

SMEM_LIMIT = 227 * 1024
# ptxas spill stores (bytes per thread) allowed: specialised launches spill 0 but for the
# 128x256 tile (a few bytes); the generic gate's figures run to ~1.2 KB.
SPILL_LIMIT = 64
# (M, d_in, d_out): SDXL self-attention and feed-forward at 64x64 latents (M = 4096 tokens), SD 1.5
# self-attention, and a cross-attention key projection (77-token prompts x 2: M not a multiple of 16)
SHAPES = {"sdxl-attn": (4096, 640, 640), "sdxl-ff-in": (4096, 640, 5120), "sdxl-ff-out": (4096, 2560, 640),
          "sd15-attn": (4096, 320, 320), "xattn-kv": (154, 2048, 640)}
# stacked ranks: one r = 4 adapter, r 4 + 16, r 16, four r 16, r 32 x 3 (split forward, runtime rank loop)
RANKS = {"sdxl-attn": (4, 20, 16, 64, 96), "sdxl-ff-in": (4, 16), "sdxl-ff-out": (4, 20), "sd15-attn": (4, 64),
         "xattn-kv": (4, 20)}
# TMA kernel tiles (lora_tma.TILES, run as variant 1): 128x128 everywhere; 128x64 with 3 stages,
# the tile sized for two CTAs per SM, at the SDXL attention shape
TMA_TILES = {"tma": (128, 128, 64, 8, 8, 3), "tma2cta": (128, 64, 64, 8, 4, 3)}
# source lines of each kernel's K-loop: the TMA kernel's is its flattened tile loop, or its inner
# K-loop where the tile loop stays nested (the runtime rank loop of EPI 1 above R_PAD 64)
K_LOOPS = {"_gemm_tma_kernel": ("for tile in tl.range(", "for ki in range(k_tiles)"),
           "_gemm_kernel": ("for k0 in range(k_lo, k_hi, BK)",), "_ds_db_kernel": ("for n0 in range(n_lo, n_hi, BN)",)}


def _roles(M, d_in, d_out, R, tma_tags=("tma",)):
    """(role, thunk) pairs: every launcher of the op with pointer and TMA tiles (``tma_tags`` of
    :data:`TMA_TILES`), both modes of the backward (atomics, deterministic). Thunks run on CPU
    tensors under ``recording``; the tensors are made by the first thunk, so listing the roles (test
    ids at collection) allocates nothing."""
    import functools
    from types import SimpleNamespace

    import torch

    from ril_fast.kernels import lora_group as lg

    @functools.cache
    def t():
        dt, e = torch.bfloat16, torch.empty
        return SimpleNamespace(x=e(M, d_in, dtype=dt), w=e(d_out, d_in, dtype=dt), bias=e(d_out, dtype=dt),
                               a=e(R, d_in, dtype=dt), b=e(d_out, R, dtype=dt), sc=torch.ones(R),
                               s=e(M, R, dtype=dt), dy=e(M, d_out, dtype=dt))

    lo = R - 16 if R > 16 else 0  # the newest adapter trains: the last 16 ranks (or all)
    roles = []
    for tag, cfg in (("ptr", None), *((tg, (*TMA_TILES[tg], 1)) for tg in tma_tags)):
        if R <= lg.MAX_FUSED_R:
            roles.append((f"fwd-fused-{tag}", lambda cfg=cfg: lg.fwd_launch(t().x, t().w, t().bias, t().a, t().b,
                                                                            t().sc, 2, cfg)))
        roles.append((f"fwd-split-{tag}", lambda cfg=cfg: lg.fwd_launch(t().x, t().w, t().bias, t().a, t().b,
                                                                        t().sc, 1, cfg)))
        roles.append((f"dx-{tag}", lambda cfg=cfg: lg.dx_launch(t().dy, t().w, t().s, t().a, cfg)))
    for det in (False, True):
        roles.append((f"ds-db-det{int(det)}", lambda det=det: lg.ds_db_launch(t().dy, t().b, t().s, t().sc, lo, R,
                                                                              det)))
        roles.append((f"da-det{int(det)}", lambda det=det: lg.da_launch(t().s, t().x, lo, R, det)))
        for tg in tma_tags if R <= lg.MAX_FUSED_R else ():
            roles.append((f"bwd-fused-{tg}-det{int(det)}", lambda det=det, tma=(*TMA_TILES[tg], 1): lg.dx_ds_db_launch(
                t().dy, t().w, t().a, t().b, t().s, t().sc, lo, R, torch.zeros(d_out, R - lo), tma, det)))
            roles.append((f"bwd-fused-da-{tg}-det{int(det)}", lambda det=det, tma=(*TMA_TILES[tg], 1):
                          lg.dx_ds_db_launch(t().dy, t().w, t().a, t().b, t().s, t().sc, lo, R,
                                             torch.zeros(d_out, R - lo), tma, det, x=t().x,
                                             da=torch.zeros(R - lo, d_in))))
    return roles


def _cases():
    """(case id, shape, R, TMA tile tags)."""
    return [(f"{name}-R{R}", SHAPES[name], R, tuple(TMA_TILES) if name == "sdxl-attn" else ("tma",))
            for name in SHAPES for R in RANKS[name]]


def _record():
    """{case-role: [launch key, ...]} and {launch key: (fn, args, kwargs)}, recorded on CPU."""
    from launch_capture import launch_key, recording

    roles, launches = {}, {}
    for case, shape, R, tags in _cases():
        for role, thunk in _roles(*shape, R, tags):
            with recording() as rec:
                thunk()
            keys = []
            for fn, args, kwargs in rec:
                key = launch_key(fn, args, kwargs)
                launches.setdefault(key, (fn, args, kwargs))
                keys.append(key)
            roles[f"{case}-{role}"] = keys
    return roles, launches


# d_in = d_out of the consumer-GPU check: one per fixed tile size of lora_group.main_config
CONSUMER_DIMS = (640, 1280)
CONSUMER_CCS = (86, 120)  # RTX 30xx (sm_86; the 40xx's sm_89 taken to behave alike) and RTX 50xx


@contextlib.contextmanager
def _host_for(lg, cc: int):
    """The host side as on an sm_<cc> GPU: the product's own rule for it (``lora_group.needs_dy_twice``),
    so a rule that picked the wrong dS/dB variant for a GPU fails its pipelining check here."""
    saved = lg._dy_twice
    lg._dy_twice = lambda device: lg.needs_dy_twice(cc // 10)
    try:
        yield
    finally:
        lg._dy_twice = saved


def _record_consumer(cc: int = 86):
    """The untuned pointer-kernel launches (:func:`_roles` without TMA tiles, atomics mode), keyed
    "sm<cc>|..." so that :func:`_compile_one` builds them for ``sm_<cc>``: ({"sm<cc>-d<d>-R<R>":
    [key, ...]}, {key: launch}), as the host makes them for that GPU. sm_86 and sm_120 (RTX 30xx/40xx
    and 50xx): at R 64 (the largest rank tile of the fused forward) and R 4 (rank-minor operands
    narrower than a 16-byte vector). sm_100 (B200, which runs the pointer kernel too:
    ``lora_tma.available``): at R 64."""
    from launch_capture import launch_key, recording

    from ril_fast.kernels import lora_group as lg

    roles, launches = {}, {}
    for d, R in ((d, R) for d in CONSUMER_DIMS for R in ((64,) if cc == 100 else (4, 64))):
        with recording() as rec, _host_for(lg, cc):
            for role, thunk in _roles(4096, d, d, R, tma_tags=()):
                if not role.endswith("det1"):
                    thunk()
        keys = [f"sm{cc}|" + launch_key(*r) for r in rec]
        launches.update(zip(keys, rec))
        roles[f"sm{cc}-d{d}-R{R}"] = keys
    return roles, launches


def _compile_one(key):
    from launch_capture import compile_launch, k_loop, k_loop_tmem, source_line

    from ril_fast.kernels import lora_tma

    fn, args, kwargs = _LAUNCHES[key]
    try:
        ck, log = compile_launch(fn, args, kwargs, cc=int(key.split("|")[0][2:]) if key.startswith("sm") else 90)
    except Exception as exc:  # reported per role by the test
        return key, {"error": f"{type(exc).__name__}: {exc}"[:2000]}
    if key.startswith("sm100|"):  # (its accumulators live in tensor memory: k_loop_tmem)
        return key, {"kernel": fn.__name__, "shared": ck.metadata.shared,
                     "k_loop": k_loop_tmem(ck.asm["ttgir"], [source_line(fn, t) for t in K_LOOPS[fn.__name__]])}
    if key.startswith(("sm86|", "sm120|")):
        return key, {"kernel": fn.__name__, "shared": ck.metadata.shared,
                     "k_loop": k_loop(ck.asm["ttgir"], [source_line(fn, t) for t in K_LOOPS[fn.__name__]],
                                      wgmma=False)}
    spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log)]
    # dB's partial dot feeds atomics at once, so the fused backward (EPI 3) and the dS/dB kernel with
    # dB drain the wgmma queue every K-step by design (their main dots are issued after that wait)
    drains = kwargs.get("EPI") == 3 or bool(kwargs.get("NEED_DB"))
    regs = [int(n) for n in re.findall(r"Used (\d+) registers", log)]
    ctas = lora_tma.occupancy(max(regs), ck.metadata.shared, kwargs["num_warps"]) if regs else None
    return key, {"kernel": fn.__name__, "shared": ck.metadata.shared, "spill_stores": max(spills) if spills else None,
                 "registers": max(regs) if regs else None, "ctas_per_sm": ctas, "drains_by_design": drains,
                 "k_loop": k_loop(ck.asm["ttgir"], [source_line(fn, t) for t in K_LOOPS[fn.__name__]])}


_LAUNCHES: dict = {}  # filled by the worker before its pool forks


def _worker():
    import contextlib
    import io
    import json

    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    roles, launches = _record()
    for cc in CONSUMER_CCS + (100,):
        more_roles, more_launches = _record_consumer(cc)
        roles.update(more_roles)
        launches.update(more_launches)
    _LAUNCHES.update(launches)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), fresh_triton_cache("ril_fast_launch_gate_"):
        print_report(_compile_one, sorted(launches))
    compiled = json.loads(out.getvalue().strip().splitlines()[-1])
    print(json.dumps({role: [dict(compiled[k], key=k[:200]) for k in keys] for role, keys in roles.items()}))


@pytest.fixture(scope="module")
def report():
    return run_worker(__file__, timeout=900)


def _role_ids():
    return [f"{case}-{role}" for case, shape, R, tags in _cases() for role, _ in _roles(*shape, R, tags)]


# The 128x64 3-stage tile exists to run two CTAs per SM; at R_PAD 16 every role does (94-113 KB,
# 137-164 registers). Larger rank tiles may not (R 20 fused backward: 123 KB; R 64: 123-135 KB).
# Not the fused backward with dA: X's tile and dS staged for the dA dot take it to 131 KB at R 16.
TWO_CTAS = ("sdxl-attn-R4-", "sdxl-attn-R16-")

# Known misses, each a strict xfail: fixing one fails its test until it leaves this list.
# M = 154 (two 77-token prompts) is not a multiple of 16: the reductions over M (dA, the
# deterministic dB) mask the K tail along the rank slice's contiguous axis in either layout, so
# their loads of it stay 2-byte and synchronous (lora_group._rank_slice). Tiny layers.
KNOWN = {f"xattn-kv-R{r}-{role}": "M = 154: the rank slice's loads cannot vectorise (K-tail mask)"
         for r in (4, 20) for role in ("da-det0", "da-det1", "ds-db-det1")}


def _params():
    return [pytest.param(i, marks=pytest.mark.xfail(strict=True, reason=KNOWN[i])) if i in KNOWN else i
            for i in _role_ids()]


def test_k_loop_reader_on_synthetic_ttgir():
    """The reader finds the loop by its source line (through named locations), tells a pipelined
    K-loop (waits, then prefetches) from one issuing and waiting on its copies in one iteration,
    and reports synchronous loads and the wgmma waits."""
    from launch_capture import k_loop

    def ir(body, carried="tensor<128x128xf32, #mma>"):
        return ("    %r:2 = scf.for %i = %c0 to %n step %c1 iter_args(%x = %z, %y = %a0) -> "
                f"(i32, {carried}) : i32 {{\n"
                + "".join(f"      {t}\n" for t in body) + "    } loc(#loc7)\n"
                '#loc3 = loc("/src/k.py":12:4)\n#loc7 = loc("tile_c"(#loc3))\n')
    dot = "%a = ttng.warp_group_dot %p, %q, %c {isAsync = true} : !ttg.memdesc<128x64xbf16> * !ttg.memdesc<64x128xbf16>"
    wait = "ttng.wait_barrier %b, %ph : !ttg.memdesc<1xi64>"
    copy = "ttng.async_tma_copy_global_to_local %d[%m, %k] %s, %b, %t : !tt.tensordesc<tensor<128x64xbf16>>"
    drain = "%w:3 = ttng.warp_group_dot_wait %a, %p, %q {pendings = 1 : i32} : tensor<128x128xf32>"
    good = k_loop(ir([wait, dot, drain, copy]), [12])
    assert good == {"loops": 1, "pipelined": True, "sync_loads": [], "wgmma_waits": [1]}
    assert not k_loop(ir([copy, wait, dot, drain]), [12])["pipelined"]  # loaded and waited in one iteration
    load = "%g = tt.load %gp, %gm, %z : tensor<64x16x!tt.ptr<bf16>>"
    assert k_loop(ir([wait, load, dot, drain, copy]), [12])["sync_loads"] == [load]
    assert k_loop(ir([wait, dot, copy]), [13])["loops"] == 0  # another source line
    epilogue_only = dot.replace(": !ttg.memdesc<128x64xbf16>", ": tensor<128x16xbf16>")  # A from registers
    assert k_loop(ir([load, epilogue_only]), [12]) == {"loops": 1, "pipelined": False, "sync_loads": [],
                                                       "wgmma_waits": []}
    # the K = 0 copy of a flattened loop carries no accumulator, even where an epilogue dot reads
    # shared memory (the fused backward's dA)
    assert k_loop(ir([load, dot], carried="!ttg.async.token"), [12])["sync_loads"] == []


def test_known_misses_name_real_roles():
    assert set(KNOWN) <= set(_role_ids())


# Opt-in shared memory per block of sm_86 / sm_89 / sm_120 (RTX 3090 / 4090 / 5090, A10, L4, L40):
# the 24-32 GB cards the product targets. (sm_80: 163 KB; sm_90: 227 KB.)
CONSUMER_SMEM = 101376


@pytest.mark.parametrize("R", [4, 64])
@pytest.mark.parametrize("d", CONSUMER_DIMS)
@pytest.mark.parametrize("cc", CONSUMER_CCS)
def test_untuned_launches_fit_a_consumer_gpu(report, cc, d, R):
    """Where no tuning table exists (any GPU but the ones we tuned), the op runs the pointer kernels
    with fixed tiles. Each of their launches (at R 64, the largest rank tile of the fused forward,
    and R 4) must fit the 99 KB of shared memory an sm_86 / sm_89 / sm_120 block gets, or the op
    would raise OutOfResources on those cards, and keep its K-loop pipelined with no synchronous load
    (launch-faithful compiles; the dS/dB kernel loads dY twice there for that: on sm_120 the single
    load left one synchronous load per K-step until the rule named sm_12x)."""
    launches = report[f"sm{cc}-d{d}-R{R}"]
    assert len(launches) == 6 and {g["kernel"] for g in launches} == {"_gemm_kernel", "_ds_db_kernel"}
    for got in launches:
        assert "error" not in got, got.get("error")
        assert got["shared"] <= CONSUMER_SMEM, got
        loop = got["k_loop"]
        assert loop["pipelined"] and not loop["sync_loads"], (got["kernel"], got["key"], loop)


@pytest.mark.parametrize("d", CONSUMER_DIMS)
def test_untuned_launches_compile_for_blackwell(report, d):
    """A B200 (sm_100) runs the pointer kernels too (Triton 3.7.1 cannot compile the TMA kernel for
    it: ``lora_tma.available``): each untuned launch at R 64 compiles for sm_100 within 227 KB, its
    K-loop pipelined around tcgen05 MMAs with no synchronous load (the dS/dB kernel with one dY
    load, as ``lora_group.needs_dy_twice`` gives sm_10x)."""
    launches = report[f"sm100-d{d}-R64"]
    assert len(launches) == 6 and {g["kernel"] for g in launches} == {"_gemm_kernel", "_ds_db_kernel"}
    for got in launches:
        assert "error" not in got, got.get("error")
        assert got["shared"] <= SMEM_LIMIT, got
        loop = got["k_loop"]
        assert loop["loops"] and loop["pipelined"] and not loop["sync_loads"] and loop["tcgen05_mma"], loop


@pytest.mark.parametrize("role_id", _params())
def test_launch_compiles_pipelined(report, role_id):
    launches = report[role_id]
    assert launches, "the launcher recorded no kernel launch"
    for got in launches:
        assert "error" not in got, got.get("error")
        assert got["shared"] <= SMEM_LIMIT, f"{got['kernel']}: {got['shared']} B shared memory"
        assert got["spill_stores"] is not None, "no ptxas report: was this launch compiled twice?"
        assert got["spill_stores"] <= SPILL_LIMIT, f"{got['kernel']}: {got['spill_stores']} B of register spills"
        loop = got["k_loop"]
        assert loop["pipelined"], f"{got['kernel']}: K-loop not pipelined ({loop})"
        assert not loop["sync_loads"], f"{got['kernel']}: synchronous loads in the K-loop: {loop['sync_loads']}"
        assert loop["wgmma_waits"], f"{got['kernel']}: no wgmma wait in the K-loop ({loop})"
        if not got["drains_by_design"]:  # the previous K-step's MMA stays in flight
            assert min(loop["wgmma_waits"]) >= 1, f"{got['kernel']}: K-loop drains the wgmma queue ({loop})"
        if ("tma2cta" in role_id and role_id.startswith(TWO_CTAS) and "fused-da" not in role_id
                and got["kernel"] == "_gemm_tma_kernel"):
            assert got["ctas_per_sm"] >= 2, f"two-CTA tile fits once: {got['registers']} registers, {got['shared']} B"


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
