"""Fused LoRA group linear (Triton) against an fp64 torch reference and against PEFT, and the
dispatch rules of both fused ops.

On CPU the kernels run under TRITON_INTERPRET=1 with tiny shapes; with CUDA present the same
tests run on cuda tensors, plus real SD-sized bf16 shapes (``gpu`` marker).
"""

from __future__ import annotations

import inspect
import os
from types import SimpleNamespace

import pytest
import torch

from ril_fast import kernels
from ril_fast.kernels import dispatch, lora_group, reference

EPS = {torch.float32: 1e-6, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _devices():
    out = []
    if os.environ.get("TRITON_INTERPRET") == "1":
        out.append("cpu")
    out.append(pytest.param("cuda", marks=pytest.mark.gpu))
    return out


def _use(monkeypatch, backend):
    """``RIL_FAST_KERNELS=backend`` from now on (the decision is cached: forget it)."""
    monkeypatch.setenv("RIL_FAST_KERNELS", backend)
    kernels.clear_cache()


@pytest.fixture(params=_devices())
def device(request, monkeypatch):
    if request.param == "cuda" and not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _use(monkeypatch, "triton")
    yield request.param
    kernels.clear_cache()


@pytest.fixture
def deterministic():
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(False)


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
    "lead,d_in,d_out,ranks,train,bias",
    [
        ((200,), 96, 80, (4, 8, 5), 1, True),  # R=17 (not a multiple of 16), middle adapter
        ((64,), 160, 160, (16,), 0, False),  # single adapter, R=16 exactly, no bias
        ((2, 37), 71, 133, (8, 4, 4, 2), 3, True),  # 3-D input, odd dims, last adapter
        ((129,), 33, 47, (3, 5), 0, True),  # first adapter, M not a multiple of the tile
        ((64,), 40, 24, (16, 32, 16), (0, 2), False),  # R=64 (the register bound), two trainable adapters
    ],
)
def test_matches_fp64_reference(device, lead, d_in, d_out, ranks, train, bias):
    _compare(device, torch.float32, lead, d_in, d_out, ranks, train, bias)


def test_wider_groups_run_torchs_stacked_path(device, monkeypatch):
    """R > 64 does not fit the forward's register tile: the op runs torch's stacked path, exactly."""
    calls = []
    real = lora_group._LoraGroupFn.apply
    monkeypatch.setattr(lora_group._LoraGroupFn, "apply", lambda *a: calls.append(1) or real(*a))
    _compare(device, torch.float32, (96,), 48, 40, (48, 40), 1)
    assert calls == []
    _compare(device, torch.float32, (96,), 48, 40, (48, 16), 1)
    assert calls == [1]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision(device, dtype):
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
    monkeypatch.setattr(lora_group, "deterministic", lambda: det)
    _compare(device, torch.float16, (64,), 48, 40, (4, 13), 1)
    # dA always reduces over dS[:, 4:17]; deterministic dB over S[:, 4:17] as well: both copied
    assert seen and all(st == (1, 64) for st in seen), seen
    assert len(seen) == (2 if det else 1), seen


