"""Host (CPU) cost of one LoRA layer call per provider: what training without CUDA graphs pays.

    python benchmarks/profile_lora_host.py [--out DIR_OR_JSON] [--calls 20] [--rounds N] [--device cuda|cpu]

Plain ``do_bench`` rows of ``bench_lora.py`` on an H200 put our op's forward at 121-475 µs and its
forward+backward at 0.92-1.22 ms at SD1.5's 8192x320 layer, against 16-31 µs and 62-75 µs of GPU
time (graph replay): host-bound.

- On a GPU the wall time of N calls with no synchronisation inside is the host cost per call,
  Triton's launch cost included, wherever the host is slower than the GPU (the point of the
  exercise: the GPU times are in ``bench_lora.py``'s graph rows).
- On CPU (the default without CUDA) the Triton launches are stubbed out and the shapes are tiny
  (M = 16, d = 64, fp32), so the wall time is the Python and torch-dispatch cost of each provider
  around its kernels, not counting Triton's own launch cost (which needs a GPU). ``public_bound``
  adds the part of that cost a CPU can run: Triton's argument binder and cache key, per launch.

Providers as in ``bench_lora.py`` (``fused`` = our op with its dispatched plan, ``triton_untuned``
= every GEMM in Triton), plus ``public`` (``ril_fast.kernels.lora_group_linear``: backend
selection included, as the adapter-group module calls it) and, on CPU, ``fused_cublas_bwd`` (the
cuBLAS backward an untuned GPU runs). Modes: ``forward`` (graph kept), ``full`` (fwd + bwd) and
``no_grad`` (forward under ``torch.no_grad``, as the sampler's steps without backprop and the EMA
teacher run it).
A cProfile of ``public``'s full step lists where its host time goes.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import os
import pstats
import random
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_lora import FORWARD_ONLY, GPU_SHAPES, _with_env, build_case  # noqa: E402
from common import env_info, results_path, write_record  # noqa: E402

GPU_CASES = [("sd15_l1_attn", 16, 4), ("sd15_l1_attn", 4, 1), ("sdxl_l3_attn", 16, 4)]
CPU_CASES = [("tiny", 4, 1), ("tiny", 16, 4)]
CPU_SHAPE = (16, 64, 64)


class _StubLaunch:
    """Stands in for a Triton kernel on CPU. ``kernel[grid](...)`` launches nothing; while
    :attr:`bind` is set it first does the host work of ``JITFunction.run`` before a launch, for an
    sm_90 target: Triton's own argument binder (the specialisation of every argument) and the
    kernel-cache key. The CUDA driver calls around them (device, stream, the launch) are left out."""

    bind = False
    counts: dict = {}  # launches per kernel name since the last reset

    def __init__(self, fn):
        from triton import knobs
        from triton.backends.compiler import GPUTarget
        from triton.compiler.compiler import make_backend
        from triton.runtime.jit import compute_cache_key, create_function_from_signature

        self.name = fn.__name__
        self.binder = create_function_from_signature(fn.signature, fn.params, make_backend(GPUTarget("cuda", 90, 32)))
        self.knobs, self.compute_cache_key, self.key_cache = knobs, compute_cache_key, {}

    def __getitem__(self, grid):
        return self._launch

    def _launch(self, *args, **kwargs):
        _StubLaunch.counts[self.name] = _StubLaunch.counts.get(self.name, 0) + 1
        if _StubLaunch.bind:  # as JITFunction.run, up to its kernel-cache lookup
            kwargs["debug"] = kwargs.get("debug", False) or self.knobs.runtime.debug
            kwargs["instrumentation_mode"] = self.knobs.compilation.instrumentation_mode
            _, specialization, options = self.binder(*args, **kwargs)
            self.compute_cache_key(self.key_cache, specialization, options)


def _binding(fn):
    """``fn`` with :class:`_StubLaunch` binding its launches."""
    def run():
        _StubLaunch.bind = True
        try:
            return fn()
        finally:
            _StubLaunch.bind = False
    return run


def host_us(fn, calls: int) -> float:
    """Wall time per call (µs) of ``calls`` calls with no synchronisation inside: on a GPU the
    launches are asynchronous, so this is the host cost whenever it exceeds the GPU time."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls * 1e6


