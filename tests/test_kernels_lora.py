"""Fused LoRA group linear (Triton) against an fp64 torch reference and against PEFT.

On CPU the kernels run under TRITON_INTERPRET=1 with tiny shapes; with CUDA present the same
tests run on cuda tensors, plus real SD-sized bf16 shapes (``gpu`` marker).
"""

from __future__ import annotations

import json
import os

import pytest
import torch

from ril_fast import kernels
from ril_fast.kernels import lora_group, reference

EPS = {torch.float32: 1e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _devices():
    out = []
    if os.environ.get("TRITON_INTERPRET") == "1":
        out.append("cpu")
    out.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return out


@pytest.fixture(params=_devices())
def device(request, monkeypatch):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    monkeypatch.setenv("RIL_FAST_KERNELS", "triton")
    monkeypatch.delenv("RIL_FAST_DETERMINISTIC", raising=False)
    for var in ("RIL_FAST_LORA_FWD", "RIL_FAST_LORA_BWD", "RIL_FAST_LORA_GEMM"):
        monkeypatch.delenv(var, raising=False)
    return request.param


def _make(device, dtype, lead, d_in, d_out, ranks, train, bias=True):
    """Random layer; adapter ``train`` (an index or a set) requires grad, the rest are frozen."""
    train = {train} if isinstance(train, int) else set(train)
    x = torch.randn(*lead, d_in, device=device).to(dtype).requires_grad_()
    w = (torch.randn(d_out, d_in, device=device) / d_in**0.5).to(dtype)
    b = torch.randn(d_out, device=device).to(dtype) if bias else None
    a = [(torch.randn(r, d_in, device=device) / d_in**0.5).to(dtype).requires_grad_(i in train)
         for i, r in enumerate(ranks)]
    bb = [(torch.randn(d_out, r, device=device) / r**0.5).to(dtype).requires_grad_(i in train)
          for i, r in enumerate(ranks)]
    scales = [0.5 + 0.75 * i for i in range(len(ranks))]
    return x, w, b, a, bb, scales


def _run(fn, x, w, b, a, bb, scales, gy):
    """Output and the grads of x and of every adapter tensor that requires grad."""
    y = fn(x, w, b, a, bb, scales)
    y.backward(gy)
    out = {"y": y.detach(), "dx": x.grad}
    for i, (ai, bi) in enumerate(zip(a, bb)):
        if ai.requires_grad:
            out[f"dA{i}"] = ai.grad
        if bi.requires_grad:
            out[f"dB{i}"] = bi.grad
    return out


def _leaf(t, dtype):
    return None if t is None else t.detach().to(dtype).requires_grad_(t.requires_grad)


def _compare(device, dtype, lead, d_in, d_out, ranks, train, bias=True):
    x, w, b, a, bb, scales = _make(device, dtype, lead, d_in, d_out, ranks, train, bias)
    gy = torch.randn(*lead, d_out, device=device).to(dtype)
    got = _run(kernels.lora_group_linear, x, w, b, a, bb, scales, gy)
    c64 = lambda t: _leaf(t, torch.float64)  # noqa: E731
    ref = _run(reference.lora_group_linear, c64(x), c64(w), c64(b), [c64(t) for t in a], [c64(t) for t in bb],
               scales, gy.double())
    if dtype == torch.float32:
        own = {k: torch.zeros_like(v) for k, v in ref.items()}
    else:  # the reference's own error in this dtype sets the bar
        cl = lambda t: _leaf(t, dtype)  # noqa: E731
        low = _run(reference.lora_group_linear, cl(x), cl(w), cl(b), [cl(t) for t in a], [cl(t) for t in bb],
                   scales, gy)
        own = {k: (low[k].double() - ref[k]) for k in ref}
    assert set(got) == set(ref), (sorted(got), sorted(ref))
    for k in ref:
        scale = ref[k].abs().max().item()
        err = (got[k].double() - ref[k]).abs().max().item() / scale
        own_err = own[k].abs().max().item() / scale
        tol = 2 * own_err + (1e-5 if dtype == torch.float32 else 2 * EPS[dtype])
        assert got[k].dtype == dtype and torch.isfinite(got[k]).all(), k
        assert err <= tol, f"{k}: rel err {err:.3e} > tol {tol:.3e} (reference's own {own_err:.3e})"
    frozen = [t for i, t in enumerate(a + bb) if not t.requires_grad]
    assert all(t.grad is None for t in frozen) and w.grad is None and (b is None or b.grad is None)
    return got


@pytest.mark.parametrize(
    "lead,d_in,d_out,ranks,train,bias,mode",
    [
        ((200,), 96, 80, (4, 8, 5), 1, True, "auto"),  # R=17 (not a multiple of 16), middle adapter
        ((64,), 160, 160, (16,), 0, False, "auto"),  # single adapter, R=16 exactly, no bias
        ((2, 37), 71, 133, (8, 4, 4, 2), 3, True, "split"),  # 3-D input, odd dims, last adapter, F2
        ((129,), 33, 47, (3, 5), 0, True, "fused"),  # first adapter, F1, M not a multiple of the tile
        ((96,), 48, 40, (48, 40), 1, True, "auto"),  # R=88 > 64: split forward, 128-wide dS tile
        ((64,), 40, 24, (64, 64, 16), (0, 2), False, "auto"),  # R=144: wide dS GEMM, two trainable adapters
        ((2, 37), 71, 133, (8, 4, 4, 2), 3, True, "cublas"),  # cuBLAS forward and dX, Triton dS/dB/dA
        ((64,), 40, 24, (64, 64, 16), (0, 2), False, "cublas"),  # ... with the wide dS GEMM
    ],
)
def test_matches_fp64_reference(device, monkeypatch, lead, d_in, d_out, ranks, train, bias, mode):
    monkeypatch.setenv("RIL_FAST_LORA_FWD", mode)
    if mode == "cublas":
        monkeypatch.setenv("RIL_FAST_LORA_BWD", "cublas")
    _compare(device, torch.float32, lead, d_in, d_out, ranks, train, bias)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["fused", "split", "cublas"])
def test_half_precision(device, monkeypatch, dtype, mode):
    monkeypatch.setenv("RIL_FAST_LORA_FWD", mode)
    monkeypatch.setenv("RIL_FAST_LORA_BWD", "cublas" if mode == "cublas" else "triton")
    _compare(device, dtype, (150,), 64, 72, (4, 12), 1)


def test_rank_slice_layouts():
    """A rank slice as a reduction operand (S or dS columns [lo, hi)): kept where its rank axis is
    whole 16-element runs or M is not a multiple of 16, else a transposed copy with the same
    values, contiguous along M, so the K-loop loads vectorise."""
    t = torch.randn(48, 20)
    buf, (s_m, s_r) = lora_group._rank_slice(t, 4, 17)
    assert buf.shape == (13, 48) and (s_m, s_r) == (1, 48)
    assert torch.equal(buf.t(), t[:, 4:17])
    whole = torch.randn(48, 32)
    view, strides = lora_group._rank_slice(whole, 16, 32)
    assert view.data_ptr() == whole[:, 16:].data_ptr() and strides == (32, 1)
    odd_m = torch.randn(40, 20)
    view, strides = lora_group._rank_slice(odd_m, 4, 17)
    assert view.data_ptr() == odd_m[:, 4:].data_ptr() and strides == (20, 1)
    narrow = torch.randn(800, 6)  # one r = 6 adapter: rows 12 bytes apart
    buf, strides = lora_group._rank_slice(narrow, 0, 6)
    assert strides == (1, 800) and torch.equal(buf.t(), narrow)


@pytest.mark.parametrize("det", [False, True])
def test_triton_backward_through_the_rank_slice_copy(device, monkeypatch, det):
    """M = 64 (a multiple of 16) with the trainable slice at rank 4, 13 wide: dA, and in
    deterministic mode dB, reduce over the transposed copy of the slice; right against fp64."""
    seen, real = [], lora_group._rank_slice

    def spy(t, lo, hi):
        out = real(t, lo, hi)
        seen.append(out[1])
        return out

    monkeypatch.setattr(lora_group, "_rank_slice", spy)
    monkeypatch.setenv("RIL_FAST_LORA_BWD", "triton")
    if det:
        monkeypatch.setenv("RIL_FAST_DETERMINISTIC", "1")
    _compare(device, torch.float16, (64,), 48, 40, (4, 13), 1)
    # dA always reduces over dS[:, 4:17]; deterministic dB over S[:, 4:17] as well: both copied
    assert seen and all(st == (1, 64) for st in seen), seen
    assert len(seen) == (2 if det else 1), seen


