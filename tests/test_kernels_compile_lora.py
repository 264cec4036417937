"""AOT compile gate: every LoRA kernel configuration the GPU path may launch compiles to a cubin
for sm_80 and sm_90 on this CPU-only machine (the interpreter accepts shapes the GPU rejects,
e.g. ``tl.dot`` with K < 16, and never checks shared memory).

Compilation needs real JIT functions, which ``TRITON_INTERPRET=1`` (set by conftest) replaces,
so one worker subprocess without the interpreter compiles every case and reports per case.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}  # max dynamic shared memory per block
CCS = (80, 90)


def _cases():
    from ril_fast.kernels import lora_group

    out = [(f"bf16-{i}", "bf16", c) for i, c in enumerate(lora_group.gpu_launch_cases("bf16"))]
    # fp16 shares bf16's code shape; fp32 switches the dots to IEEE
    cases = lora_group.gpu_launch_cases("fp32")
    out += [("fp32-gemm", "fp32", cases[0]), ("fp32-fused", "fp32", cases[len(lora_group._GPU_MAIN)])]
    return out


def _signature(fn, ptrs, constexprs, dtype):
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*" + ptrs.get(name, dtype)
        else:
            sig[name] = "i32"
    return sig


def _compile_one(job):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    index, cc = job
    name, dtype, (fn, ptrs, constexprs, num_warps, num_stages) = _cases()[index]
    src = ASTSource(fn=fn, signature=_signature(fn, ptrs, constexprs, dtype), constexprs=constexprs)
    try:
        ck = triton.compile(src, target=GPUTarget("cuda", cc, 32),
                            options={"num_warps": num_warps, "num_stages": num_stages})
        return f"{name}-{cc}", {"cubin": len(ck.asm["cubin"]), "shared": ck.metadata.shared}
    except Exception as exc:  # reported per case by the test
        return f"{name}-{cc}", {"error": f"{type(exc).__name__}: {exc}"[:2000]}


def _worker():
    import multiprocessing

    jobs = [(i, cc) for i in range(len(_cases())) for cc in CCS]
    with multiprocessing.get_context("fork").Pool(max(1, min(4, os.cpu_count() or 1))) as pool:
        print(json.dumps(dict(pool.map(_compile_one, jobs, chunksize=1))))


@pytest.fixture(scope="module")
def report():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker"], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CASE_IDS = [f"{c[0]}-{cc}" for c in _cases() for cc in CCS]


def test_cases_cover_every_launch_variant():
    from ril_fast.kernels import lora_group

    cases = _cases()
    names = {c[2][0].__name__ for c in cases}
    assert names == {"_gemm_kernel", "_ds_db_kernel"}
    fused_r = {c[2][2]["R_PAD"] for c in cases if c[2][2].get("EPI") == 2}
    assert fused_r == {16, 32, 64} and lora_group.MAX_FUSED_R == 64
    dsdb_r = {c[2][2]["R_PAD"] for c in cases if c[2][0].__name__ == "_ds_db_kernel"}
    assert dsdb_r == {16, 32, 64, 128} and lora_group.MAX_DSDB_R == 128


@pytest.mark.parametrize("case_id", CASE_IDS)
def test_compiles_for_gpu(report, case_id):
    got = report[case_id]
    assert "error" not in got, got.get("error")
    cc = int(case_id.rsplit("-", 1)[1])
    assert got["cubin"] > 0
    assert got["shared"] <= SMEM_LIMIT[cc], f"{got['shared']} B shared memory > sm_{cc} limit"


if __name__ == "__main__" and "--worker" in sys.argv:
    _worker()
