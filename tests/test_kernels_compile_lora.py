"""AOT compile gate: every LoRA kernel configuration the GPU path may launch compiles to a cubin
for sm_90 (a representative subset also for sm_80, one GEMM for sm_75) on this CPU-only machine (the
interpreter accepts shapes the GPU rejects, e.g. ``tl.dot`` with K < 16, and never checks shared
memory).

Compilation needs real JIT functions, which ``TRITON_INTERPRET=1`` (set by conftest) replaces,
so one worker subprocess without the interpreter compiles every case and reports per case. The
gate also scans each kernel's TTGIR for shared-memory reads inside a branch of a pipelined loop,
the pattern that made dB wrong on GPU only (see ``_ds_db_kernel``).
"""

from __future__ import annotations

import contextlib
import io
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aot_gate import fresh_triton_cache, print_report, run_worker, signature  # noqa: E402

pytestmark = pytest.mark.compile_gate  # run last, compiled in the background meanwhile (conftest)

SMEM_LIMIT = {75: 64 * 1024, 80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block
# Register spill stores (bytes per thread, ptxas -v) allowed in a TMA kernel case. The gate compiles
# without the launch-time specialisation (unit strides, 16-divisible sizes), which costs registers:
# its cases spill up to ~0.5 KB here (triton 3.7) and ~1.2 KB (EPI 3, triton 3.6), while the rank
# epilogue fully unrolled to R_PAD 512 spilled 2.6-5.3 KB: the kind of regression this catches.
TMA_SPILL_LIMIT = 1536
CCS = (80, 90)


def _cases():
    from ril_fast.kernels import lora_group, lora_tma

    out = [(f"bf16-{i}", "bf16", c) for i, c in enumerate(lora_group.gpu_launch_cases("bf16"))]
    # fp16 shares bf16's code shape; fp32 switches the dots to IEEE
    cases = lora_group.gpu_launch_cases("fp32")
    out += [("fp32-gemm", "fp32", cases[0]), ("fp32-fused", "fp32", cases[len(lora_group.GEMM_CANDIDATES)])]
    out += [("fp32-dsdb", "fp32", next(c for c in cases if c[0].__name__ == "_ds_db_kernel"))]
    # the persistent TMA GEMM (sm_90+ only; 16-bit I/O, fp16 shares bf16's code shape)
    out += [(f"tma-bf16-{i}", "bf16", c) for i, c in enumerate(lora_tma.gpu_launch_cases("bf16"))]
    return out


def _ccs(case):
    """sm_90 for every variant; sm_80 for a representative subset (keeps the cold gate < 90 s); the
    TMA kernel only for sm_90 (the op never selects it below)."""
    fn, _, cx = case[2][0], case[2][1], case[2][2]
    if case[0] == "bf16-0":  # also sm_75 (T4): why auto keeps the GEMM op off Triton below sm_80
        return (75, 90)
    if fn.__name__ == "_gemm_tma_kernel":
        return (90,)
    if fn.__name__ == "_ds_db_kernel" and cx["DY_TWICE"]:  # the dS/dB variant sm_8x runs
        return (80,)
    rep = case[1] == "bf16" and (
        (fn.__name__ == "_gemm_kernel" and cx["EPI"] == 2 and cx["R_PAD"] == 64 and cx["BN"] == 128)
        or (fn.__name__ == "_ds_db_kernel" and cx["R_PAD"] == 128 and cx["NEED_DB"]))
    return CCS if rep else (90,)


def smem_reads_in_branch(ttgir: str) -> list:
    """Lines where a shared-memory read sits in an ``scf.if`` nested in an ``scf.for``.

    The pipeliner refills a loop's shared-memory slots without seeing reads inside a branch:
    such a read can see the next tiles (the GPU-only dB bug, invisible to the interpreter). Reads
    of a write-once buffer (``ttg.local_alloc %value``: a register tile staged through shared
    memory for a dot, as the TMA kernel's epilogue does) are not pipeline slots and pass."""
    stack, bad, staged = [], [], set()
    for n, line in enumerate(ttgir.splitlines()):
        t = line.strip()
        if t.startswith("}"):
            if stack:
                stack.pop()
            if t.endswith("{"):
                stack.append("else")
            continue
        alloc = re.match(r"(%[\w#]+) = ttg\.local_alloc %", t)
        if alloc:
            staged.add(alloc.group(1))
        load = re.search(r"ttg\.local_load (%[\w#]+)", t)
        if (load and load.group(1) not in staged and "for" in stack
                and any(k in ("if", "else") for k in stack[stack.index("for"):])):
            bad.append(f"{n}: {t[:160]}")
        if t.endswith("{"):
            stack.append("for" if "scf.for" in t else "if" if "scf.if" in t else "other")
    return bad


def _compile_one(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    index, cc = job
    name, dtype, (fn, ptrs, constexprs, num_warps, num_stages) = _cases()[index]
    src = ASTSource(fn=fn, signature=signature(fn, constexprs, ptrs, dtype), constexprs=constexprs)
    log = io.StringIO()
    try:
        with contextlib.redirect_stdout(log):  # ptxas -v's report (TRITON_DUMP_PTXAS_LOG, set by _worker)
            ck = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                                options={"num_warps": num_warps, "num_stages": num_stages})
        ptx = ck.asm["ptx"]
        spills = [int(n) for n in re.findall(r"(\d+) bytes spill stores", log.getvalue())]
        return f"{name}-{cc}", {"cubin": len(ck.asm["cubin"]), "shared": ck.metadata.shared,
                                 "smem_reads_in_branch": smem_reads_in_branch(ck.asm["ttgir"]),
                                 "tma_loads": ptx.count("cp.async.bulk.tensor"), "wgmma": ptx.count("wgmma.mma_async"),
                                 "mma": ptx.count("mma.sync"), "fma": ptx.count("fma.rn"),
                                 "flattened": ck.asm["ttgir"].count("tt.flatten"),
                                 "spill_stores": max(spills) if spills else None}
    except Exception as exc:  # reported per case by the test
        return f"{name}-{cc}", {"error": f"{type(exc).__name__}: {exc}"[:2000]}


def _worker():
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    jobs = [(i, cc) for i, c in enumerate(_cases()) for cc in _ccs(c)]
    with fresh_triton_cache("ril_fast_gate_"):
        print_report(_compile_one, jobs)


@pytest.fixture(scope="module")
def report():
    return run_worker(__file__, timeout=900)


_ALL_CASES = _cases()
CASE_IDS = [f"{c[0]}-{cc}" for c in _ALL_CASES for cc in _ccs(c)]
CASES = {c[0]: c[2] for c in _ALL_CASES}


def test_cases_cover_every_launch_variant():
    from ril_fast.kernels import lora_group, lora_tma

    cases = _cases()
    names = {c[2][0].__name__ for c in cases}
    assert names == {"_gemm_kernel", "_ds_db_kernel", "_gemm_tma_kernel"}
    tma = [c[2] for c in cases if c[2][0].__name__ == "_gemm_tma_kernel"]
    assert len({(c[2][0], repr(c[2][1:])) for c in cases}) == len(cases), "a kernel variant listed twice"
    # every TMA tuning tile with both TMA variants, each GEMM role (fused / split fwd, dX, plain)
    assert {(cx["BM"], cx["BN"], cx["BK"], cx["GROUP_M"], w, st) for _, _, cx, w, st in tma
            if cx["EPI"] != 3} == set(lora_tma.TILES)
    # the fused backward runs every tile with its stages capped (lora_tma.gemm does the same); with
    # dA, every tile lora_tma.da_fits, with its own cap (R_PAD 64 here)
    assert {(cx["BM"], cx["BN"], cx["BK"], cx["GROUP_M"], w, st) for _, _, cx, w, st in tma
            if cx["EPI"] == 3 and not cx["DA"]} == {(*t[:5], min(t[5], lora_tma.EPI3_MAX_STAGES))
                                                     for t in lora_tma.TILES}
    assert {(cx["BM"], cx["BN"], cx["BK"], cx["GROUP_M"], w, st) for _, _, cx, w, st in tma if cx["DA"]} == {
        (*t[:5], lora_tma.epi3_stages(t[5], t[0], t[1], 64, True)) for t in lora_tma.TILES if lora_tma.da_fits(t[1])}
    assert lora_tma.epi3_stages(3, 128, 128, 64, True) == 2 and not lora_tma.da_fits(256)
    assert {(cx["SUBTILE"], cx["EPI"], cx["B_NK"]) for _, _, cx, _, _ in tma} == {
        (False, 2, True), (False, 1, True), (False, 1, False), (False, 0, False), (False, 3, False),
        (True, 2, True), (True, 3, False)}
    # the plain GEMM (benchmark provider triton_base_tma) runs the fixed tiles only
    assert {(cx["BM"], cx["BN"], cx["BK"], cx["GROUP_M"], w, st) for _, _, cx, w, st in tma if cx["EPI"] == 0} == set(
        lora_group._GPU_MAIN)
    fused_r = {c[2][2]["R_PAD"] for c in cases if c[2][2].get("EPI") == 2}
    assert fused_r == {16, 32, 64} and lora_group.MAX_FUSED_R == 64
    dsdb_r = {c[2][2]["R_PAD"] for c in cases if c[2][0].__name__ == "_ds_db_kernel"}
    assert dsdb_r == {16, 32, 64, 128} and lora_group.MAX_DSDB_R == 128
    assert {c[2][2]["NEED_DB"] for c in cases if c[2][0].__name__ == "_ds_db_kernel"} == {True, False}
    # split-N dS: atomics only into fp32 (bf16 atomics need sm_90), fp32 partials for determinism
    dsdb = [(c[2][2]["DS_ATOMIC"], c[2][1].get("ds_ptr")) for c in cases if c[2][0].__name__ == "_ds_db_kernel"]
    assert set(dsdb) == {(False, None), (True, "fp32"), (False, "fp32")}
    assert {c[2][2]["ATOMIC"] for c in cases if c[2][0].__name__ == "_gemm_kernel"} == {True, False}


def test_branch_scan_flags_the_old_ds_db_pattern():
    """The scan must flag a shared-memory read inside a branch of a pipelined loop (the dB bug)."""
    bad = """  %0 = scf.for %i = %c0 to %N step %c64 iter_args(%a = %z) -> (tensor<64x32xf32>) {
    %t = ttg.memdesc_trans %v {order = array<i32: 1, 0>}
    %l = ttg.local_load %v : !ttg.memdesc<64x64xf32>
    %c = ttg.async_copy_global_to_local %p, %v mask %m
    scf.if %flag {
      %p2 = ttg.local_load %t : !ttg.memdesc<64x64xf32>
    } loc(#loc1)
    scf.yield %a
  } loc(#loc2)"""
    assert len(smem_reads_in_branch(bad)) == 1
    assert smem_reads_in_branch(bad.replace("scf.if %flag {", "%q = arith.addi %x, %y {")) == []
    # a register tile staged through a write-once buffer inside the branch is no pipeline slot
    staged = bad.replace("      %p2 = ttg.local_load %t", "      %s = ttg.local_alloc %r : (tensor<64x64xf32>) -> "
                         "!ttg.memdesc<64x64xf32>\n      %p2 = ttg.local_load %s")
    assert smem_reads_in_branch(staged) == []


def test_no_tensor_cores_below_sm80(report):
    """Why ``auto`` keeps the LoRA op off Triton below sm_80 (``dispatch.MIN_TENSOR_CORE_CC``): Triton
    compiles the GEMM for sm_75 as FMA loops, no mma.sync; for sm_80 with mma.sync. If a Triton
    release gives sm_7x tensor cores, this fails and the rule can go."""
    from ril_fast.kernels import dispatch

    assert report["bf16-0-75"]["mma"] == 0 and report["bf16-0-75"]["fma"] > 1000, report["bf16-0-75"]
    sm80 = {k: v for k, v in report.items() if k.endswith("-80") and k.startswith("bf16")}
    assert sm80 and all(v["mma"] > 0 for v in sm80.values()), sm80
    assert dispatch.MIN_TENSOR_CORE_CC == (8, 0) and "lora_group_linear" in dispatch.GEMM_OPS


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_compiles_for_gpu(report, case_id):
    from ril_fast.kernels import lora_tma

    got = report[case_id]
    assert "error" not in got, got.get("error")
    cc = int(case_id.rsplit("-", 1)[1])
    assert got["cubin"] > 0
    assert got["shared"] <= SMEM_LIMIT[cc], f"{got['shared']} B shared memory > sm_{cc} limit"
    assert not got["smem_reads_in_branch"], got["smem_reads_in_branch"]
    if case_id.startswith("tma-"):  # what the kernel exists for: TMA loads, wgmma, the tile loop flattened
        assert got["tma_loads"] > 0 and got["wgmma"] > 0, got
        cx = CASES[case_id.rsplit("-", 1)[0]][2]
        # (EPI 1 above MAX_UNROLLED_R loops over ranks at run time, which the flattening cannot take)
        assert got["flattened"] > 0 or (cx["EPI"] == 1 and cx["R_PAD"] > lora_tma.MAX_UNROLLED_R.value), got
        assert got["spill_stores"] is not None, "no ptxas report: was this case compiled twice?"
        assert got["spill_stores"] <= TMA_SPILL_LIMIT, f"{got['spill_stores']} B of register spills"


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