def test_ds_db_kernel_with_the_second_dy_load(device, monkeypatch):
    """The sm_8x variant of the dS/dB kernel (DY_TWICE: dB's dot reads its own transposed load of
    dY) against fp64, with the N-range split, an M tail and the trainable slice at rank 4."""
    seen, real = [], lora_group._dy_twice
    monkeypatch.setattr(lora_group, "_dy_twice", lambda dev: (seen.append(dev), True)[1])
    monkeypatch.setenv("RIL_FAST_LORA_BWD", "triton")
    _compare(device, torch.float16, (150,), 48, 200, (4, 13), 1)
    assert seen, "the dS/dB kernel with dB did not run"
    assert real(torch.device("cpu")) is False
    # which GPUs run it: those whose dots take register operands (mma.sync); the launch gate checks
    # each rule's variant keeps its K-loop pipelined on sm_86 and sm_120
    assert [lora_group.needs_dy_twice(m) for m in (7, 8, 9, 10, 12)] == [True, True, False, False, True]


def test_occupancy_against_hand_counts():
    """CTAs per SM from registers (per warp, in 256-register units), shared memory (+1 KB reserved
    per CTA) and warp slots, each bound reached once (sm_90: 64K registers, 228 KB, 64 warps)."""
    from ril_fast.kernels import lora_tma

    assert lora_tma.occupancy(168, 140_000, 8) == 1  # 5376 registers a warp x 8 = 43008: one CTA
    assert lora_tma.occupancy(128, 100_000, 4) == 2  # registers allow 4, shared memory 233472 // 101024 = 2
    assert lora_tma.occupancy(255, 10_000, 4) == 2  # 255 x 32 = 8160 -> 8192 a warp: 32768 a CTA
    assert lora_tma.occupancy(8, 1024, 2) == 32  # the CTA limit
    assert lora_tma.occupancy(8, 1024, 16) == 4  # 64 warp slots / 16


@pytest.mark.parametrize("major,smem,ok", [(9, 232448, True), (9, 101376, False), (10, 232448, False),
                                           (12, 101376, False), (8, 166912, False)])
def test_tma_kernel_only_where_its_tiles_fit(monkeypatch, major, smem, ok):
    """H100 / H200 run the TMA kernel; a B200 (sm_100: Triton does not compile it), an RTX 5090
    (sm_120: TMA, but 99 KB a block) and an A100 (no TMA) run the pointer kernel."""
    from types import SimpleNamespace

    from ril_fast.kernels import lora_tma

    monkeypatch.setattr(lora_tma, "INTERPRET", False)
    monkeypatch.setattr(lora_tma, "_CAPABLE", {})
    monkeypatch.setattr(torch.cuda, "get_device_properties",
                        lambda device: SimpleNamespace(major=major, shared_memory_per_block_optin=smem))
    assert lora_tma.available(torch.device("cuda", 0)) is ok


def test_persistent_grid_grows_to_the_measured_occupancy(monkeypatch):
    """The first launch of a TMA variant runs one program per SM and records its CTAs per SM; later
    launches of the same variant size the grid by it (capped at the tile count)."""
    from types import SimpleNamespace

    from ril_fast.kernels import lora_tma

    grids = []

    class FakeKernel:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                grids.append(grid[0])
                return SimpleNamespace(n_regs=128, metadata=SimpleNamespace(shared=100_000))
            return launch

    monkeypatch.setattr(lora_tma, "_gemm_tma_kernel", FakeKernel())
    monkeypatch.setattr(lora_tma, "INTERPRET", False)
    monkeypatch.setattr(lora_tma, "_programs", lambda device: 132)
    monkeypatch.setattr(lora_tma, "_OCCUPANCY", {})
    monkeypatch.setattr(lora_tma, "_measured_occupancy", lambda k, warps, device: lora_tma.occupancy(
        k.n_regs, k.metadata.shared, warps))
    a, w = torch.empty(8192, 64, dtype=torch.bfloat16), torch.empty(640, 64, dtype=torch.bfloat16)
    c = torch.empty(8192, 640, dtype=torch.bfloat16)
    cfg = (128, 64, 64, 8, 4, 4)  # 64 x 10 = 640 tiles
    for _ in range(2):
        lora_tma.gemm(a, w, c, b_nk=True, M=8192, N=640, K=64, cfg=cfg, variant=1, upcast=False, epi=0)
    lora_tma.gemm(a[:256], w, c[:256], b_nk=True, M=256, N=640, K=64, cfg=cfg, variant=1, upcast=False, epi=0)
    assert grids == [132, 264, 20]  # one per SM, then two (4 warps, 128 registers, 100 KB), then 2 x 10 tiles
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_lora import tma_occupancy

    assert tma_occupancy() == {"bfloat16 128x64/4w/4s epi0 sub0 R16": 2}  # what bench_lora's JSON records


def _spy_tma(monkeypatch) -> list:
    """Record (EPI, B_NK, variant, dB partials, dA fused) of every persistent TMA GEMM launch."""
    from ril_fast.kernels import lora_tma

    calls, real = [], lora_tma.gemm

    def spy(*args, **kw):
        calls.append((kw["epi"], kw["b_nk"], kw["variant"], kw.get("db_partial", False), kw.get("da") is not None))
        return real(*args, **kw)

    monkeypatch.setattr(lora_tma, "gemm", spy)
    return calls


@pytest.mark.parametrize("variant", ["tma", "tma_subtile"])
@pytest.mark.parametrize("mode,dtype", [("fused", torch.bfloat16), ("fused", torch.float16), ("split", torch.float16)])
def test_tma_gemm_matches_fp64_reference(device, monkeypatch, variant, mode, dtype):
    """The persistent TMA main GEMM (forward, and dX = dY·W + dS·A_cat): M, N and K tails (150, 88,
    72 against 64-wide tiles), R = 17 (pointer-loaded LoRA operands), several tiles per program."""
    from ril_fast.kernels import lora_tma

    calls = _spy_tma(monkeypatch)
    monkeypatch.setenv("RIL_FAST_LORA_GEMM", variant)
    monkeypatch.setenv("RIL_FAST_LORA_FWD", mode)
    monkeypatch.setenv("RIL_FAST_LORA_BWD", "triton")
    _compare(device, dtype, (2, 75), 72, 88, (4, 13), 1)
    v = lora_tma.VARIANTS[variant]
    want = [(2 if mode == "fused" else 1, True, v), (1, False, v)]  # forward on W (N×K), dX on W (K×N)
    assert [c[:3] for c in calls] == (want if lora_tma.available(torch.device(device)) else [])


def _spy_da(monkeypatch) -> list:
    """Count the separate dA launches (lora_group.da_launch)."""
    from ril_fast.kernels import lora_group

    calls, real = [], lora_group.da_launch
    monkeypatch.setattr(lora_group, "da_launch", lambda *a, **kw: (calls.append(1), real(*a, **kw))[1])
    return calls


@pytest.mark.parametrize("dtype,ranks,train,variant,bwd", [
    (torch.bfloat16, (4, 13), 1, "tma", "fused"),  # R = 17, last adapter trains
    (torch.bfloat16, (4, 13), 1, "tma", "fused_da"),  # ... dA in the kernel: rank rows from LO = 4
    (torch.float16, (8, 8, 4), 0, "tma_subtile", "fused"),  # first adapter
    (torch.float16, (8, 8, 4), 0, "tma_subtile", "fused_da"),
    (torch.float16, (16, 8, 8), (0, 2), "tma", "fused"),  # two trainable adapters: the slice spans the middle one
])
def test_fused_backward_matches_fp64_reference(device, monkeypatch, dtype, ranks, train, variant, bwd):
    """dS, dB and dX from one read of dY (the TMA kernel's EPI 3), then dA ("fused_da": dA in the
    same kernel's epilogue, no separate launch). d_out = 200 gives four 64-wide K-steps and d_in =
    136 three N-tiles in the interpreter, so every K-step's dB partial is owned by a different
    N-tile, every dA column block gets partials from three M-tiles (the M tail, 150 rows, a
    partial one)."""
    from ril_fast.kernels import lora_tma

    calls, da_calls = _spy_tma(monkeypatch), _spy_da(monkeypatch)
    monkeypatch.setenv("RIL_FAST_LORA_GEMM", variant)
    monkeypatch.setenv("RIL_FAST_LORA_FWD", "fused")
    monkeypatch.setenv("RIL_FAST_LORA_BWD", bwd)
    _compare(device, dtype, (150,), 136, 200, ranks, train)
    v, one = lora_tma.VARIANTS[variant], bwd == "fused_da"
    tma = lora_tma.available(torch.device(device))
    assert [c[:3] + c[4:] for c in calls] == ([(2, True, v, False), (3, False, v, one)] if tma else [])
    assert len(da_calls) == (0 if tma and one else 1)


