"""Microbenchmark of the multi-adapter LoRA linear (kernels-research §10).

Providers: ``base`` (F.linear, the denominator), ``peft_eager`` (a PEFT LoRA Linear with k active
adapters), ``torch_stacked`` (addmm on concatenated A/B under autograd: what ``auto`` runs),
``fused`` (the Triton op; GPU only) and, with ``--cuda-lib``, ``cuda_lib`` (when
``ril_fast.kernels.cuda_lib.available()[0]``). A kernel in isolation is not the step: the whole-step
A/B is ``bench_peer.py`` / ``bench_step.py --backends``.
Modes: ``forward`` (training forward), ``backward`` (backward of a retained graph), ``full``.
Only the newest adapter trains; W, bias and older adapters are frozen.

    python benchmarks/bench_lora.py [--quick] [--out DIR_OR_JSON]

On GPU every forward / full step is also timed as a CUDA-graph replay (``graph: true`` rows; GPU
time without launch overhead). On CPU only the torch providers run, on a reduced grid (< 2 min),
fp32, and the summary is empty (it compares the fused provider).
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench, bench_graph, env_info, results_path, write_record  # noqa: E402

# (name, M = batch·tokens, d_in, d_out); batch 2 (CFG / training pairs)
GPU_SHAPES = [
    ("sd15_l1_attn", 8192, 320, 320),
    ("sd15_l1_ff_in", 8192, 320, 2560),
    ("sd15_l1_ff_out", 8192, 1280, 320),
    ("sd15_xattn_kv", 154, 768, 320),
    ("sdxl_l2_attn", 8192, 640, 640),
    ("sdxl_l3_attn", 2048, 1280, 1280),
    ("sdxl_l3_ff_in", 2048, 1280, 10240),
    # large M (SDXL 128×128 latents × batch): the GEMMs are no longer launch-bound
    ("sd15_l1_attn_m32k", 32768, 320, 320),
    ("sdxl_l2_attn_m32k", 32768, 640, 640),
    ("sdxl_l2_attn_m64k", 65536, 640, 640),
]
GPU_ADAPTERS = [(r, k) for r in (4, 16, 64) for k in (1, 2, 4, 8)]
QUICK_SHAPES = ["sd15_l1_attn", "sdxl_l3_attn", "sdxl_l2_attn_m32k", "sdxl_l2_attn_m64k"]
QUICK_ADAPTERS = [(4, 1), (16, 2), (16, 4), (64, 1), (16, 8)]  # k = 2: the PEFT target's smallest k
CPU_SHAPES = [("sd15_l1_attn_m512", 512, 320, 320), ("sd15_l1_ff_out_m512", 512, 1280, 320)]
CPU_ADAPTERS = [(4, 1), (4, 4), (16, 4)]
MODES = ("forward", "backward", "full")


def _peft_layer(base: torch.nn.Linear, adapters):
    from peft import LoraConfig
    from peft.tuners.lora import Linear

    names = [f"task{i}" for i in range(len(adapters))]
    (r0, al0), rest = adapters[0], adapters[1:]
    layer = Linear(base, names[0], LoraConfig(r=r0, lora_alpha=al0), r=r0, lora_alpha=al0)
    for n, (r, al) in zip(names[1:], rest):
        layer.update_layer(n, r, al, LoraConfig(r=r, lora_alpha=al))
    layer.set_adapter(names)
    return layer, names


def build_case(m, d_in, d_out, r, k, dtype, device, cuda_lib_provider=False):
    """Tensors shared by every provider, and one callable per provider (returns y).
    ``cuda_lib_provider``: also the CUDA library's op, where it is built."""
    base = torch.nn.Linear(d_in, d_out, bias=True).to(device=device, dtype=dtype).requires_grad_(False)
    layer, names = _peft_layer(base, [(r, 2 * r)] * k)
    layer.to(device=device, dtype=dtype)
    for i, n in enumerate(names):
        layer.lora_B[n].weight.data.normal_(0, 0.02)
        trainable = i == k - 1
        layer.lora_A[n].weight.requires_grad_(trainable)
        layer.lora_B[n].weight.requires_grad_(trainable)
    a = [layer.lora_A[n].weight for n in names]
    b = [layer.lora_B[n].weight for n in names]
    scales = [layer.scaling[n] for n in names]
    w, bias = base.weight, base.bias
    x = torch.randn(m, d_in, device=device, dtype=dtype, requires_grad=True)
    rscale = torch.cat([torch.full((ai.shape[0],), s, device=device, dtype=dtype) for ai, s in zip(a, scales)])

    def torch_stacked():
        a_cat = torch.cat(a) if k > 1 else a[0]
        b_cat = (torch.cat(b, dim=1) if k > 1 else b[0]) * rscale
        return torch.addmm(F.linear(x, w, bias), F.linear(x, a_cat), b_cat.t())

    providers = {"base": lambda: F.linear(x, w, bias), "peft_eager": lambda: layer(x), "torch_stacked": torch_stacked}
    if torch.device(device).type == "cuda":
        from ril_fast.kernels import cuda_lib, lora_group

        providers["fused"] = lambda: lora_group.lora_group_linear(x, w, bias, a, b, scales)
        if cuda_lib_provider and cuda_lib.available()[0]:
            providers["cuda_lib"] = lambda: cuda_lib.lora_group_linear(x, w, bias, a, b, scales)
    grads = [x, a[-1], b[-1]]
    return providers, grads


