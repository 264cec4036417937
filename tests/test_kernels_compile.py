"""AOT compile gate: every Triton kernel configuration the GPU paths launch (the fused LoRA op and
the distillation loss) builds a cubin for the GPUs users train on (sm_80, sm_86, sm_89, sm_90), on
this CPU-only machine. The interpreter accepts what the GPU compiler rejects (``tl.dot`` with K <
16, an accumulator rebound with another shape) and never checks shared memory.

Each case runs Triton's whole pipeline for sm_80 (mma.sync) and sm_90 (wgmma). sm_86 and sm_89
get Triton's code for their family (sm_80's PTX: Triton emits the same for them but the
``.target`` line) assembled by ptxas for that arch, and the shared memory those cards give a
block (99 KB). The gate also scans each kernel's TTGIR for shared-memory reads inside a branch of
a pipelined loop, the pattern that made dB wrong on GPU only (see ``_ds_db_kernel``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aot_gate import print_report, run_worker, signature  # noqa: E402

pytestmark = pytest.mark.compile_gate

# max dynamic shared memory per block: A100, RTX 3090 / A10 / A40, RTX 4090 / L4 / L40, H100 / H200
SMEM_LIMIT = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}
TRITON_CCS = (80, 90)  # the whole pipeline; 86 and 89 assemble sm_80's PTX
PTXAS_CCS = {86: 80, 89: 80}


def _cases():
    """(case id, kernel, pointer dtypes, I/O dtype, constexprs, num_warps, num_stages, scalar types)."""
    from ril_fast.kernels import lora_group, x0_mse

    out = []
    # LoRA (16-bit I/O on a GPU): every role in bf16; in fp16 the forward, dX and dS/dB at the widest rank
    for dt in ("bf16", "fp16"):
        for role, (fn, ptrs, cx, warps, stages) in lora_group.gpu_launch_cases(dt).items():
            if dt == "bf16" or role in ("fwd-r64", "dx", "dsdb-db-r64"):
                out.append((f"lora-{dt}-{role}", fn, ptrs, dt, cx, warps, stages, {}))
    # distillation: the forward at every blocks-per-program count the launcher picks, the backward
    ptrs = {"alpha_ptr": "fp32", "w_ptr": "fp32", "partial_ptr": "fp32", "count_ptr": "i32", "out_ptr": "fp32",
            "g_ptr": "fp32"}
    iters = [1 << i for i in range(x0_mse.MAX_FWD_ITERS.bit_length())]
    for dt in ("bf16", "fp32", "fp16"):
        for it in iters if dt == "bf16" else (1,):
            cx = {"BLOCK": x0_mse.BLOCK, "SUM_BLOCK": x0_mse.SUM_BLOCK, "ITERS": it}
            out.append((f"distill-fwd-{dt}-i{it}", x0_mse._distill_fwd_kernel, ptrs, dt, cx, x0_mse.NUM_WARPS, 3,
                        {"inv_nb": "fp32"}))
        out.append((f"distill-bwd-{dt}", x0_mse._distill_bwd_kernel, ptrs, dt, {"BLOCK": x0_mse.BLOCK},
                    x0_mse.NUM_WARPS, 3, {"inv_nb": "fp32"}))
    return out


def smem_reads_in_branch(ttgir: str) -> list:
    """Lines where a shared-memory read sits in an ``scf.if`` nested in an ``scf.for``.

    The pipeliner refills a loop's shared-memory slots without seeing reads inside a branch:
    such a read can see the next tiles (the GPU-only dB bug, invisible to the interpreter). Reads
    of a write-once buffer (``ttg.local_alloc %value``: a register tile staged through shared
    memory) are not pipeline slots and pass."""
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


def _ptxas(ptx: str, cc: int) -> int:
    """Bytes of the cubin ptxas builds from ``ptx`` for sm_``cc``."""
    from triton.backends.nvidia.compiler import get_ptxas

    try:
        ptxas = get_ptxas(cc).path
    except TypeError:  # triton 3.6 (the GPU image) takes no arch
        ptxas = get_ptxas().path
    with tempfile.TemporaryDirectory() as tmp:
        src, out = os.path.join(tmp, "k.ptx"), os.path.join(tmp, "k.cubin")
        with open(src, "w") as f:
            f.write(ptx)
        subprocess.run([ptxas, f"-arch=sm_{cc}", src, "-o", out], check=True, capture_output=True,
                       text=True)
        return os.path.getsize(out)


def _compile_one(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    index, cc = job
    name, fn, ptrs, dtype, cx, warps, stages, scalars = _cases()[index]
    src = ASTSource(fn=fn, signature=signature(fn, cx, ptrs, dtype, scalars), constexprs=cx)
    results = {}
    try:
        ck = triton.compile(src, target=GPUTarget("cuda", cc, 32), options={"num_warps": warps, "num_stages": stages})
        ptx = ck.asm["ptx"]
        common = {"shared": ck.metadata.shared, "smem_reads_in_branch": smem_reads_in_branch(ck.asm["ttgir"])}
        results[f"{name}-{cc}"] = {"cubin": len(ck.asm["cubin"]), "wgmma": ptx.count("wgmma.mma_async"),
                                   "mma": ptx.count("mma.sync"), **common}
        for other, family in PTXAS_CCS.items():
            if family == cc:
                results[f"{name}-{other}"] = {"cubin": _ptxas(ptx, other), **common}
    except Exception as exc:  # reported per case by the test
        err = {"error": f"{type(exc).__name__}: {getattr(exc, 'stderr', '') or exc}"[:2000]}
        results.update({f"{name}-{c}": err for c in [cc, *[o for o, f in PTXAS_CCS.items() if f == cc]]})
    return f"{name}@{cc}", results


def _worker():
    print_report(_compile_one, [(i, cc) for i in range(len(_cases())) for cc in TRITON_CCS])


@pytest.fixture(scope="module")
def report():
    merged = {}
    for results in run_worker(__file__, timeout=900).values():
        merged.update(results)
    return merged


CASES = _cases()
CASE_IDS = [f"{c[0]}-{cc}" for c in CASES for cc in sorted(SMEM_LIMIT)]


def test_cases_cover_what_ships():
    """Every kernel the GPU paths launch, every role and rank tile of the LoRA op in bf16, every
    blocks-per-program count of the distillation forward."""
    from ril_fast.kernels import lora_group, x0_mse

    kernels = {c[1].__name__ for c in CASES}
    assert kernels == {"_gemm_kernel", "_ds_db_kernel", "_distill_fwd_kernel", "_distill_bwd_kernel"}
    bf16 = [c[4] for c in CASES if c[0].startswith("lora-bf16")]  # (the interpreter's tiles here; the worker's are the GPU's)
    assert len(bf16) == len(lora_group.gpu_launch_cases("bf16"))
    assert {cx["R_PAD"] for cx in bf16 if cx.get("EPI") == 2} == {16, 32, 64} and lora_group.MAX_R == 64
    assert {(cx["R_PAD"], cx["NEED_DB"]) for cx in bf16 if "NEED_DB" in cx} == {
        (r, n) for r in (16, 32, 64) for n in (True, False)}
    assert {cx["ATOMIC"] for cx in bf16 if cx.get("EPI") == 1} == {True, False}
    assert {c[3] for c in CASES} == {"bf16", "fp32", "fp16"}
    assert {x0_mse._iters_for(n, b) for n in (1, 600, 1200, 2400, 10 ** 6) for b in (1, 4)} == {
        c[4]["ITERS"] for c in CASES if "ITERS" in c[4]}


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
    staged = bad.replace("      %p2 = ttg.local_load %t", "      %s = ttg.local_alloc %r : (tensor<64x64xf32>) -> "
                         "!ttg.memdesc<64x64xf32>\n      %p2 = ttg.local_load %s")
    assert smem_reads_in_branch(staged) == []


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_compiles_for_gpu(report, case_id):
    got = report[case_id]
    assert "error" not in got, got.get("error")
    cc = int(case_id.rsplit("-", 1)[1])
    assert got["cubin"] > 0
    assert got["shared"] <= SMEM_LIMIT[cc], f"{got['shared']} B shared memory > sm_{cc} limit"
    assert not got["smem_reads_in_branch"], got["smem_reads_in_branch"]
    if case_id.startswith("lora-") and cc in TRITON_CCS:  # the GEMMs run on tensor cores
        assert got["wgmma" if cc == 90 else "mma"] > 0, got


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