def test_fused_backward_takes_da_after_it_where_the_tile_is_too_wide(device, monkeypatch):
    """"fused_da" on a tile without room for X's tile (lora_tma.da_fits false: 256 wide) runs the
    fused kernel without dA, then the dA kernel; the gradients are still right."""
    from ril_fast.kernels import lora_tma

    calls, da_calls = _spy_tma(monkeypatch), _spy_da(monkeypatch)
    monkeypatch.setattr(lora_tma, "da_fits", lambda bn: False)
    monkeypatch.setenv("RIL_FAST_LORA_GEMM", "tma")
    monkeypatch.setenv("RIL_FAST_LORA_BWD", "fused_da")
    _compare(device, torch.float16, (150,), 64, 200, (4, 13), 1)
    if lora_tma.available(torch.device(device)):
        assert [c[::4] for c in calls if c[0] == 3] == [(3, False)] and len(da_calls) == 1, calls


def test_fused_backward_takes_da_after_it_where_tma_cannot_load_x(device, monkeypatch):
    """X's tiles are TMA loads: X rows 130 bytes apart (a column slice of a wider tensor) cannot be
    addressed, so dx_ds_db_launch runs dA after the kernel; same dA as the dA kernel's."""
    from ril_fast.kernels import lora_tma

    calls, da_calls = _spy_tma(monkeypatch), _spy_da(monkeypatch)
    torch.manual_seed(0)
    m, d_in, d_out, r = 70, 64, 32, 6
    t = lambda *sh: torch.randn(*sh, device=device).half()  # noqa: E731
    dy, w, a, b, s = t(m, d_out), t(d_out, d_in), t(r, d_in), t(d_out, r), t(m, r)
    x = t(m, d_in + 1)[:, :d_in]
    assert not lora_tma.tma_ok(x)
    rs = torch.full((r,), 0.5, device=device)
    da = torch.zeros(3, d_in, device=device)
    db = torch.zeros(d_out, 3, device=device)
    ds, _, _ = lora_group.dx_ds_db_launch(dy, w, a, b, s, rs, 2, 5, db, x=x, da=da)
    want = lora_group.da_launch(ds, x.contiguous(), 2, 5, True)
    torch.testing.assert_close(da, want, rtol=1e-3, atol=1e-3 * want.abs().max().item())
    assert len(da_calls) == 2 and [c[::4] for c in calls] == ([(3, False)] if lora_tma.available(x.device) else [])


@pytest.mark.parametrize("bwd", ["fused", "fused_da"])
def test_fused_backward_deterministic_mode(device, monkeypatch, bwd):
    """RIL_FAST_DETERMINISTIC=1: the fused backward stores per-M-tile dB (and with "fused_da" dA)
    partials (no atomics) and sums them in order; right against fp64, and two runs give the same
    bits."""
    from ril_fast.kernels import lora_tma

    calls = _spy_tma(monkeypatch)
    monkeypatch.setenv("RIL_FAST_LORA_GEMM", "tma")
    monkeypatch.setenv("RIL_FAST_LORA_BWD", bwd)
    monkeypatch.setenv("RIL_FAST_DETERMINISTIC", "1")
    torch.manual_seed(3)
    first = _compare(device, torch.float16, (150,), 64, 200, (4, 13), 1)  # 3 M-tiles of partials
    torch.manual_seed(3)
    second = _compare(device, torch.float16, (150,), 64, 200, (4, 13), 1)
    for k in first:
        assert torch.equal(first[k], second[k]), k
    if lora_tma.available(torch.device(device)):
        one = bwd == "fused_da"
        assert [(c[0], c[3], c[4]) for c in calls if c[0] == 3] == [(3, True, one), (3, True, one)], calls


def test_fused_backward_falls_back_to_the_triton_one(device, monkeypatch):
    """R > 64 (dS tile in registers) and a frozen x (no dX) take the Triton backward; the
    gradients are still right."""
    calls = _spy_tma(monkeypatch)
    monkeypatch.setenv("RIL_FAST_LORA_GEMM", "tma")
    monkeypatch.setenv("RIL_FAST_LORA_BWD", "fused")
    _compare(device, torch.float16, (96,), 64, 40, (48, 40), 1)
    assert all(c[0] != 3 for c in calls), calls
    from ril_fast.kernels import lora_tma

    if lora_tma.available(torch.device(device)):  # R = 88: split forward (shrink, main) and dX, runtime rank loop
        assert [c[:3] for c in calls] == [(1, True, 1), (1, True, 1), (1, False, 1)], calls
    x, w, b, a, bb, scales = _make(device, torch.float16, (96,), 64, 40, (8,), 0)
    x.requires_grad_(False)
    gy = torch.randn(96, 40, device=device).half()
    kernels.lora_group_linear(x, w, b, a, bb, scales).backward(gy)
    ref_a = a[0].detach().double().requires_grad_()
    reference.lora_group_linear(x.double(), w.double(), b.double(), [ref_a], [bb[0].detach().double()],
                                scales).backward(gy.double())
    torch.testing.assert_close(a[0].grad.double(), ref_a.grad, rtol=2e-2, atol=2e-2 * ref_a.grad.abs().max().item())
    assert all(c[0] != 3 for c in calls), calls


def test_tma_gemm_falls_back_where_tma_cannot_address(device, monkeypatch):
    """Rows whose byte stride is not a multiple of 16 (d_in = 71 in fp16), and fp32 I/O, run the
    pointer kernel even when the TMA kernel is forced; the result is still right."""
    calls = _spy_tma(monkeypatch)
    monkeypatch.setenv("RIL_FAST_LORA_GEMM", "tma")
    monkeypatch.setenv("RIL_FAST_LORA_BWD", "triton")
    _compare(device, torch.float16, (96,), 71, 40, (8,), 0)
    _compare(device, torch.float32, (96,), 64, 40, (8,), 0)
    assert calls == []


def test_tma_gemm_forced_on_an_empty_batch(device, monkeypatch):
    """M = 0 (an empty batch): a TMA descriptor needs positive sizes, so the pointer kernel runs,
    and the output and gradients are empty / zero as torch's."""
    calls = _spy_tma(monkeypatch)
    monkeypatch.setenv("RIL_FAST_LORA_GEMM", "tma")
    monkeypatch.setenv("RIL_FAST_LORA_BWD", "fused")
    x, w, b, a, bb, scales = _make(device, torch.float16, (0,), 64, 40, (8,), 0)
    y = kernels.lora_group_linear(x, w, b, a, bb, scales)
    y.sum().backward()
    assert y.shape == (0, 40) and x.grad.shape == (0, 64) and calls == []
    assert a[0].grad.abs().max() == 0 and bb[0].grad.abs().max() == 0


def test_tma_gemm_plain_and_bias_against_torch(device):
    """EPI 0 (no LoRA, the ``triton_base`` benchmark provider) with a bias, both B layouts."""
    from ril_fast.kernels import lora_tma

    if not lora_tma.available(torch.device(device)):
        pytest.skip("no TMA on this device")
    torch.manual_seed(0)
    x = torch.randn(130, 80, device=device).half()
    w = torch.randn(56, 80, device=device).half()
    bias = torch.randn(56, device=device).half()
    ref = x.double() @ w.double().t() + bias.double()
    for b_nk, b in ((True, w), (False, w.t().contiguous())):
        y = torch.empty(130, 56, device=device, dtype=torch.float16)
        lora_tma.gemm(x, b, y, b_nk=b_nk, M=130, N=56, K=80, cfg=(64, 32, 32, 4, 4, 2), variant=1, upcast=False,
                      bias=bias)
        torch.testing.assert_close(y.double(), ref, rtol=2e-3, atol=2e-2)