def interleaved_us(fns: dict, calls: int, rounds: int, cuda: bool, envs: dict | None = None) -> dict:
    """Median over ``rounds`` of :func:`host_us` per callable, the callables taking turns in every
    round (a shared CPU drifts; interleaving spreads the drift over all of them), in a new seeded
    order each round: what ran just before warms or cools the caches by 10-20 µs a call here (the
    same code measured 69-81 µs right after itself and 89-97 µs after torch's providers). GC paused.
    ``envs``: environment set around each callable's batch of calls (not per call: setting three
    variables and restoring them costs ~10 µs, as much as a fifth of a call)."""
    times = {name: [] for name in fns}
    order, rng = list(fns.items()), random.Random(0)
    gc.disable()
    try:
        for _ in range(rounds):
            rng.shuffle(order)
            for name, fn in order:
                times[name].append(_with_env(lambda fn=fn: host_us(fn, calls), **(envs or {}).get(name, {}))())
                if cuda:
                    torch.cuda.synchronize()  # drain between timings, outside them
    finally:
        gc.enable()
    return {name: statistics.median(ts) for name, ts in times.items()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None)
    ap.add_argument("--calls", type=int, default=20, help="calls per timing")
    ap.add_argument("--rounds", type=int, default=None,
                    help="interleaved rounds, the median is reported (default 25 on CPU, 8 on a GPU)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ns = ap.parse_args(argv)
    cuda = ns.device == "cuda"
    rounds = ns.rounds or (8 if cuda else 25)
    from ril_fast.kernels import lora_group

    if cuda:
        shapes = {name: (m, d_in, d_out) for name, m, d_in, d_out in GPU_SHAPES}
        cases, dtype = GPU_CASES, torch.bfloat16
    else:
        if os.environ.get("TRITON_INTERPRET") == "1":
            raise SystemExit("run without TRITON_INTERPRET: the CPU mode stubs the kernels out instead")
        from ril_fast.kernels import lora_tma

        lora_group._gemm_kernel, lora_group._ds_db_kernel = (_StubLaunch(lora_group._gemm_kernel),
                                                             _StubLaunch(lora_group._ds_db_kernel))
        # the Hopper path (tma_* providers): the TMA kernel stubbed too, and "available" on CPU tensors,
        # so the op builds its descriptors and takes the one-kernel backward as on an H100/H200
        lora_tma._gemm_tma_kernel = _StubLaunch(lora_tma._gemm_tma_kernel)
        lora_tma.available = lambda device: True
        torch.set_num_threads(1)
        shapes, cases, dtype = {"tiny": CPU_SHAPE}, CPU_CASES, torch.float32
    os.environ["RIL_FAST_KERNELS"] = "triton"  # the public entry on CPU tensors too (stubbed)
    os.environ["TRITON_INTERPRET"] = "0" if cuda else "1"  # lets dispatch accept CPU tensors; kernels are stubs
    rows, profile_text = [], ""
    # CPU: a second, bf16 group for the Hopper path (the TMA kernel takes 16-bit only): our op's
    # pointer path against the TMA forward + one-kernel backward, both bound. Only our stubbed
    # providers there: torch's would compute in bf16, slowly, on this CPU.
    groups = [(case, dtype) for case in cases] + ([] if cuda else [(case, torch.bfloat16) for case in cases])
    for (name, r, k), dtype in groups:
        providers, grads = build_case(*shapes[name], r, k, dtype, ns.device, ours=True)
        providers = {p: fn for p, fn in providers.items() if p not in FORWARD_ONLY}
        # providers that are another's with switches set: the same callable, its environment set
        # around each timed batch (bench_lora's per-call wrapper would be timed too)
        envs = {"triton_untuned": {"RIL_FAST_LORA_FWD": "triton", "RIL_FAST_LORA_BWD": "triton"}}
        providers["triton_untuned"] = providers["fused"]
        if not cuda and dtype == torch.float32:  # (on sm_90+ build_case adds triton_tma)
            providers["fused_cublas_bwd"] = providers["fused"]
            envs["fused_cublas_bwd"] = {"RIL_FAST_LORA_BWD": "cublas"}
            providers["public_bound"] = providers["public"]  # (bound below, backward included)
        elif not cuda:
            # as an H100/H200 whose table names the TMA kernel, the fused forward and the one-kernel
            # backward: two launches per fwd + bwd, not four (the TMA kernel builds its descriptors per call)
            hopper = {"RIL_FAST_LORA_FWD": "fused", "RIL_FAST_LORA_BWD": "fused_da", "RIL_FAST_LORA_GEMM": "tma"}
            providers = {"public": providers["public"], "public_bound": providers["public"],
                         "tma_fused_da": providers["public"], "tma_fused_da_bound": providers["public"]}
            envs = {"tma_fused_da": hopper, "tma_fused_da_bound": hopper}
        gy = torch.randn(shapes[name][0], shapes[name][2], device=ns.device, dtype=dtype)
        fns = {}
        for prov, fn in providers.items():
            def full(fn=fn):
                for g in grads:
                    g.grad = None
                fn().backward(gy)

            for _ in range(5):  # compile, cache plans and stacks
                _with_env(full, **envs.get(prov, {}))()
            def sample(fn=fn):
                with torch.no_grad():
                    fn()

            if prov.endswith("_bound"):
                fn, full, sample = _binding(fn), _binding(full), _binding(sample)
            fns[(prov, "forward")], fns[(prov, "full")], fns[(prov, "no_grad")] = fn, full, sample
        launches = {}
        for prov in providers:  # kernel launches per fwd + bwd (CPU: counted by the stubs)
            _StubLaunch.counts = {}
            _with_env(fns[(prov, "full")], **envs.get(prov, {}))()
            launches[prov] = dict(_StubLaunch.counts)
        got = interleaved_us(fns, ns.calls, rounds, cuda, {key: envs[key[0]] for key in fns if key[0] in envs})
        for prov in providers:
            row = {"shape": name, "m_din_dout": shapes[name], "r": r, "k": k, "dtype": str(dtype)[6:], "provider": prov,
                   "forward_host_us": got[(prov, "forward")], "full_host_us": got[(prov, "full")],
                   "no_grad_forward_host_us": got[(prov, "no_grad")]}
            if not cuda:
                row["triton_launches_per_full"] = launches[prov]
            rows.append(row)
            print(f"{name:5s} {str(dtype)[6:]:8s} r{r:<3d} k{k}  {prov:18s} forward {row['forward_host_us']:7.1f} us   "
                  f"full {row['full_host_us']:7.1f} us   no-grad forward {row['no_grad_forward_host_us']:7.1f} us",
                  flush=True)
        if not profile_text:
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(200):
                for g in grads:
                    g.grad = None
                providers["public"]().backward(gy)
            prof.disable()
            if cuda:
                torch.cuda.synchronize()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("tottime").print_stats(25)
            profile_text = f"{name} r{r} k{k}, 200 calls\n" + buf.getvalue()
    path = write_record(results_path("profile_lora_host", ns.device, ns.out),
                        {"name": "profile_lora_host", "env": env_info(ns.device), "kernel_launches_stubbed": not cuda,
                         "public_bound": "public with Triton's binder and cache key run per launch (sm_90)"
                         if not cuda else None,
                         "rows": rows, "public_full_cprofile": profile_text})
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