@pytest.mark.parametrize("det", [False, True])
def test_ds_db_against_fp64(device, det):
    """dS for all ranks and dB of a middle slice (atomics, or in deterministic mode the ordered
    split-K reduction), with an M tail and several N tiles; deterministic repeats bitwise equal."""
    torch.manual_seed(0)
    m, n, ranks = 70, 200, (4, 8, 4)
    r = sum(ranks)
    dy = torch.randn(m, n, device=device)
    b_cat = torch.randn(n, r, device=device)
    s = torch.randn(m, r, device=device)
    rscale = torch.rand(r, device=device) + 0.5
    got = lora_group.ds_db_launch(dy, b_cat, s, rscale, 4, 12, det)
    torch.testing.assert_close(got[0].double(), (dy.double() @ b_cat.double()) * rscale.double(), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(got[1].double(), dy.double().t() @ (s.double() * rscale.double())[:, 4:12],
                               rtol=1e-5, atol=1e-4)
    if det:
        again = lora_group.ds_db_launch(dy, b_cat, s, rscale, 4, 12, det)
        assert torch.equal(again[0], got[0]) and torch.equal(again[1], got[1])


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
def test_auto_runs_lora_on_torch_and_distill_on_triton_then_the_library(monkeypatch, triton_ok, cuda_ok, want):
    """auto on CUDA tensors: the LoRA op on torch's path (the fused op lost the whole step in plain
    launches), the distillation loss on Triton, else the CUDA library where Triton is absent, else
    torch; CPU tensors always torch (auto never picks the interpreter); named backends honoured."""
    _use(monkeypatch, "auto")
    checks = []
    monkeypatch.setattr(dispatch, "triton_available", lambda dev: checks.append(dev) or (triton_ok, "stub"))
    monkeypatch.setattr(dispatch, "cuda_lib_available", lambda dev: (cuda_ok, "stub"))
    gpu = torch.device("cuda", 0)
    assert dispatch.select_backend("distill_mse", gpu) == want
    assert dispatch.select_backend("lora_group_linear", gpu) == "torch"
    for op in ("lora_group_linear", "distill_mse"):
        assert dispatch.select_backend(op, torch.device("cpu")) == "torch"
    n = len(checks)  # decided once per (op, device, dtype): the per-call path does no checks
    assert dispatch.select_backend("distill_mse", gpu) == want and len(checks) == n
    for named, ok in (("cuda", cuda_ok), ("triton", triton_ok)):
        _use(monkeypatch, named)
        for op in ("lora_group_linear", "distill_mse"):
            if ok:
                assert dispatch.select_backend(op, gpu) == named
            else:
                with pytest.raises(RuntimeError, match=f"RIL_FAST_KERNELS={named} was asked for {op}"):
                    dispatch.select_backend(op, gpu)


def test_auto_keeps_rocm_and_fp64_off_the_fused_kernels(monkeypatch):
    """ROCm reports device type "cuda": auto runs both ops on torch's path there (never run on AMD
    hardware); fp64 CUDA tensors too (the GPU kernels are built for 16-bit and fp32)."""
    _use(monkeypatch, "auto")
    gpu = torch.device("cuda", 0)
    assert dispatch.select_backend("distill_mse", gpu, torch.bfloat16) == "triton"
    assert dispatch.select_backend("distill_mse", gpu, torch.float64) == "torch"
    monkeypatch.setattr(torch.version, "hip", "6.2.0")
    kernels.clear_cache()
    assert dispatch.select_backend("distill_mse", gpu, torch.bfloat16) == "torch"
    _use(monkeypatch, "triton")
    assert dispatch.select_backend("lora_group_linear", gpu, torch.float64) == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_the_gpu_op_runs_wide_precision_on_torchs_path(monkeypatch, dtype):
    """Outside the interpreter the Triton LoRA kernels take 16-bit I/O (fp32 tiles overflow shared
    memory on A100 and the 24 GB cards: the compile gate's finding): fp32 / fp64 run torch's
    stacked path, exactly, without a launch."""
    monkeypatch.setattr(lora_group, "INTERPRET", False)
    monkeypatch.setattr(lora_group, "fwd_launch", lambda *a: pytest.fail("launched a kernel"))
    x, w, b, a, bb, s = _make("cpu", dtype, (33,), 32, 24, (4, 8), 1)
    y = lora_group.lora_group_linear(x, w, b, a, bb, s)
    torch.testing.assert_close(y, reference.lora_group_linear(x, w, b, a, bb, s))


def test_the_hot_path_reads_no_environment(device, monkeypatch):
    """The backend is decided once per (op, device, dtype): later calls neither read the
    environment nor re-check the backends (a changed RIL_FAST_KERNELS needs clear_cache)."""
    x, w, b, a, bb, s = _make(device, torch.float32, (16,), 16, 16, (4,), 0)
    kernels.lora_group_linear(x, w, b, a, bb, s)

    class NoReads(dict):
        def get(self, *args):
            raise AssertionError(f"os.environ.get{args} on the hot path")

        __getitem__ = get

    # dispatch's own `os` only: replacing os.environ itself would fail every other reader in the
    # process too (pytest-xdist's worker thread reads it while the test runs)
    monkeypatch.setattr(dispatch, "os", SimpleNamespace(environ=NoReads()))
    monkeypatch.setattr(dispatch, "triton_available", lambda dev: pytest.fail("re-checked on the hot path"))
    y = kernels.lora_group_linear(x, w, b, a, bb, s)
    torch.testing.assert_close(y, reference.lora_group_linear(x, w, b, a, bb, s), rtol=1e-5, atol=1e-5)


def test_calls_on_another_gpu_switch_to_it(monkeypatch):
    """Triton launches on the current device, whatever its arguments' device: the Triton ops switch
    to the tensors' GPU when it is not the current one (the GPU test below runs it on two GPUs)."""
    entered = []
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.cuda, "device", lambda dev: entered.append(dev) or __import__("contextlib").nullcontext())
    call = kernels._on_its_gpu(lambda t, *rest: ("ran", rest))
    on_gpu1 = SimpleNamespace(is_cuda=True, get_device=lambda: 1, device="cuda:1")
    assert call(on_gpu1, 5) == ("ran", (5,)) and entered == ["cuda:1"]
    call(SimpleNamespace(is_cuda=True, get_device=lambda: 0, device="cuda:0"))
    call(torch.zeros(1))
    assert entered == ["cuda:1"]