def test_tma_descriptors_built_without_revalidation_match_tritons_own():
    """lora_tma builds TensorDescriptors without their validating __init__ (host cost); the fields
    must be what the validating constructor gives, and that constructor must accept them."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from ril_fast.kernels import lora_tma

    assert lora_tma._FAST_DESC, "TensorDescriptor's fields changed: review lora_tma._desc"
    t = torch.zeros(96, 40, dtype=torch.bfloat16)
    got = lora_tma._desc(t, [96, 40], [64, 32])
    want = TensorDescriptor(t, [96, 40], [40, 1], [64, 32])
    for f in lora_tma._DESC_FIELDS:
        g, w = getattr(got, f), getattr(want, f)
        assert (g is w) if f == "base" else (g == w), f


def test_tuning_table_picks_the_implementation(device, monkeypatch, tmp_path):
    """A table entry (as benchmarks/tune_lora.py writes) decides forward and backward per shape; the
    result still matches the reference; untuned shapes get the defaults; bad tables fail naming the entry."""
    from ril_fast.kernels import lora_group, lora_tuning

    key = lora_tuning.shape_key(torch.float32, 150, 64, 72, 16)
    assert key == "fp32:256:64:72:16"
    entry = {"fwd": "cublas", "fwd_cfg": None, "bwd": "triton", "bwd_cfg": list(lora_group.GEMM_CANDIDATES[2])}
    table = tmp_path / "t.json"
    table.write_text(json.dumps({"gpu": "test", "entries": {key: entry}}))
    monkeypatch.setenv(lora_tuning.ENV, str(table))
    lora_tuning.clear()
    assert lora_tuning.table_path("any-gpu") == table
    assert lora_tuning._entries("any-gpu")[key] == entry
    # off CUDA no table applies (the interpreter keeps the Triton paths); route this shape through it
    monkeypatch.setattr(lora_tuning, "plan", lambda dev, dt, m, di, do, r: lora_tuning._entries("x").get(
        lora_tuning.shape_key(dt, m, di, do, r)))
    dev = torch.device(device)
    assert lora_group.forward_plan(dev, torch.float32, 150, 64, 72, 16) == (0, None)
    assert lora_group.backward_plan(dev, torch.float32, 150, 64, 72, 16) == ("triton", entry["bwd_cfg"])
    # untuned shapes: Triton forward (F1 only for R <= 16); backward cuBLAS on CUDA, Triton elsewhere
    assert lora_group.forward_plan(dev, torch.float32, 4096, 64, 72, 16) == (2, None)
    assert lora_group.forward_plan(dev, torch.float32, 4096, 64, 72, 17) == (1, None)
    assert lora_group.backward_plan(dev, torch.float32, 4096, 64, 72, 16)[0] == (
        "cublas" if dev.type == "cuda" else "triton")
    _compare(device, torch.float32, (150,), 64, 72, (4, 12), 1)
    for bad, msg in (({"fwd": "magic", "bwd": "cublas"}, "needs fwd"),
                     ({"fwd": "split", "bwd": "cublas", "fwd_cfg": [1, 2]}, "6 ints"),
                     ({"fwd": "fused", "bwd": "cublas"}, "R <= 64")):
        with pytest.raises(ValueError, match=msg):
            lora_tuning.validate({"entries": {"bf16:8192:320:320:128": bad}}, "t.json")
    monkeypatch.setenv(lora_tuning.ENV, str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="is not a file"):
        lora_tuning.table_path("any-gpu")
    monkeypatch.setenv(lora_tuning.ENV, "off")
    assert lora_tuning.table_path("any-gpu") is None


def test_shipped_tuning_tables_are_valid_and_compile_gated():
    """Every table shipped in ril_fast/kernels/tuned/ (measured on a GPU by benchmarks/tune_lora.py)
    validates, is looked up under its GPU's name, and names only tile configs from GEMM_CANDIDATES,
    which the compile gate (tests/test_kernels_compile_lora.py) builds for sm_80 and sm_90 (with
    the TMA kernel: from lora_tma.TILES, built for sm_90)."""
    from ril_fast.kernels import lora_group, lora_tma, lora_tuning

    tables = sorted(lora_tuning.SHIPPED.glob("*.json"))
    assert tables, "no shipped tuning table"
    candidates = {tuple(c) for c in lora_group.GEMM_CANDIDATES} | {(*c, 0) for c in lora_group.GEMM_CANDIDATES} | {
        (*c, v) for c in lora_tma.TILES for v in (1, 2)}
    for path in tables:
        raw = json.loads(path.read_text())
        entries = lora_tuning.validate(raw, str(path))
        assert path.stem == lora_tuning.gpu_slug(raw["gpu"])
        assert entries
        for key, e in entries.items():
            for field in ("fwd_cfg", "bwd_cfg"):
                assert e[field] is None or tuple(e[field]) in candidates, (path.name, key, field)
    lora_tuning.clear()


@pytest.mark.parametrize("train", [0, (0, 2), 2])
def test_cublas_backward_matches_the_triton_one(device, monkeypatch, train):
    """The two backward implementations agree (fp32), and both give frozen tensors no gradient."""
    monkeypatch.setenv("RIL_FAST_LORA_FWD", "split")
    outs = {}
    for impl in ("triton", "cublas"):
        monkeypatch.setenv("RIL_FAST_LORA_BWD", impl)
        torch.manual_seed(0)
        outs[impl] = _compare(device, torch.float32, (3, 41), 56, 48, (4, 8, 4), train)
    for key, value in outs["triton"].items():  # fp32, different summation orders
        torch.testing.assert_close(outs["cublas"][key], value, rtol=1e-4, atol=1e-5 * value.abs().max().item())


@pytest.mark.parametrize("det", [False, True])
def test_ds_db_split_over_n_matches_one_range(device, monkeypatch, det):
    """dS/dB with N split into ranges (atomics, or ordered fp32 partials when deterministic) equal the
    one-range kernel; deterministic repeats are bitwise equal."""
    torch.manual_seed(0)
    m, n, ranks = 70, 200, (4, 8, 4)
    r = sum(ranks)
    dy = torch.randn(m, n, device=device)
    b_cat = torch.randn(n, r, device=device)
    s = torch.randn(m, r, device=device)
    rscale = torch.rand(r, device=device) + 0.5
    one = lora_group.ds_db_launch(dy, b_cat, s, rscale, 4, 12, det, split_n=1)
    three = lora_group.ds_db_launch(dy, b_cat, s, rscale, 4, 12, det, split_n=3)
    ref_ds = (dy.double() @ b_cat.double()) * rscale.double()
    ref_db = dy.double().t() @ (s.double() * rscale.double())[:, 4:12]
    for got in (one, three):
        torch.testing.assert_close(got[0].double(), ref_ds, rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(got[1].double(), ref_db, rtol=1e-5, atol=1e-4)
    if det:
        again = lora_group.ds_db_launch(dy, b_cat, s, rscale, 4, 12, det, split_n=3)
        assert torch.equal(again[0], three[0]) and torch.equal(again[1], three[1])


def _peft_layer(d_in, d_out, ranks, alphas, dtype, device):
    from peft import LoraConfig
    from peft.tuners.lora import Linear

    base = torch.nn.Linear(d_in, d_out, bias=True)
    names = [f"task{i}" for i in range(len(ranks))]
    layer = Linear(base, names[0], LoraConfig(r=ranks[0], lora_alpha=alphas[0]), r=ranks[0], lora_alpha=alphas[0])
    for n, r, al in zip(names[1:], ranks[1:], alphas[1:]):
        layer.update_layer(n, r, al, LoraConfig(r=r, lora_alpha=al))
    layer.set_adapter(names)
    with torch.no_grad():
        for n in names:  # PEFT zero-inits B; non-zero B makes every adapter count
            layer.lora_B[n].weight.normal_(0, 0.5)
    return layer.to(device=device, dtype=dtype), names


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_matches_peft_multi_adapter(device, dtype):
    ranks, alphas, trained = (4, 8, 6), (8, 4, 12), 2
    ref_layer, names = _peft_layer(48, 56, ranks, alphas, torch.float64, device)
    low_layer, _ = _peft_layer(48, 56, ranks, alphas, dtype, device)
    low_layer.load_state_dict(ref_layer.state_dict())
    x = torch.randn(3, 41, 48, device=device)
    gy = torch.randn(3, 41, 56, device=device)

    def peft_run(layer, dt):
        for i, n in enumerate(names):
            for mod in (layer.lora_A[n], layer.lora_B[n]):
                mod.weight.requires_grad_(i == trained)
        xi = x.to(dt).requires_grad_()
        y = layer(xi)
        y.backward(gy.to(dt))
        return y.detach(), xi.grad, layer.lora_A[names[trained]].weight.grad, layer.lora_B[names[trained]].weight.grad

    ref = peft_run(ref_layer, torch.float64)
    own = peft_run(low_layer, dtype)
    base = low_layer.base_layer
    a = [low_layer.lora_A[n].weight.detach().clone().requires_grad_(i == trained) for i, n in enumerate(names)]
    b = [low_layer.lora_B[n].weight.detach().clone().requires_grad_(i == trained) for i, n in enumerate(names)]
    scales = [low_layer.scaling[n] for n in names]
    assert scales == [al / r for al, r in zip(alphas, ranks)]
    xi = x.to(dtype).requires_grad_()
    y = kernels.lora_group_linear(xi, base.weight.detach(), base.bias.detach(), a, b, scales)
    y.backward(gy.to(dtype))
    got = (y.detach(), xi.grad, a[trained].grad, b[trained].grad)
    floor = 1e-5 if dtype == torch.float32 else 2 * EPS[dtype]
    for name, g, o, r in zip(("y", "dx", "dA", "dB"), got, own, ref):
        scale = r.abs().max().item()
        err, own_err = ((g.double() - r).abs().max().item() / scale, (o.double() - r).abs().max().item() / scale)
        assert err <= 2 * own_err + floor, f"{name}: rel err {err:.3e} vs PEFT's own {own_err:.3e}"
    assert all(t.grad is None for i, t in enumerate(a + b) if i % len(names) != trained)


def test_dispatch_routes_to_triton(device, monkeypatch):
    calls = []
    real = lora_group._LoraGroupFn.apply
    monkeypatch.setattr(lora_group._LoraGroupFn, "apply", lambda *a: calls.append(1) or real(*a))
    _compare(device, torch.float32, (16,), 16, 16, (4,), 0)
    assert calls == [1]


@pytest.mark.parametrize("triton_ok,cuda_ok,want", [(True, True, "triton"), (False, True, "cuda"),
                                                  (False, False, "torch")])
def test_auto_prefers_triton_then_the_cuda_library(monkeypatch, triton_ok, cuda_ok, want):
    """auto on CUDA tensors: Triton first (the CUDA library measured slower on an H200), then the
    library, then torch; CPU tensors always get torch (auto never picks the interpreter)."""
    from ril_fast.kernels import dispatch

    monkeypatch.setenv("RIL_FAST_KERNELS", "auto")
    checks = []
    monkeypatch.setattr(dispatch, "triton_available", lambda dev: checks.append(dev) or (triton_ok, "stub"))
    monkeypatch.setattr(dispatch, "cuda_lib_available", lambda dev: (cuda_ok, "stub"))
    monkeypatch.setattr(dispatch, "_decided", {})  # decisions made with the stubs stay here
    for op in ("lora_group_linear", "distill_mse"):
        assert dispatch.select_backend(op, torch.device("cuda")) == want
        assert dispatch.select_backend(op, torch.device("cpu")) == "torch"
    # decided once per (op, env, device): the per-layer-call path does no checks
    n = len(checks)
    assert dispatch.select_backend("lora_group_linear", torch.device("cuda")) == want and len(checks) == n
    monkeypatch.setenv("RIL_FAST_KERNELS", "cuda")
    if cuda_ok:
        assert dispatch.select_backend("lora_group_linear", torch.device("cuda")) == "cuda"


@pytest.mark.parametrize("cc,lora_want", [((7, 5), "torch"), ((7, 0), "torch"), ((8, 0), "triton"),
                                           ((8, 6), "triton"), ((9, 0), "triton")])
def test_auto_keeps_the_gemm_op_off_triton_below_sm80(monkeypatch, cc, lora_want):
    """Below sm_80 Triton compiles the GEMMs without tensor cores (the AOT gate's sm_75 case): auto
    runs the LoRA op on torch's path there (the CUDA library is sm_80+ too); the distillation loss,
    elementwise, stays on Triton; a named backend is still honoured."""
    from ril_fast.kernels import dispatch

    monkeypatch.setenv("RIL_FAST_KERNELS", "auto")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    monkeypatch.setattr(dispatch, "cuda_lib_available", lambda dev: (cc >= (8, 0), "stub"))
    monkeypatch.setattr(dispatch, "_decided", {})
    gpu = torch.device("cuda", 0)
    assert dispatch.select_backend("lora_group_linear", gpu) == lora_want
    assert dispatch.select_backend("distill_mse", gpu) == "triton"
    assert dispatch.triton_tensor_cores(gpu)[0] == (lora_want == "triton")
    monkeypatch.setenv("RIL_FAST_KERNELS", "triton")
    assert dispatch.select_backend("lora_group_linear", gpu) == "triton"


def test_auto_keeps_rocm_off_triton(monkeypatch):
    """ROCm reports device type "cuda" (and MI300 compute capability 9.x): auto runs both ops on
    torch's path there, the TMA kernel is never available, and a named backend is honoured."""
    from ril_fast.kernels import dispatch, lora_tma

    monkeypatch.setenv("RIL_FAST_KERNELS", "auto")
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 4))
    monkeypatch.setattr(dispatch, "cuda_lib_available", lambda dev: (False, "stub"))
    monkeypatch.setattr(dispatch, "_decided", {})
    gpu = torch.device("cuda", 0)
    assert dispatch.select_backend("lora_group_linear", gpu) == dispatch.select_backend("distill_mse", gpu) == "torch"
    assert "ROCm" in dispatch.triton_auto_ok("distill_mse", gpu)[1]
    monkeypatch.setattr(lora_tma, "INTERPRET", False)
    monkeypatch.setattr(lora_tma, "_CAPABLE", {})
    assert not lora_tma.available(gpu)
    monkeypatch.setenv("RIL_FAST_KERNELS", "triton")
    assert dispatch.select_backend("lora_group_linear", gpu) == "triton"


