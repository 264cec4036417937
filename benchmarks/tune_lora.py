"""Tune the LoRA group linear for this GPU: time every implementation per shape, write the table.

    python benchmarks/tune_lora.py [--quick] [--shapes a,b] [--table PATH] [--out RESULTS.json]

For each layer shape of ``bench_lora.py`` and each stacked rank bucket R (16, 32, 64, 128 ...
from the benchmark's (r, k) grid) it times, under CUDA-graph replay, bf16:

- forward: cuBLAS (base + ``addmm_``), Triton split and Triton fused (R ≤ 64) with every
  candidate of :func:`candidates`;
- backward (dX, dA and dB of the newest 16 ranks): cuBLAS GEMMs, the Triton kernels with every
  candidate for the dX GEMM, and (TMA candidates, R ≤ 64) the fused backward: dS, dB and dX in one
  kernel, then dA ("fused"), or dA in that kernel too ("fused_da").

A candidate is the main GEMM's kernel with a tile config (:func:`candidates`): the pointer kernel
with ``lora_group.GEMM_CANDIDATES``, and on sm_90+ the persistent TMA kernel
(``ril_fast.kernels.lora_tma``, whole or half-width stores) with ``lora_tma.TILES``.

The fastest of each becomes the shape's entry in the table (``ril_fast.kernels.lora_tuning``
format), written atomically to ``--table`` (default: the user cache
``~/.cache/ril_fast/lora_tuning/<gpu>.json``, which the op reads on its next start; copy it to
``ril_fast/kernels/tuned/`` to ship it). All timings go to ``--out`` (default
``benchmarks/results/<gpu>/tune_lora.json``). A config that fails to compile or launch on this
GPU is recorded with its error and skipped. Needs CUDA.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lora import GPU_SHAPES, QUICK_SHAPES  # noqa: E402
from common import bench_graph, env_info, results_path, write_record  # noqa: E402

from ril_fast.kernels import lora_group, lora_tma, lora_tuning  # noqa: E402

R_BUCKETS = (16, 32, 64, 128)  # stacked ranks seen in practice: r ∈ {4, 16, 64} × k ∈ {1..8}, padded
QUICK_R = (16, 64)


def _time(fn) -> float | str:
    try:
        return bench_graph(fn, "cuda", warmup_ms=5, rep_ms=20)["median_ms"] * 1e3
    except Exception as exc:  # a tile config too big for this GPU's shared memory, etc.
        torch.cuda.synchronize()
        return f"{type(exc).__name__}: {str(exc)[:160]}"


def candidates(dev) -> list:
    """Every (BM, BN, BK, GROUP_M, warps, stages, variant) to time on ``dev``: the pointer kernel
    with each of ``lora_group.GEMM_CANDIDATES``, and where this device has TMA both TMA variants
    with each of ``lora_tma.TILES``."""
    out = [(*c, 0) for c in lora_group.GEMM_CANDIDATES]
    if lora_tma.available(torch.device(dev)):
        out += [(*c, v) for v in (lora_tma.VARIANTS["tma"], lora_tma.VARIANTS["tma_subtile"]) for c in lora_tma.TILES]
    return out


def tune_shape(m: int, d_in: int, d_out: int, r: int, dtype=torch.bfloat16, dev: str = "cuda",
               warm_only=None) -> dict | None:
    """Time every implementation of this shape; the table entry, with all timings under ``us``.

    The trainable slice is the last min(R, 16) ranks (the newest adapter of a group).
    ``warm_only``: candidate indices to run once each, untimed (compiles them into Triton's cache;
    see :func:`warm`); returns the number of runs that did not raise then."""
    x = torch.randn(m, d_in, device=dev, dtype=dtype)
    w = torch.randn(d_out, d_in, device=dev, dtype=dtype) / d_in**0.5
    bias = torch.randn(d_out, device=dev, dtype=dtype)
    a = torch.randn(r, d_in, device=dev, dtype=dtype) / d_in**0.5
    b = torch.randn(d_out, r, device=dev, dtype=dtype) / r**0.5
    rs = torch.full((r,), 0.5, device=dev)
    dy = torch.randn(m, d_out, device=dev, dtype=dtype)
    lo, hi = r - min(r, 16), r
    s = lora_group.fwd_launch(x, w, bias, a, b, rs, 0)[1]

    def bwd_triton(cfg):
        ds, db = lora_group.ds_db_launch(dy, b, s, rs, lo, hi, False)
        return lora_group.dx_launch(dy, w, ds, a, cfg), lora_group.da_launch(ds, x, lo, hi, False), db

    def bwd_fused(cfg):
        db = torch.zeros(d_out, hi - lo, device=dev, dtype=torch.float32)
        ds, dx, db = lora_group.dx_ds_db_launch(dy, w, a, b, s, rs, lo, hi, db, cfg)
        return dx, lora_group.da_launch(ds, x, lo, hi, False), db

    def bwd_fused_da(cfg):  # the whole backward in one kernel (dA in its epilogue)
        acc = torch.zeros(d_out * (hi - lo) + (hi - lo) * d_in, device=dev, dtype=torch.float32)
        db, da = acc[:d_out * (hi - lo)].view(d_out, hi - lo), acc[d_out * (hi - lo):].view(hi - lo, d_in)
        _, dx, db = lora_group.dx_ds_db_launch(dy, w, a, b, s, rs, lo, hi, db, cfg, x=x, da=da)
        return dx, da, db

    def bwd_cublas():
        return lora_group.backward_cublas(dy, x, w, a, b, s, rs, lo, hi, True, True, True)

    ref_y = lora_group.fwd_launch(x, w, bias, a, b, rs, 0)[0]
    ref_bwd = bwd_cublas()
    fwd, bwd = {}, {}

    def agrees(label, got, ref, table):  # a wrong kernel must not win the table by being fast
        for g, want in zip(got, ref):
            err = ((g.float() - want.float()).abs().max() / want.float().abs().max().clamp_min(1e-30)).item()
            if not err <= 2e-2:
                table[label] = f"wrong result: rel err {err:.2e}"
                return False
        return True

    def attempt(label, table, run, ref):
        try:
            got = run()
        except Exception as exc:  # a tile config this GPU cannot launch (shared memory, registers)
            table[label] = f"{type(exc).__name__}: {str(exc)[:160]}"
            return
        if warm_only is not None:
            table[label] = None  # ran (and so compiled); not timed
        elif agrees(label, got if isinstance(got, tuple) else (got,), ref, table):
            table[label] = _time(run)

    cands = candidates(dev)
    if warm_only is None:
        fwd["cublas"] = _time(lambda: lora_group.fwd_launch(x, w, bias, a, b, rs, 0))
        bwd["cublas"] = _time(bwd_cublas)
    for i, cfg in enumerate(cands):
        if warm_only is not None and i not in warm_only:
            continue
        for mode, name in ((1, "split"), (2, "fused")):
            if mode == 2 and r > lora_group.MAX_FUSED_R:
                continue
            attempt(f"{name}:{i}", fwd, lambda mode=mode, cfg=cfg: lora_group.fwd_launch(
                x, w, bias, a, b, rs, mode, list(cfg))[0], (ref_y,))
        attempt(f"triton:{i}", bwd, lambda cfg=cfg: bwd_triton(list(cfg)), ref_bwd)
        if cfg[6] and r <= lora_group.MAX_FUSED_R and lora_group.fused_backward_fits(dy, w):  # dS, dB, dX at once
            attempt(f"fused:{i}", bwd, lambda cfg=cfg: bwd_fused(list(cfg)), ref_bwd)
            attempt(f"fused_da:{i}", bwd, lambda cfg=cfg: bwd_fused_da(list(cfg)), ref_bwd)

    if warm_only is not None:
        return sum(1 for t in (fwd, bwd) for v in t.values() if v is None)

    def best(times):
        ok = {k: v for k, v in times.items() if isinstance(v, float)}
        return min(ok, key=ok.get)

    bf, bb = best(fwd), best(bwd)
    cfg_of = lambda label: list(cands[int(label.split(":")[1])]) if ":" in label else None  # noqa: E731
    return {"fwd": bf.split(":")[0], "fwd_cfg": cfg_of(bf), "bwd": bb.split(":")[0], "bwd_cfg": cfg_of(bb),
            "us": {"fwd": fwd, "bwd": bwd}}


def _warm_worker(job) -> int:
    shapes, quick, indices, dtype, dev = job
    ran = 0
    for _, m, d_in, d_out in shapes:
        for r in QUICK_R if quick else R_BUCKETS:
            ran += tune_shape(m, d_in, d_out, r, dtype=dtype, dev=dev, warm_only=set(indices))
    if torch.device(dev).type == "cuda":
        torch.cuda.synchronize()
    return ran


def warm(shapes, quick: bool, jobs: int, dtype=torch.bfloat16, dev: str = "cuda") -> tuple[float, int]:
    """Compile every candidate for every shape in ``jobs`` processes at once (each runs a slice of
    the candidates once): Triton compiles on the host, one kernel at a time per process, and the
    TMA candidates alone are ~100 variants; the timing pass then finds them in Triton's on-disk
    cache. (wall seconds, candidate runs that did not raise). The workers inherit the environment
    (``main`` drops TRITON_INTERPRET first)."""
    import multiprocessing

    n = len(candidates(dev))
    slices = [list(range(i, n, jobs)) for i in range(jobs)]
    t0 = time.perf_counter()
    with multiprocessing.get_context("spawn").Pool(jobs) as pool:
        ran = pool.map(_warm_worker, [(shapes, quick, sl, dtype, dev) for sl in slices if sl], chunksize=1)
    return time.perf_counter() - t0, sum(ran)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="the bench's quick shapes, R in {16, 64}")
    ap.add_argument("--shapes", default=None, help="comma-separated shape names of bench_lora.GPU_SHAPES")
    ap.add_argument("--table", default=None, help="table file to write (default: the user cache)")
    ap.add_argument("--out", default=None, help="all timings (default benchmarks/results/<gpu>/tune_lora.json)")
    ap.add_argument("--jobs", type=int, default=min(8, os.cpu_count() or 1),
                    help="processes compiling the candidates before the timing pass (1: compile while timing)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("tune_lora.py needs a CUDA GPU: it times kernels; nothing to do on CPU", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)
    shapes = [s for s in GPU_SHAPES if not args.quick or s[0] in QUICK_SHAPES]
    if args.shapes:
        shapes = [s for s in GPU_SHAPES if s[0] in args.shapes.split(",")]
    gpu = torch.cuda.get_device_name()
    table_file = Path(args.table) if args.table else lora_tuning.USER_CACHE / f"{lora_tuning.gpu_slug(gpu)}.json"
    entries, t0 = {}, time.perf_counter()
    if args.jobs > 1:
        secs, ran = warm(shapes, args.quick, args.jobs)
        print(f"compiled the candidates in {secs:.1f} s ({args.jobs} processes, {ran} runs)", flush=True)
    info = env_info("cuda")
    out = results_path("tune_lora", "cuda", args.out)
    for name, m, d_in, d_out in shapes:
        for r in QUICK_R if args.quick else R_BUCKETS:
            e = tune_shape(m, d_in, d_out, r)
            entries[lora_tuning.shape_key(torch.bfloat16, m, d_in, d_out, r)] = e
            us = e["us"]
            fast = {d: min(v for v in us[d].values() if isinstance(v, float)) for d in ("fwd", "bwd")}
            print(f"{name:20s} R={r:4d} fwd {e['fwd']:6s} {e['fwd_cfg']} {fast['fwd']:8.1f} us (cublas "
                  f"{us['fwd']['cublas']:.1f})  bwd {e['bwd']:6s} {e['bwd_cfg']} {fast['bwd']:8.1f} us (cublas "
                  f"{us['bwd']['cublas']:.1f})", flush=True)
            # after every shape: a timeout keeps the table and the timings measured so far
            table = {"gpu": gpu, "torch": torch.__version__, "triton": info["triton"], "git_sha": info["git_sha"],
                     "entries": {k: {f: v for f, v in e.items() if f != "us"} for k, e in entries.items()}}
            lora_tuning.validate(table, str(table_file))
            write_record(table_file, table)
            write_record(out, {"env": info, "seconds": time.perf_counter() - t0, "candidates": candidates("cuda"),
                               "entries": entries})
    print(f"table: {table_file}\ntimings: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