def time_provider(fn, mode, grads, device, quick, graph=False, repeat=1):
    """``graph``: time a CUDA-graph replay of the forward / full step (GPU time, no launch cost);
    ``repeat``: calls captured back to back in that graph, times per call (``common.bench_graph``)."""
    warm, rep = (10, 30) if quick else (25, 100)
    if torch.device(device).type == "cpu":
        warm, rep = 5, 40
    timer = functools.partial(bench_graph, repeat=repeat) if graph else bench
    if mode == "forward":
        if graph:
            def fwd():
                with torch.no_grad():
                    fn()
            return timer(fwd, device, warmup_ms=warm, rep_ms=rep)
        return bench(fn, device, warmup_ms=warm, rep_ms=rep)
    if mode == "full":
        def step():
            fn().backward(gy)
    else:
        y = fn()

        def step():
            y.backward(gy, retain_graph=True)
    gy = torch.randn_like(fn().detach())
    return timer(step, device, grad_to_none=grads, warmup_ms=warm, rep_ms=rep)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small subset of shapes and adapter counts")
    ap.add_argument("--out", default=None, help="results directory, or a .json file path")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph replay timings")
    ap.add_argument("--shapes", default=None, help="comma-separated shape names (default: the grid)")
    ap.add_argument("--graph-repeat", type=int, default=1,
                    help="calls captured back to back per CUDA graph, times per call (spreads the graph's "
                         "own launch latency, as inside a UNet); 1 = one call per replay")
    ap.add_argument("--cuda-lib", action="store_true",
                    help="also time the CUDA library's LoRA op (1.3-28x slower on the H200; off by default)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        shapes = [s for s in GPU_SHAPES if not args.quick or s[0] in QUICK_SHAPES]
        if args.shapes:
            shapes = [s for s in GPU_SHAPES if s[0] in args.shapes.split(",")]
        adapters = QUICK_ADAPTERS if args.quick else GPU_ADAPTERS
        dtype = torch.bfloat16
    else:
        shapes, adapters, dtype = CPU_SHAPES, CPU_ADAPTERS, torch.float32
    path = results_path("bench_lora", device, args.out)
    record = {"name": "bench_lora", "env": env_info(device), "dtype": str(dtype), "quick": args.quick,
              "modes": list(MODES), "graph_repeat": args.graph_repeat, "results": [], "summary": {}}
    t0 = time.time()
    variants = [("forward", False), ("backward", False), ("full", False)]
    if gpu and not args.no_graph:
        variants += [("forward", True), ("full", True)]
    for name, m, d_in, d_out in shapes:
        for r, k in adapters:
            providers, grads = build_case(m, d_in, d_out, r, k, dtype, device, cuda_lib_provider=args.cuda_lib)
            base_t = {}
            for mode, graph in variants:
                for prov, fn in providers.items():
                    try:
                        t = time_provider(fn, mode, grads, device, args.quick, graph=graph,
                                          repeat=args.graph_repeat)
                    except Exception as exc:  # one failing provider must not lose the run
                        t = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                    if prov == "base":
                        base_t[(mode, graph)] = t.get("median_ms")
                    if "median_ms" in t and base_t.get((mode, graph)):
                        t["ratio_to_base"] = t["median_ms"] / base_t[(mode, graph)]
                    row = {"shape": name, "M": m, "d_in": d_in, "d_out": d_out, "r": r, "k": k, "R": r * k,
                           "mode": mode, "graph": graph, "provider": prov, "backend": prov, **t}
                    record["results"].append(row)
                    print(f"{name:22s} r={r:<3d} k={k} {mode:8s}{'/graph' if graph else '':6s} {prov:14s} "
                          + (f"{t['median_ms']:.4f} ms  x{t.get('ratio_to_base', float('nan')):.2f}"
                             if "median_ms" in t else t["error"]), flush=True)
            record["summary"] = summarize(record["results"])
            record["elapsed_s"] = round(time.time() - t0, 1)
            write_record(path, record)  # after every case: a timeout keeps what was measured
            del providers, grads
            if gpu:
                torch.cuda.empty_cache()
    print(table(record["summary"]))
    print("summary:", record["summary"])
    print("wrote", path)
    return record


def summarize(rows):
    """Per case (shape/r/k) and timing (plain, graph): fused time over base, PEFT and torch_stacked.

    ``fwd_x_base`` = fused / base forward (target ≤ 1.10 for R ≤ 16); ``full_x_base`` = fused /
    base full step (base full = forward + dX; target ≤ 1.35 for R ≤ 64); ``peft_speedup`` =
    PEFT / fused full (target ≥ 2 for k ≥ 2); ``stacked_speedup`` = torch_stacked / fused full
    (target ≥ 1.2 for C ≤ 640). Plain timings include host launch cost; graph ones do not.
    """
    idx = {(r["shape"], r["r"], r["k"], r["mode"], r.get("graph", False), r["provider"]): r.get("median_ms")
           for r in rows}
    out = {}
    for (shape, r, k, mode, graph, prov), t in idx.items():
        get = lambda p: idx.get((shape, r, k, mode, graph, p))  # noqa: E731
        tag = "graph" if graph else "plain"
        if prov != "fused" or t is None:
            continue
        row = out.setdefault(f"{shape}/r{r}/k{k}", {})
        if mode == "forward" and get("base"):
            row[f"fwd_x_base_{tag}"] = round(t / get("base"), 3)
        if mode == "full":
            if get("base"):
                row[f"full_x_base_{tag}"] = round(t / get("base"), 3)
            if get("peft_eager"):
                row[f"peft_speedup_{tag}"] = round(get("peft_eager") / t, 3)
            if get("torch_stacked"):
                row[f"stacked_speedup_{tag}"] = round(get("torch_stacked") / t, 3)
            row[f"full_ms_{tag}"] = round(t, 4)
    return out


def table(summary) -> str:
    """Compact text table of :func:`summarize` (plain / graph)."""
    cols = ["fwd_x_base", "full_x_base", "peft_speedup", "stacked_speedup", "full_ms"]
    head = f"{'case':32s}" + "".join(f"{c + ' p/g':>22s}" for c in cols)
    lines = [head]
    for case, row in summary.items():
        cells = []
        for c in cols:
            p, g = row.get(f"{c}_plain"), row.get(f"{c}_graph")
            cells.append(f"{'-' if p is None else p:>10}/{'-' if g is None else g:<11}")
        lines.append(f"{case:32s}" + "".join(f"{x:>22s}" for x in cells))
    return "\n".join(lines)


if __name__ == "__main__":
    main()