def test_calls_on_another_gpu_switch_to_it(monkeypatch):
    """Triton launches on the current device, whatever its arguments' device: the public ops switch
    to the tensors' GPU when it is not the current one (the GPU test below runs it on two GPUs)."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    assert kernels._foreign_gpu(SimpleNamespace(is_cuda=True, get_device=lambda: 1))
    assert not kernels._foreign_gpu(SimpleNamespace(is_cuda=True, get_device=lambda: 0))
    assert not kernels._foreign_gpu(torch.zeros(1))


@pytest.mark.gpu
def test_op_on_a_second_gpu_while_the_first_is_current(monkeypatch):
    """With GPU 0 current, the op on cuda:1 tensors (``model.device: cuda:1`` without the trainer's
    set_device) matches the reference: the kernels ran on GPU 1, not on GPU 0 with GPU 1's pointers."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    monkeypatch.setenv("RIL_FAST_KERNELS", "triton")
    with torch.cuda.device(0):
        x, w, b, a, bb, scales = _make("cuda:1", torch.bfloat16, (256,), 320, 320, (4, 16), 1)
        gy = torch.randn(256, 320, device="cuda:1").to(torch.bfloat16)
        got = _run(kernels.lora_group_linear, x, w, b, a, bb, scales, gy)
        for t in (x, a[1], bb[1]):
            t.grad = None
        ref = _run(reference.lora_group_linear, x, w, b, a, bb, scales, gy)
        assert torch.cuda.current_device() == 0
    for k, v in ref.items():
        assert got[k].device == torch.device("cuda", 1)
        torch.testing.assert_close(got[k], v, rtol=1.6e-2, atol=1e-2 * v.abs().max().item(), msg=k)


@pytest.mark.parametrize("ranks", [(8,), (4, 12, 8)], ids=["k1", "k3"])
def test_fp32_adapters_on_a_half_precision_model(device, ranks):
    """The trainer's default: fp32 adapters (and their grads) on a bf16 model. The op computes in
    x's dtype and returns fp32 adapter grads that match the fp64 reference to bf16 accuracy."""
    x, w, b, a, bb, scales = _make(device, torch.bfloat16, (70,), 48, 40, ranks, len(ranks) - 1)
    a = [t.detach().float().requires_grad_(t.requires_grad) for t in a]
    bb = [t.detach().float().requires_grad_(t.requires_grad) for t in bb]
    gy = torch.randn(70, 40, device=device).to(torch.bfloat16)
    got = _run(kernels.lora_group_linear, x, w, b, a, bb, scales, gy)
    c64 = lambda t: _leaf(t, torch.float64)  # noqa: E731
    ref = _run(reference.lora_group_linear, c64(x), c64(w), c64(b), [c64(t) for t in a], [c64(t) for t in bb],
               scales, gy.double())
    assert got["y"].dtype == torch.bfloat16 and got["dx"].dtype == torch.bfloat16
    trained = len(ranks) - 1
    assert got[f"dA{trained}"].dtype == torch.float32 and got[f"dB{trained}"].dtype == torch.float32
    for key in ref:
        scale = ref[key].abs().max().item()
        err = (got[key].double() - ref[key]).abs().max().item() / scale
        assert err < 3e-2, f"{key}: rel err {err:.3e}"  # bf16 inputs and products: ~2^-8 per rounding
    assert all(t.grad is None for t in a[:-1] + bb[:-1])


@pytest.mark.parametrize("ranks", [(8,), (4, 12)], ids=["k1", "k2"])
def test_frozen_fp32_group_on_half_model_follows_in_place_updates(device, ranks):
    """The EMA teacher's path: an all-frozen fp32 group on a bf16 model is stacked and cast once,
    cached, and re-copied when an adapter changes in place (the EMA update's ``lerp_``)."""
    x, w, b, a, bb, scales = _make(device, torch.bfloat16, (33,), 32, 24, ranks, ())
    a = [t.detach().float() for t in a]
    bb = [t.detach().float() for t in bb]

    def ref():
        c64 = lambda t: t.detach().double()  # noqa: E731
        return reference.lora_group_linear(c64(x), c64(w), c64(b), [c64(t).to(torch.bfloat16).double() for t in a],
                                           [c64(t).to(torch.bfloat16).double() for t in bb], scales)

    with torch.no_grad():
        for step in range(2):
            y = kernels.lora_group_linear(x, w, b, a, bb, scales)
            want = ref()
            err = (y.double() - want).abs().max().item() / want.abs().max().item()
            assert err < 2e-2, f"step {step}: rel err {err:.3e}"
            bb[-1].lerp_(torch.randn_like(bb[-1]), 0.5)  # moves the version counter: next call re-copies


