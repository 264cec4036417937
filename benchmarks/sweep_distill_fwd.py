"""Sweep of the Triton distillation forward's launch shape (block, blocks per program, warps) on a GPU.

    python benchmarks/sweep_distill_fwd.py [--out sweep.json]

Times the raw forward op replayed from a CUDA graph at the UNet-feature size and the largest latent
size, next to a graph-replayed copy of one input (same size, same cache state) and the backward op.
Bandwidth counts the forward's minimal traffic (reads student and teacher). The two-launch forward
(``RIL_FAST_DISTILL_FWD_LAUNCHES=2``) is timed at the default and at the best shape. Needs CUDA.
"""

from __future__ import annotations

import argparse
import itertools
import os
import sys
from pathlib import Path

import torch
import triton

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_distill import bench_graph_ms, make_inputs, write_json  # noqa: E402

from ril_fast.kernels import distill  # noqa: E402

SHAPES = [("unet_feature", (4, 320, 64, 64)), ("sdxl_b8", (8, 4, 128, 128))]
BLOCKS, ITERS, WARPS = (2048, 4096, 8192), (1, 2, 4, 8), (4, 8)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", ".")) / "sweep_distill_fwd.json")
    ns = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("sweep_distill_fwd needs CUDA")
    rows = []
    for name, shape in SHAPES:
        s, t, _, ab, w = (a.detach() for a in make_inputs(shape, torch.bfloat16, "cuda"))
        nbytes = 2 * s.numel() * s.element_size()
        src, dst = torch.empty_like(s), torch.empty_like(s)
        copy_us = bench_graph_ms(lambda: dst.copy_(src))["p50_us"]
        ref = distill._triton_fwd(s, t, ab, w, 0)
        default = bench_graph_ms(lambda: distill._triton_fwd(s, t, ab, w, 0))["p50_us"]
        one = torch.ones((), device="cuda")
        bwd = bench_graph_ms(lambda: distill._triton_bwd(one, s, t, ab, w, 0))["p50_us"]
        print(f"{name}: copy {copy_us:.1f} us, forward (default) {default:.1f} us, backward {bwd:.1f} us", flush=True)
        for blk, it, nw in itertools.product(BLOCKS, ITERS, WARPS):
            got = distill._triton_fwd(s, t, ab, w, 0, block=blk, iters=it, num_warps=nw)
            rel = abs(got.item() - ref.item()) / abs(ref.item())
            us = bench_graph_ms(lambda: distill._triton_fwd(s, t, ab, w, 0, block=blk, iters=it, num_warps=nw))
            us = us.get("p50_us", float("nan"))
            rows.append({"shape": name, "block": blk, "iters": it, "num_warps": nw, "programs":
                         shape[0] * triton.cdiv(s.numel() // shape[0], blk * it), "p50_us": us,
                         "gbs": nbytes / (us * 1e-6) / 1e9, "rel_err_vs_default": rel,
                         "copy_same_size_us": copy_us, "default_us": default, "backward_us": bwd})
        best = min((r for r in rows if r["shape"] == name), key=lambda r: r["p50_us"])
        print(f"  best: block {best['block']} iters {best['iters']} warps {best['num_warps']} "
              f"({best['programs']} programs) {best['p50_us']:.1f} us = {best['gbs']:.0f} GB/s", flush=True)
        # The two-launch forward (partials, then a one-program sum) at the default and the best shape
        for cfg in ({}, {"block": best["block"], "iters": best["iters"], "num_warps": best["num_warps"]}):
            got = distill._triton_fwd(s, t, ab, w, 0, launches=2, **cfg)
            us = bench_graph_ms(lambda: distill._triton_fwd(s, t, ab, w, 0, launches=2, **cfg)).get("p50_us")
            rows.append({"shape": name, "launches": 2, **cfg, "p50_us": us, "gbs": nbytes / (us * 1e-6) / 1e9,
                         "bitwise_equal_to_one_launch": bool(torch.equal(got, distill._triton_fwd(s, t, ab, w, 0, **cfg))),
                         "copy_same_size_us": copy_us, "default_us": default})
            print(f"  two launches {cfg or 'default'}: {us:.1f} us", flush=True)
    write_json(ns.out, {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__,
                        "triton": triton.__version__, "rows": rows})
    print(f"wrote {ns.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