@pytest.mark.gpu
def test_op_on_a_second_gpu_while_the_first_is_current(monkeypatch):
    """With GPU 0 current, the op on cuda:1 tensors (``model.device: cuda:1`` without the trainer's
    set_device) matches the reference: the kernels ran on GPU 1, not on GPU 0 with GPU 1's pointers."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    _use(monkeypatch, "triton")
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


@pytest.mark.parametrize("lead,d_in,d_out,ranks,train,det", [
    ((200,), 96, 80, (4, 8, 5), 1, False),  # split-K dA with atomics (M > 128)
    ((200,), 96, 80, (4, 8, 5), (0, 2), True),  # ordered partials: dA, dB
    ((2, 37), 71, 133, (8, 4, 4, 2), 3, False),
])
def test_fp64_is_exact_to_rounding(device, monkeypatch, lead, d_in, d_out, ranks, train, det):
    """In fp64 every kernel accumulates, reduces and scales in fp64: output and grads equal the fp64
    reference to ~1e-15 relative. A dropped or mis-scaled term, or a partial rounded to fp32 (1e-7),
    fails here though the fp32 comparisons above (1e-5) pass it."""
    if device == "cuda":
        pytest.skip("fp64 runs the Triton kernels only in the interpreter (on a GPU, auto sends it to torch)")
    monkeypatch.setattr(lora_group, "deterministic", lambda: det)
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


def test_deterministic_mode_is_bitwise_repeatable(device, deterministic, monkeypatch):
    """torch's deterministic algorithms switch the backward to ordered fp32 sums (no atomics).

    The interpreter runs a grid's programs one after another, so on CPU atomics repeat bitwise too and
    the repeat alone cannot fail: the test also checks that the ordered path was taken (every reduction
    launched deterministic, no atomic GEMM). The bitwise repeat is the real check on a GPU."""
    assert lora_group.deterministic()
    calls = {"det": [], "atomic": []}
    for name in ("ds_db_launch", "da_launch"):
        real = getattr(lora_group, name)

        def spy(*args, _real=real, **kw):
            calls["det"].append(inspect.signature(_real).bind(*args, **kw).arguments["deterministic"])
            return _real(*args, **kw)

        monkeypatch.setattr(lora_group, name, spy)
    real_gemm = lora_group._gemm
    monkeypatch.setattr(lora_group, "_gemm", lambda *a, **kw: calls["atomic"].append(bool(kw.get("atomic")))
                        or real_gemm(*a, **kw))
    first = _compare(device, torch.float32, (300,), 40, 48, (8, 8), 1)
    torch.manual_seed(0)
    second = _compare(device, torch.float32, (300,), 40, 48, (8, 8), 1)
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert calls["det"] and all(d is True for d in calls["det"]), calls["det"]
    assert calls["atomic"] and not any(calls["atomic"]), calls["atomic"]


def test_bad_shapes_raise_one_line_errors(device):
    x, w, b, a, bb, s = _make(device, torch.float32, (4,), 16, 8, (2,), 0)
    with pytest.raises(ValueError, match="do not fit W"):
        kernels.lora_group_linear(x, w, b, [a[0].t()], bb, s)
    with pytest.raises(ValueError, match="matching lists"):
        kernels.lora_group_linear(x, w, b, a, bb, [1.0, 2.0])


def test_custom_ops_pass_opcheck(device):
    """The launchers as torch.compile sees them: schema, fake tensors, AOT dispatch."""
    m, d_in, d_out, r = 40, 24, 20, 6
    t = lambda *sh: torch.randn(*sh, device=device)  # noqa: E731
    x, w, bias, a, b = t(m, d_in), t(d_out, d_in), t(d_out), t(r, d_in), t(d_out, r)
    rs = torch.full((r,), 0.5, device=device)
    y, s = lora_group.lora_fwd(x, w, bias, a, b, rs)
    torch.testing.assert_close(y, reference.lora_group_linear(x, w, bias, [a], [b], [0.5]), rtol=1e-4, atol=1e-4)
    dy = t(m, d_out)
    ds, _ = lora_group.lora_bwd_ds_db(dy, b, s, rs, 0, r, False)
    for op, args in [
        (lora_group.lora_fwd, (x, w, bias, a, b, rs)),
        (lora_group.lora_fwd, (x, w, None, a, b, rs)),
        (lora_group.lora_bwd_ds_db, (dy, b, s, rs, 2, 5, True)),
        (lora_group.lora_bwd_dx, (dy, w, ds, a)),
        (lora_group.lora_bwd_da, (ds, x, 0, 4, True)),
    ]:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_compile_path_runs_the_custom_ops(device, monkeypatch):
    """Under torch.compile (simulated: ``_compiling`` True) every launch goes through the custom ops,
    with the same results."""
    ops = []
    for name in ("lora_fwd", "lora_bwd_ds_db", "lora_bwd_dx", "lora_bwd_da"):
        real = getattr(lora_group, name)
        monkeypatch.setattr(lora_group, name, lambda *a, name=name, real=real: (ops.append(name), real(*a))[1])
    monkeypatch.setattr(lora_group, "_compiling", lambda: True)
    _compare(device, torch.float32, (70,), 40, 48, (4, 13), 1)
    assert ops == ["lora_fwd", "lora_bwd_ds_db", "lora_bwd_dx", "lora_bwd_da"]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "m,d_in,d_out,ranks",
    [(8192, 320, 320, (16, 16, 16, 16)), (4096, 640, 640, (64,)), (4096, 320, 2560, (4, 8)),
     (2048, 1280, 1280, (4,) * 8)],
)
def test_real_shapes_bf16_cuda(monkeypatch, m, d_in, d_out, ranks):
    """SD-sized layers on the GPU, bf16, the last adapter trainable."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    _use(monkeypatch, "triton")
    _compare("cuda", torch.bfloat16, (m,), d_in, d_out, ranks, len(ranks) - 1)