def test_no_grad_forward_skips_the_autograd_function(device, monkeypatch):
    """Under no_grad (sampling steps, the EMA teacher) the op launches the forward without the
    autograd Function (host cost) and gives the same output as with grad enabled."""
    x, w, b, a, bb, s = _make(device, torch.float32, (3, 50), 48, 40, (4, 12), 1)
    with_grad = kernels.lora_group_linear(x, w, b, a, bb, s).detach()
    calls = []
    real = lora_group._LoraGroupFn.apply
    monkeypatch.setattr(lora_group._LoraGroupFn, "apply", lambda *args: calls.append(1) or real(*args))
    with torch.no_grad():
        y = kernels.lora_group_linear(x, w, b, a, bb, s)
    assert calls == [] and not y.requires_grad and y.shape == (3, 50, 40)
    assert torch.equal(y, with_grad)
    ref = reference.lora_group_linear(x.double(), w.double(), b.double(), [t.double() for t in a],
                                      [t.double() for t in bb], s)
    torch.testing.assert_close(y.double(), ref, rtol=1e-5, atol=1e-5)


def test_only_x_or_only_adapter_requires_grad(device):
    x, w, b, a, bb, s = _make(device, torch.float32, (70,), 32, 24, (4, 4), 1)
    x.requires_grad_(False)
    kernels.lora_group_linear(x, w, b, a, bb, s).sum().backward()
    assert a[1].grad is not None and bb[1].grad is not None and a[0].grad is None and x.grad is None
    x2, w2, b2, a2, bb2, s2 = _make(device, torch.float32, (70,), 32, 24, (4, 4), ())
    y = kernels.lora_group_linear(x2, w2, b2, a2, bb2, s2)
    y.sum().backward()
    ref = torch.ones(70, 24, device=device) @ (w2 + sum(sc * bi @ ai for ai, bi, sc in zip(a2, bb2, s2)))
    torch.testing.assert_close(x2.grad, ref, rtol=1e-5, atol=1e-5)
    assert all(t.grad is None for t in a2 + bb2)


def test_gradcheck_fp64(device):
    if device == "cuda":
        pytest.skip("fp64 gradcheck runs in the CPU interpreter")
    x, w, b, a, bb, s = _make(device, torch.float64, (5,), 16, 8, (2, 3), 1)
    fn = lambda x_, a1, b1: kernels.lora_group_linear(x_, w, b, [a[0], a1], [bb[0], b1], s)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (x, a[1], bb[1]), fast_mode=True)


@pytest.mark.parametrize("lead,d_in,d_out,ranks,train,fwd,bwd,det,split_n", [
    ((200,), 96, 80, (4, 8, 5), 1, "fused", "triton", False, 1),  # split-K dA with atomics (M > 128)
    ((200,), 96, 80, (4, 8, 5), (0, 2), "split", "triton", True, 3),  # ordered partials: dA, dB, split-N dS
    ((150,), 40, 24, (4, 12), 1, "auto", "triton", False, 3),  # split-N dS with atomics
    ((64,), 40, 24, (64, 64, 16), (0, 2), "auto", "triton", False, None),  # R = 144: wide dS GEMM, split-K dB
    ((2, 37), 71, 133, (8, 4, 4, 2), 3, "cublas", "cublas", False, None),
])
def test_fp64_is_exact_to_rounding(device, monkeypatch, lead, d_in, d_out, ranks, train, fwd, bwd, det, split_n):
    """In fp64 every kernel accumulates, reduces and scales in fp64: output and grads equal the fp64
    reference to ~1e-15 relative. A dropped or mis-scaled term, or a partial rounded to fp32 (1e-7),
    fails here though the fp32 comparisons above (1e-5) pass it."""
    if device == "cuda":
        pytest.skip("fp64 runs the Triton kernels only in the interpreter (on a GPU, auto sends it to torch)")
    monkeypatch.setenv("RIL_FAST_LORA_FWD", fwd)
    monkeypatch.setenv("RIL_FAST_LORA_BWD", bwd)
    monkeypatch.setenv("RIL_FAST_DETERMINISTIC", str(int(det)))
    if split_n:
        monkeypatch.setattr(lora_group, "_dsdb_split", lambda m_tiles, n_chunks: split_n)
    x, w, b, a, bb, _ = _make(device, torch.float64, lead, d_in, d_out, ranks, train)
    scales = [1 / 3 + i / 7 for i in range(len(ranks))]  # not exact in fp32
    gy = torch.randn(*lead, d_out, device=device, dtype=torch.float64)
    got = _run(kernels.lora_group_linear, x, w, b, a, bb, scales, gy)
    leaf = lambda t: _leaf(t, torch.float64)  # noqa: E731
    ref = _run(reference.lora_group_linear, leaf(x), leaf(w), leaf(b), [leaf(t) for t in a], [leaf(t) for t in bb],
               scales, gy)
    assert set(got) == set(ref) and len(got) >= 3
    for k in ref:
        err = (got[k] - ref[k]).abs().max().item() / ref[k].abs().max().item()
        assert got[k].dtype == torch.float64 and err < 1e-13, f"{k}: rel err {err:.2e}"


def test_fp64_goes_to_torch_on_a_gpu_under_auto(monkeypatch):
    """The GPU kernels (LoRA and distillation) are compile-gated for 16-bit and fp32 I/O: fp64 CUDA
    tensors run torch's path under ``auto``, and the Triton LoRA kernels refuse fp64 outside the
    interpreter (the distillation op refuses it everywhere)."""
    from ril_fast.kernels import dispatch

    monkeypatch.delenv("RIL_FAST_KERNELS", raising=False)
    dispatch.clear_cache()
    cuda = torch.device("cuda", 0)  # deciding needs no GPU: Triton counts as available for cuda tensors
    for op in ("lora_group_linear", "distill_mse"):
        assert dispatch.select_backend(op, cuda, torch.float64) == "torch"
        assert (dispatch.select_backend(op, cuda, torch.float32) == dispatch.select_backend(op, cuda, torch.bfloat16)
                == "triton")
        assert dispatch.select_backend(op, torch.device("cpu"), torch.float64) == "torch"
    monkeypatch.setenv("RIL_FAST_KERNELS", "triton")
    assert dispatch.select_backend("lora_group_linear", cuda, torch.float64) == "triton"  # named: kernels refuse it
    dispatch.clear_cache()
    monkeypatch.setattr(lora_group, "INTERPRET", False)
    monkeypatch.setattr(lora_group, "_FLAGS", {})
    with pytest.raises(ValueError, match="float64 runs only in the interpreter"):
        lora_group._flags(torch.float64)
    assert lora_group._flags(torch.float32)["ACC"] == lora_group.tl.float32


def test_deterministic_mode_is_bitwise_repeatable(device, monkeypatch):
    monkeypatch.setenv("RIL_FAST_DETERMINISTIC", "1")
    first = _compare(device, torch.float32, (300,), 40, 48, (8, 8), 1)
    torch.manual_seed(0)
    second = _compare(device, torch.float32, (300,), 40, 48, (8, 8), 1)
    assert all(torch.equal(first[k], second[k]) for k in first)


def test_bad_shapes_raise_one_line_errors(device):
    x, w, b, a, bb, s = _make(device, torch.float32, (4,), 16, 8, (2,), 0)
    with pytest.raises(ValueError, match="do not fit W"):
        kernels.lora_group_linear(x, w, b, [a[0].t()], bb, s)
    with pytest.raises(ValueError, match="matching lists"):
        kernels.lora_group_linear(x, w, b, a, bb, [1.0, 2.0])


