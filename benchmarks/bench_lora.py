"""Microbenchmark of the multi-adapter LoRA linear (kernels-research §10).

Providers: ``base`` (F.linear, the denominator), ``peft_eager`` (a PEFT LoRA Linear with k active
adapters), ``torch_stacked`` (addmm on concatenated A/B under autograd), ``fused`` (our Triton
kernels; GPU only) and ``cuda_lib`` (when ``ril_fast.kernels.cuda_lib.available()[0]``).
Modes: ``forward`` (training forward), ``backward`` (backward of a retained graph), ``full``.
Only the newest adapter trains; W, bias and older adapters are frozen.

    python benchmarks/bench_lora.py [--quick] [--out DIR_OR_JSON]

On CPU only the torch providers run, on a reduced grid (< 2 min), fp32; the summary reports the
torch_stacked vs peft_eager ratio for k=4 forward+backward.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import bench, env_info, results_path, write_record  # noqa: E402

# (name, M = batch·tokens, d_in, d_out); batch 2 (CFG / training pairs)
GPU_SHAPES = [
    ("sd15_l1_attn", 8192, 320, 320),
    ("sd15_l1_ff_in", 8192, 320, 2560),
    ("sd15_l1_ff_out", 8192, 1280, 320),
    ("sd15_xattn_kv", 154, 768, 320),
    ("sdxl_l2_attn", 8192, 640, 640),
    ("sdxl_l3_attn", 2048, 1280, 1280),
    ("sdxl_l3_ff_in", 2048, 1280, 10240),
]
GPU_ADAPTERS = [(r, k) for r in (4, 16, 64) for k in (1, 2, 4, 8)]
QUICK_SHAPES = ["sd15_l1_attn", "sdxl_l2_attn", "sdxl_l3_attn"]
QUICK_ADAPTERS = [(4, 1), (16, 4), (64, 1), (16, 8)]
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


def build_case(m, d_in, d_out, r, k, dtype, device):
    """Tensors shared by every provider, and one callable per provider (returns y)."""
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
        from ril_fast.kernels import lora_group

        providers["fused"] = lambda: lora_group.lora_group_linear(x, w, bias, a, b, scales, backend="triton")
        try:
            from ril_fast.kernels import cuda_lib

            if cuda_lib.available()[0]:
                providers["cuda_lib"] = lambda: cuda_lib.lora_group_linear(x, w, bias, a, b, scales)
        except ImportError:
            pass
    grads = [x, a[-1], b[-1]]
    return providers, grads


def time_provider(fn, mode, grads, device, quick):
    warm, rep = (10, 30) if quick else (25, 100)
    if torch.device(device).type == "cpu":
        warm, rep = 5, 40
    if mode == "forward":
        return bench(fn, device, warmup_ms=warm, rep_ms=rep)
    if mode == "full":
        def step():
            fn().backward(gy)
    else:
        y = fn()

        def step():
            y.backward(gy, retain_graph=True)
    gy = torch.randn_like(fn().detach())
    return bench(step, device, grad_to_none=grads, warmup_ms=warm, rep_ms=rep)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="small subset of shapes and adapter counts")
    ap.add_argument("--out", default=None, help="results directory, or a .json file path")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if gpu:
        os.environ.setdefault("RIL_FAST_KERNELS", "triton")
        shapes = [s for s in GPU_SHAPES if not args.quick or s[0] in QUICK_SHAPES]
        adapters = QUICK_ADAPTERS if args.quick else GPU_ADAPTERS
        dtype = torch.bfloat16
    else:
        shapes, adapters, dtype = CPU_SHAPES, CPU_ADAPTERS, torch.float32
    path = results_path("bench_lora", device, args.out)
    record = {"name": "bench_lora", "env": env_info(device), "dtype": str(dtype), "quick": args.quick,
              "modes": list(MODES), "results": [], "summary": {}}
    t0 = time.time()
    for name, m, d_in, d_out in shapes:
        for r, k in adapters:
            providers, grads = build_case(m, d_in, d_out, r, k, dtype, device)
            base_t = {}
            for mode in MODES:
                for prov, fn in providers.items():
                    try:
                        t = time_provider(fn, mode, grads, device, args.quick)
                    except Exception as exc:  # one failing provider must not lose the run
                        t = {"error": f"{type(exc).__name__}: {exc}"[:500]}
                    if prov == "base":
                        base_t[mode] = t.get("median_ms")
                    if "median_ms" in t and base_t.get(mode):
                        t["ratio_to_base"] = t["median_ms"] / base_t[mode]
                    row = {"shape": name, "M": m, "d_in": d_in, "d_out": d_out, "r": r, "k": k, "R": r * k,
                           "mode": mode, "provider": prov, "backend": prov, **t}
                    record["results"].append(row)
                    print(f"{name:22s} r={r:<3d} k={k} {mode:8s} {prov:14s} "
                          + (f"{t['median_ms']:.4f} ms  x{t.get('ratio_to_base', float('nan')):.2f}"
                             if "median_ms" in t else t["error"]), flush=True)
            record["summary"] = summarize(record["results"])
            record["elapsed_s"] = round(time.time() - t0, 1)
            write_record(path, record)  # after every case: a timeout keeps what was measured
    print("summary:", record["summary"])
    print("wrote", path)
    return record


def summarize(rows):
    """Speed-ups of the stacked/fused paths over PEFT eager and over torch_stacked (full step)."""
    idx = {(r["shape"], r["r"], r["k"], r["mode"], r["provider"]): r.get("median_ms") for r in rows}
    out = {"stacked_vs_peft_full_k4": {}, "fused_vs_peft_full": {}, "fused_vs_stacked_full": {}}
    for (shape, r, k, mode, prov), t in idx.items():
        if mode != "full" or t is None:
            continue
        key = f"{shape}/r{r}/k{k}"
        peft = idx.get((shape, r, k, mode, "peft_eager"))
        stacked = idx.get((shape, r, k, mode, "torch_stacked"))
        if prov == "torch_stacked" and k == 4 and peft:
            out["stacked_vs_peft_full_k4"][key] = round(peft / t, 3)  # > 1: stacked is faster
        if prov == "fused" and peft:
            out["fused_vs_peft_full"][key] = round(peft / t, 3)
        if prov == "fused" and stacked:
            out["fused_vs_stacked_full"][key] = round(stacked / t, 3)
    return out


if __name__ == "__main__":
    main()