def test_two_forwards_before_backward(device):
    """Truncated backprop calls a layer K times before one backward: each call saves its own stacks."""
    x, w, b, a, bb, s = _make(device, torch.float32, (70,), 32, 24, (4, 4), 1)
    y = kernels.lora_group_linear(x, w, b, a, bb, s)
    y2 = kernels.lora_group_linear(x, w, b, a, bb, s)
    (y.sum() + y2.sum()).backward()
    ref = {n: t.detach().clone().requires_grad_(t.requires_grad) for n, t in
           {"x": x, "a1": a[1], "b1": bb[1]}.items()}
    ra, rb = [a[0].detach(), ref["a1"]], [bb[0].detach(), ref["b1"]]
    yr = reference.lora_group_linear(ref["x"], w, b, ra, rb, s)
    (2 * yr.sum()).backward()
    for got, want in ((x.grad, ref["x"].grad), (a[1].grad, ref["a1"].grad), (bb[1].grad, ref["b1"].grad)):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


def test_rank_scale_vector_is_built_per_rank_and_cached():
    got = reference.rank_scale((2, 3), (0.5, 2.0), "cpu")
    assert got.tolist() == [0.5, 0.5, 2.0, 2.0, 2.0] and got.dtype == torch.float32
    assert reference.rank_scale([2, 3], [0.5, 2], torch.device("cpu")) is got
    f64 = reference.rank_scale((2, 3), (0.5, 2.0), "cpu", torch.float64)
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
    _use(monkeypatch, backend)
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


def test_stacked_torch_path_equals_plain_reference():
    x = torch.randn(2, 7, 24, dtype=torch.float64, requires_grad=True)
    w, b = torch.randn(16, 24, dtype=torch.float64), torch.randn(16, dtype=torch.float64)
    a = [torch.randn(r, 24, dtype=torch.float64, requires_grad=True) for r in (2, 3, 4)]
    bb = [torch.randn(16, r, dtype=torch.float64, requires_grad=True) for r in (2, 3, 4)]
    scales = [0.5, 1.0, 2.0]
    y1 = reference.lora_group_linear(x, w, b, a, bb, scales)
    y2 = reference.lora_group_linear_stacked(x, w, b, a, bb, scales)
    torch.testing.assert_close(y1, y2)
    g1 = torch.autograd.grad(y1.square().sum(), [x, a[1], bb[2]])
    g2 = torch.autograd.grad(y2.square().sum(), [x, a[1], bb[2]])
    for p, q in zip(g1, g2):
        torch.testing.assert_close(p, q)