def test_custom_ops_pass_opcheck(device):
    m, d_in, d_out, r = 40, 24, 20, 6
    t = lambda *sh: torch.randn(*sh, device=device)  # noqa: E731
    x, w, bias, a, b = t(m, d_in), t(d_out, d_in), t(d_out), t(r, d_in), t(d_out, r)
    rs = torch.full((r,), 0.5, device=device)
    y, s = lora_group.lora_fwd(x, w, bias, a, b, rs, 2, None)
    torch.testing.assert_close(y, reference.lora_group_linear(x, w, bias, [a], [b], [0.5]), rtol=1e-4, atol=1e-4)
    dy = t(m, d_out)
    ds, _ = lora_group.lora_bwd_ds_db(dy, b, s, rs, 0, r, False)
    cfg = list(lora_group.GEMM_CANDIDATES[1])  # a tuned tile config rides along as an int list
    for op, args in [
        (lora_group.lora_fwd, (x, w, bias, a, b, rs, 1, cfg)),
        (lora_group.lora_fwd, (x, w, None, a, b, rs, 2, None)),
        (lora_group.lora_fwd, (x, w, bias, a, b, rs, 0, None)),
        (lora_group.lora_bwd_ds_db, (dy, b, s, rs, 2, 5, True)),
        (lora_group.lora_bwd_dx, (dy, w, ds, a, cfg)),
        (lora_group.lora_bwd_dx, (dy, w, ds, a, None)),
        (lora_group.lora_bwd_da, (ds, x, 0, 4, True)),
        (lora_group.lora_bwd_fused, (dy, w, a, b, s, rs, 2, 5, False, cfg)),  # fp32: the unfused kernels
        (lora_group.lora_bwd_fused_da, (dy, w, x, a, b, s, rs, 2, 5, False, cfg)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("det", [False, True])
def test_fused_backward_custom_op(device, monkeypatch, det):
    """ril_fast::lora_group_bwd_fused and ..._fused_da (the fused backward under torch.compile):
    the fused kernel where its TMA operands fit (fp16, 16-byte rows), the same dS / dX / dA / dB
    as the unfused kernels (their own fallback, fp16 rows of 20), and opcheck's schema,
    fake-tensor and AOT checks."""
    from ril_fast.kernels import lora_tma

    calls = _spy_tma(monkeypatch)
    torch.manual_seed(0)
    m, d_in, r = 70, 24, 6
    for d_out in (32, 20):  # 64-byte rows fit TMA; 40-byte rows do not
        t = lambda *sh: torch.randn(*sh, device=device).half()  # noqa: E731
        dy, w, a, b, s = t(m, d_out), t(d_out, d_in), t(r, d_in), t(d_out, r), t(m, r)
        rs = torch.full((r,), 0.5, device=device)
        calls.clear()
        ds, dx, db = lora_group.lora_bwd_fused(dy, w, a, b, s, rs, 2, 5, det, None)
        fused = [c[0] for c in calls] == [3]
        assert fused == (d_out == 32 and lora_tma.available(torch.device(device))), calls
        ds_ref, db_ref = lora_group.ds_db_launch(dy, b, s, rs, 2, 5, True)
        dx_ref = lora_group.dx_launch(dy, w, ds_ref, a)
        for got, want in ((ds, ds_ref), (dx, dx_ref), (db, db_ref)):
            scale = want.float().abs().max().item()
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * scale)
        torch.library.opcheck(lora_group.lora_bwd_fused, (dy, w, a, b, s, rs, 2, 5, det, None),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
        x = t(m, d_in)
        calls.clear()
        dx, da, db = lora_group.lora_bwd_fused_da(dy, w, x, a, b, s, rs, 2, 5, det, None)
        assert [c[0] for c in calls] == [3] * fused and [c[4] for c in calls] == [True] * fused, calls
        da_ref = lora_group.da_launch(ds_ref, x, 2, 5, True)
        for got, want in ((dx, dx_ref), (da, da_ref), (db, db_ref)):
            scale = want.float().abs().max().item()
            torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2 * scale)
        torch.library.opcheck(lora_group.lora_bwd_fused_da, (dy, w, x, a, b, s, rs, 2, 5, det, None),
                              test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("bwd", ["fused", "fused_da"])
def test_compile_path_runs_the_fused_backward_as_a_custom_op(device, monkeypatch, bwd):
    """Under torch.compile (simulated: ``_compiling`` True, so every launch goes through the
    custom ops) the fused plans call ril_fast::lora_group_bwd_fused / ..._fused_da, not the
    unfused kernels."""
    from ril_fast.kernels import lora_tma

    calls = _spy_tma(monkeypatch)
    ops = []
    for name in ("lora_bwd_fused", "lora_bwd_fused_da"):
        real = getattr(lora_group, name)
        monkeypatch.setattr(lora_group, name, lambda *a, name=name, real=real: (ops.append(name), real(*a))[1])
    monkeypatch.setattr(lora_group, "_compiling", lambda: True)
    monkeypatch.setenv("RIL_FAST_LORA_GEMM", "tma")
    monkeypatch.setenv("RIL_FAST_LORA_BWD", bwd)
    _compare(device, torch.float16, (150,), 64, 200, (4, 13), 1)
    assert ops == ["lora_bwd_" + bwd]
    tma = lora_tma.available(torch.device(device))
    assert [c[::4] for c in calls if c[0] == 3] == ([(3, bwd == "fused_da")] if tma else [])


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m,d_in,d_out,ranks",
    [(8192, 320, 320, (16, 16, 16, 16)), (4096, 640, 640, (64,)), (4096, 320, 2560, (4, 8)),
     (2048, 1280, 1280, (64,) * 8)],
)
@pytest.mark.parametrize("kernel", ["as_dispatched", "tma_fused_bwd", "tma_fused_da"])
def test_real_shapes_bf16_cuda(monkeypatch, m, d_in, d_out, ranks, kernel):
    """SD-sized layers on the GPU: as dispatched (tuning table / defaults), and with the persistent
    TMA GEMM forced for the forward and the fused backward, without or with dA in it (sm_90+;
    R > 64 takes the Triton one)."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    from ril_fast.kernels import lora_tma

    monkeypatch.setenv("RIL_FAST_KERNELS", "triton")
    calls = []
    if kernel != "as_dispatched":
        if not lora_tma.available(torch.device("cuda")):
            pytest.skip("no TMA on this GPU")
        calls = _spy_tma(monkeypatch)
        monkeypatch.setenv("RIL_FAST_LORA_GEMM", "tma")
        monkeypatch.setenv("RIL_FAST_LORA_FWD", "fused")
        monkeypatch.setenv("RIL_FAST_LORA_BWD", "fused_da" if kernel == "tma_fused_da" else "fused")
    _compare("cuda", torch.bfloat16, (m,), d_in, d_out, ranks, len(ranks) - 1)
    if kernel != "as_dispatched":
        # R <= 64: fused forward (EPI 2) and fused backward (EPI 3); else split forward (shrink and
        # main GEMM, EPI 1 each) and the Triton backward's dX (EPI 1)
        want = [2, 3] if sum(ranks) <= lora_group.MAX_FUSED_R else [1, 1, 1]
        assert [c[0] for c in calls] == want, calls


def test_two_forwards_before_backward_and_frozen_stack_cache(device):
    """Truncated backprop calls a layer K times before one backward; an all-frozen (teacher)
    group reuses a cached stack that must follow in-place updates of its adapters."""
    x, w, b, a, bb, s = _make(device, torch.float32, (70,), 32, 24, (4, 4), 1)
    y = kernels.lora_group_linear(x, w, b, a, bb, s)
    y2 = kernels.lora_group_linear(x, w, b, a, bb, s)  # the second call saves its own stacks
    (y.sum() + y2.sum()).backward()
    ref = {n: t.detach().clone().requires_grad_(t.requires_grad) for n, t in
           {"x": x, "a1": a[1], "b1": bb[1]}.items()}
    ra, rb = [a[0].detach(), ref["a1"]], [bb[0].detach(), ref["b1"]]
    yr = reference.lora_group_linear(ref["x"], w, b, ra, rb, s)
    (2 * yr.sum()).backward()
    for got, want in ((x.grad, ref["x"].grad), (a[1].grad, ref["a1"].grad), (bb[1].grad, ref["b1"].grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    frozen_a = [t.detach().clone() for t in a]
    frozen_b = [t.detach().clone() for t in bb]
    with torch.no_grad():
        first = kernels.lora_group_linear(x, w, b, frozen_a, frozen_b, s)
        frozen_b[0].mul_(-2.0)  # an EMA-style in-place update bumps the version counter
        second = kernels.lora_group_linear(x, w, b, frozen_a, frozen_b, s)
    torch.testing.assert_close(second, reference.lora_group_linear(x, w, b, frozen_a, frozen_b, s),
                               rtol=1e-5, atol=1e-5)
    assert not torch.allclose(first, second)


def test_tuner_picks_the_fastest_correct_candidate(monkeypatch):
    """benchmarks/tune_lora.py on CPU through the interpreter with a stand-in timer: every candidate
    runs and is checked against the cuBLAS result, and the entry names the fastest one."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton candidates through the interpreter")
    import sys
    from pathlib import Path

    from ril_fast.kernels import lora_tuning

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tune_lora

    from ril_fast.kernels import lora_tma

    # the interpreter counts as TMA-capable: every tile config with the pointer and both TMA kernels
    full = tune_lora.candidates("cpu")
    assert len(full) == len(lora_group.GEMM_CANDIDATES) + 2 * len(lora_tma.TILES)
    assert {c[6] for c in full} == {0, 1, 2}
    # time three of them (one per kernel; the interpreter is slow), in fp16 so the TMA ones can run
    cands = [full[0], next(c for c in full if c[6] == 1), full[-1]]
    monkeypatch.setattr(tune_lora, "candidates", lambda dev: cands)
    tma_calls = []
    real_tma = lora_tma.gemm
    monkeypatch.setattr(lora_tma, "gemm", lambda *a, **kw: (tma_calls.append((kw["epi"], kw["variant"])),
                                                            real_tma(*a, **kw))[1])
    fake = iter(range(1000, 0, -1))  # later candidates are "faster": the last of each kind wins
    monkeypatch.setattr(tune_lora, "_time", lambda fn: (fn(), float(next(fake)))[1])
    e = tune_lora.tune_shape(70, 48, 40, 16, dtype=torch.float16, dev="cpu")
    assert (e["fwd"], e["fwd_cfg"]) == ("fused", list(cands[-1]))
    # TMA candidates also time the fused backward, without and with dA ("fused_da", timed last)
    assert (e["bwd"], e["bwd_cfg"]) == ("fused_da", list(cands[-1]))
    assert len(e["us"]["fwd"]) == 1 + 2 * len(cands) and len(e["us"]["bwd"]) == 1 + len(cands) + 4
    assert all(isinstance(v, float) for d in ("fwd", "bwd") for v in e["us"][d].values()), e["us"]
    # their kernels ran (and agreed with cuBLAS): split (EPI 1) and fused (2) forward, fused backward (3)
    assert set(tma_calls) == {(epi, v) for epi in (1, 2, 3) for v in (1, 2)}
    lora_tuning.validate({"entries": {"fp16:128:48:40:16": {k: v for k, v in e.items() if k != "us"}}}, "tuned")
    # the compile-ahead pass (tune_lora.warm's workers) runs only its slice of candidates, untimed
    tma_calls.clear()
    monkeypatch.setattr(tune_lora, "_time", lambda fn: pytest.fail("the warm pass must not time"))
    assert tune_lora.tune_shape(70, 48, 40, 16, dtype=torch.float16, dev="cpu", warm_only={2}) == 5  # 2 fwd, 3 bwd
    assert set(tma_calls) == {(1, 2), (2, 2), (3, 2)}


