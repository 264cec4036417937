"""AOT compile gate for the Triton distillation kernels: every launch variant compiles to a cubin for
sm_80 and sm_90 on this CPU-only machine. The interpreter runs code the GPU compiler rejects (a loop
variable rebound with another shape, seen in the forward's ITERS loop), so the tests under
``TRITON_INTERPRET=1`` alone do not show the GPU path builds.

Compilation needs real JIT functions, which ``TRITON_INTERPRET=1`` (set by conftest) replaces, so a
worker subprocess without the interpreter compiles every case and reports per case.
"""

from __future__ import annotations

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from aot_gate import print_report, run_worker, signature  # noqa: E402

pytestmark = pytest.mark.compile_gate  # run last, compiled in the background meanwhile (conftest)

CCS = (80, 90)
DTYPES = {"bf16": "bf16", "fp16": "fp16", "fp32": "fp32"}


def _cases():
    """(name, kernel, dtype, constexprs, num_warps) for every variant the launchers can pick."""
    from ril_fast.kernels import distill

    out = []
    for dt in DTYPES:
        for pred in (0, 1, 2):
            for weighted in (True, False):
                for iters in sorted({1, distill.MAX_FWD_ITERS}):
                    out.append((f"fwd-{dt}-p{pred}-w{int(weighted)}-i{iters}", "_distill_fwd_kernel", dt,
                                {"PRED": pred, "HAS_WEIGHT": weighted, "BLOCK": distill.BLOCK,
                                 "SUM_BLOCK": distill.SUM_BLOCK, "ITERS": iters, "TICKET": True}))
                out.append((f"bwd-{dt}-p{pred}-w{int(weighted)}", "_distill_bwd_kernel", dt,
                            {"PRED": pred, "HAS_WEIGHT": weighted, "BLOCK": distill.BLOCK}))
        # the two-launch forward (RIL_FAST_DISTILL_FWD_LAUNCHES=2): partials without the ticket
        out.append((f"fwd2-{dt}", "_distill_fwd_kernel", dt,
                    {"PRED": 0, "HAS_WEIGHT": True, "BLOCK": distill.BLOCK, "SUM_BLOCK": distill.SUM_BLOCK,
                     "ITERS": distill.MAX_FWD_ITERS, "TICKET": False}))
    out.append(("sum", "_distill_sum_kernel", "fp32", {"SUM_BLOCK": distill.SUM_BLOCK}))
    return out


# Pointer element types other than the I/O dtype; scalars are i32 except the fp32 scale.
_PTRS = {"alpha_ptr": "fp32", "w_ptr": "fp32", "partial_ptr": "fp32", "count_ptr": "i32", "out_ptr": "fp32",
         "g_ptr": "fp32"}


def _compile_one(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    from ril_fast.kernels import distill

    index, cc = job
    name, kernel, dtype, constexprs = _cases()[index]
    fn = getattr(distill, kernel)
    # without the ticket the launcher passes the fp32 partials buffer as the unused counter
    ptrs = dict(_PTRS, count_ptr="fp32") if constexprs.get("TICKET") is False else _PTRS
    sig = signature(fn, constexprs, ptrs, dtype, {"inv_nb": "fp32"})
    try:
        ck = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=constexprs),
                            target=GPUTarget("cuda", cc, 32), options={"num_warps": distill.NUM_WARPS})
        return f"{name}-{cc}", {"cubin": len(ck.asm["cubin"])}
    except Exception as exc:  # reported per case by the test
        return f"{name}-{cc}", {"error": f"{type(exc).__name__}: {exc}"[:2000]}


def _worker():
    jobs = [(i, cc) for i in range(len(_cases())) for cc in CCS]
    print_report(_compile_one, jobs)


@pytest.fixture(scope="module")
def report():
    return run_worker(__file__, timeout=600)


CASE_IDS = [f"{c[0]}-{cc}" for c in _cases() for cc in CCS]


def test_cases_cover_every_launch_variant():
    """Every kernel, all dtypes, prediction types and weight modes, the forward's ITERS extremes and
    both forward variants (ticket, two-launch)."""
    from ril_fast.kernels import distill

    cases = _cases()
    assert {c[1] for c in cases} == {n for n in vars(distill) if n.startswith("_distill_") and n.endswith("_kernel")}
    assert {c[2] for c in cases} == set(DTYPES)
    assert {c[3]["ITERS"] for c in cases if "ITERS" in c[3]} == {1, distill.MAX_FWD_ITERS}
    assert {c[3]["TICKET"] for c in cases if "TICKET" in c[3]} == {True, False}
    assert {(c[3]["PRED"], c[3]["HAS_WEIGHT"]) for c in cases if "PRED" in c[3]} == {
        (p, w) for p in (0, 1, 2) for w in (True, False)}


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_compiles_for_gpu(report, case_id):
    got = report[case_id]
    assert "error" not in got, got.get("error")
    assert got["cubin"] > 0


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