def test_rank_scale_vector_is_built_per_rank_and_cached():
    got = lora_group._rank_scale((2, 3), (0.5, 2.0), "cpu")
    assert got.tolist() == [0.5, 0.5, 2.0, 2.0, 2.0] and got.dtype == torch.float32
    assert lora_group._rank_scale([2, 3], [0.5, 2], torch.device("cpu")) is got
    f64 = lora_group._rank_scale((2, 3), (0.5, 2.0), "cpu", torch.float64)
    assert f64.dtype == torch.float64 and f64 is not got


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_cuda_graph_capture_with_new_scales(backend, monkeypatch):
    """Forward + backward captured in a CUDA graph, with scales first seen inside the capture (the
    per-rank scale vector must be built without a host-to-device copy), replayed, equals eager.
    The CUDA library's op failed this way on an H200 ("Cannot copy between CPU and CUDA tensors
    during CUDA graph capture"), in benchmarks/results/nvidia-h200/bench_lora_quick.json."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    if backend == "cuda":
        from ril_fast.kernels import cuda_lib

        ok, why = cuda_lib.available()
        if not ok:
            pytest.skip(f"CUDA library not built: {why}")
    monkeypatch.setenv("RIL_FAST_KERNELS", backend)
    x, w, b, a, bb, _ = _make("cuda", torch.bfloat16, (256,), 320, 320, (4, 16), 1)
    gy = torch.randn(256, 320, device="cuda").to(torch.bfloat16)
    warm = [0.25, 0.75]
    scales = [0.3125, 1.625]  # not in the scale cache before the capture

    def step(sc):
        for t in (x, a[1], bb[1]):
            t.grad = None
        y = kernels.lora_group_linear(x, w, b, a, bb, sc)
        y.backward(gy)
        return y

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        step(warm)  # compiles and loads everything outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = step(scales)
    graph.replay()
    torch.cuda.synchronize()
    got = {"y": y.detach().clone(), "dx": x.grad.clone(), "dA1": a[1].grad.clone(), "dB1": bb[1].grad.clone()}
    for t in (x, a[1], bb[1]):
        t.grad = None
    ref = _run(kernels.lora_group_linear, x, w, b, a, bb, scales, gy)
    for k, v in ref.items():
        # same kernels and inputs; fp32 atomics (split-N dS) may sum in another order
        torch.testing.assert_close(got[k], v, rtol=1.6e-2, atol=1e-2 * v.abs().max().item(), msg=k)


def test_profile_lora_host_runs_on_cpu(tmp_path):
    """benchmarks/profile_lora_host.py's CPU mode (kernel launches stubbed, in its own process so the
    stubs never reach other tests; ``public_bound`` runs Triton's binder per launch) writes a host-cost
    row per provider, case and mode."""
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "host.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(root / "benchmarks" / "profile_lora_host.py"), "--device", "cpu",
                           "--rounds", "1", "--calls", "2", "--out", str(out)], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rec = json.loads(out.read_text())
    assert rec["kernel_launches_stubbed"] is True
    provs = {"float32": {"base", "peft_eager", "torch_stacked", "fused", "triton_untuned", "public",
                         "fused_cublas_bwd", "public_bound"},
             "bfloat16": {"public", "public_bound", "tma_fused_da", "tma_fused_da_bound"}}
    assert {(r["r"], r["k"]) for r in rec["rows"]} == {(4, 1), (16, 4)}
    for case in ((4, 1), (16, 4)):
        for dtype, names in provs.items():
            rows = {r["provider"]: r for r in rec["rows"] if (r["r"], r["k"]) == case and r["dtype"] == dtype}
            assert set(rows) == names
            assert all(r[m] > 0 for r in rows.values()
                       for m in ("forward_host_us", "full_host_us", "no_grad_forward_host_us"))
            # the launches the stubs counted per fwd + bwd: the Hopper path really took the TMA kernel
            assert rows["public_bound"]["triton_launches_per_full"]["_ds_db_kernel"] == 1
            if dtype == "bfloat16":
                assert rows["tma_fused_da_bound"]["triton_launches_per_full"] == {"_gemm_tma_kernel": 2}
            else:
                assert rows["torch_stacked"]["triton_launches_per_full"] == {}
    assert "lora_group_linear" in rec["public_full_cprofile"]


def test_bench_lora_summary_ratios():
    """benchmarks/bench_lora.summarize: each target's ratio from the providers' medians (synthetic rows)."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from bench_lora import summarize, table

    rows = []
    for prov, fwd, full in (("base", 10, 20), ("fused", 12, 30), ("peft_eager", 30, 90), ("torch_stacked", 15, 36),
                            ("triton_base", 11, None), ("triton_base_tma", 9, None), ("triton_tma", 11, 25),
                            ("triton_tma_da", 11, 23)):
        rows.append(dict(shape="s", r=16, k=4, mode="forward", graph=True, provider=prov, median_ms=fwd))
        if full:
            rows.append(dict(shape="s", r=16, k=4, mode="full", graph=True, provider=prov, median_ms=full))
    got = summarize(rows)["s/r16/k4"]
    assert got == {"fwd_x_base_graph": 1.2, "full_x_base_graph": 1.5, "peft_speedup_graph": 3.0,
                   "stacked_speedup_graph": 1.2, "full_ms_graph": 30, "gemm_x_base_graph": 1.1,
                   "gemm_tma_x_base_graph": 0.9, "tma_fwd_x_base_graph": 1.1, "tma_full_x_base_graph": 1.25,
                   "tma_da_full_x_base_graph": 1.15}
    assert "tma_da_full_x_base" in table(summarize(rows)).splitlines()[0]


def test_tuner_compile_ahead_pass_runs_every_candidate_in_worker_processes():
    """tune_lora.warm: spawned workers (the environment inherited, here the interpreter) each run
    their slice of the candidates once; together every candidate of every shape runs."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("runs the Triton candidates through the interpreter")
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import tune_lora

    cands = tune_lora.candidates("cpu")
    secs, ran = tune_lora.warm([("tiny", 40, 32, 24)], True, 2, dtype=torch.float16, dev="cpu")
    # per R bucket (16, 64): split + fused forward and the Triton backward for all; the fused
    # backward, without and with dA, for the TMA candidates
    tma = sum(1 for c in cands if c[6])
    assert ran == 2 * (3 * len(cands) + 2 * tma), (ran, len(cands), tma)
