"""Fused distillation MSE (Triton, and the CUDA library when built) against diffusers' DDIM math.

The oracle is independent of ril_fast: ``DDIMScheduler.step(...).pred_original_sample`` with the
scheduler's own ``alphas_cumprod``, then ``F.mse_loss`` and torch autograd. On CPU the Triton
kernels run in the interpreter (conftest sets TRITON_INTERPRET=1); on a GPU machine the same tests
run on CUDA tensors, for the 'cuda' backend too when the library is built.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

try:
    from diffusers import DDIMScheduler
except ImportError:  # the GPU image ships without diffusers; see _InlineDDIM
    DDIMScheduler = None

import ril_fast.kernels as K
from ril_fast.kernels import x0_mse as D

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
PREDS = ("epsilon", "v_prediction", "sample")
# (dtype, rtol on the loss, rtol on the gradient): the oracle works in fp32 on the same low-precision
# inputs, so the loss is near exact; the gradient is rounded once to the input dtype.
DTYPES = [(torch.float32, 1e-5, 1e-5), (torch.float16, 1e-4, 2e-3), (torch.bfloat16, 1e-4, 1.6e-2)]


def _cuda_lib_ok() -> tuple[bool, str]:
    if DEVICE != "cuda":
        return False, "needs a CUDA device"
    from ril_fast.kernels import cuda_lib

    return cuda_lib.available()


BACKENDS = ["triton", pytest.param("cuda", marks=pytest.mark.gpu)]


def _skip_unavailable(backend: str) -> None:
    if backend == "cuda":
        ok, why = _cuda_lib_ok()
        if not ok:
            pytest.skip(f"CUDA library unavailable: {why}")


def _op(backend: str):
    """The fused op of ``backend``: Triton's, or the CUDA library's."""
    if backend == "cuda":
        from ril_fast.kernels import cuda_lib

        return cuda_lib.distill_mse
    return D.distill_mse


class _InlineDDIM:
    """diffusers' DDIMScheduler x0 math written out (scheduling_ddim.py, step(): pred_original_sample),
    used only where diffusers is not installed. Independent of ril_fast's own code."""

    def __init__(self, pred):
        betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float32) ** 2
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
        self.timesteps = torch.arange(0, 1000, 20).flip(0)  # 50 steps, "leading" spacing
        self.pred = pred

    def step(self, out, t, x):
        a = self.alphas_cumprod[t]
        b = 1 - a
        if self.pred == "epsilon":
            x0 = (x - b**0.5 * out) / a**0.5
        elif self.pred == "v_prediction":
            x0 = a**0.5 * x - b**0.5 * out
        else:
            x0 = out
        return type("Out", (), {"pred_original_sample": x0})


def _scheduler(pred: str):
    if DDIMScheduler is None:
        return _InlineDDIM(pred)
    sched = DDIMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085,
                          beta_end=0.012, prediction_type=pred, clip_sample=False)
    sched.set_timesteps(50)
    return sched


def _oracle(sched, student, teacher, x_t, timesteps, weight):
    """Loss and d loss / d student from diffusers' step() + F.mse_loss, all in fp32."""
    s = student.detach().float().cpu().requires_grad_(True)
    t, x = teacher.float().cpu(), x_t.float().cpu()
    per = []
    for b, ts in enumerate(timesteps):
        x0_s = sched.step(s[b:b + 1], int(ts), x[b:b + 1]).pred_original_sample
        x0_t = sched.step(t[b:b + 1], int(ts), x[b:b + 1]).pred_original_sample
        per.append(F.mse_loss(x0_s, x0_t))
    per = torch.stack(per)
    loss = (per * weight.float().cpu()).mean() if weight is not None else per.mean()
    loss.backward()
    return loss.detach(), s.grad


def _inputs(shape, dtype, weighted, pred):
    sched = _scheduler(pred)
    bsz = shape[0]
    timesteps = sched.timesteps[torch.randint(0, len(sched.timesteps), (bsz,))]
    alpha_bar = sched.alphas_cumprod[timesteps].to(DEVICE)
    student = torch.randn(shape, device=DEVICE).to(dtype).requires_grad_(True)
    teacher = (student.detach().float() + 0.3 * torch.randn(shape, device=DEVICE)).to(dtype)
    x_t = torch.randn(shape, device=DEVICE).to(dtype)
    weight = (torch.rand(bsz, device=DEVICE) + 0.5) if weighted else None
    return sched, timesteps, alpha_bar, student, teacher, x_t, weight


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype,rtol_loss,rtol_grad", DTYPES, ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("shape,weighted", [((3, 4, 9, 7), True), ((2, 3, 50, 61), False)], ids=["odd", "multiblock"])
def test_matches_ddim_scheduler(backend, pred, dtype, rtol_loss, rtol_grad, shape, weighted):
    _skip_unavailable(backend)
    sched, timesteps, alpha_bar, student, teacher, x_t, weight = _inputs(shape, dtype, weighted, pred)
    loss = _op(backend)(student, teacher, x_t, alpha_bar, pred, weight)
    loss.backward()
    ref_loss, ref_grad = _oracle(sched, student, teacher, x_t, timesteps, weight)
    assert loss.dtype == torch.float32 and loss.shape == ()
    torch.testing.assert_close(loss.detach().cpu(), ref_loss, rtol=rtol_loss, atol=1e-7)
    assert student.grad.dtype == dtype and student.grad.shape == student.shape
    scale = ref_grad.abs().max()
    torch.testing.assert_close(student.grad.float().cpu(), ref_grad, rtol=rtol_grad, atol=rtol_grad * scale)


@pytest.mark.parametrize("backend", BACKENDS)
def test_teacher_gets_no_grad_and_grad_output_scales(backend):
    _skip_unavailable(backend)
    sched, timesteps, alpha_bar, student, teacher, x_t, weight = _inputs((2, 4, 5, 5), torch.float32, True, "epsilon")
    teacher.requires_grad_(True)
    loss = _op(backend)(student, teacher, x_t, alpha_bar, "epsilon", weight)
    (3.5 * loss).backward()
    assert teacher.grad is None
    _, ref_grad = _oracle(sched, student, teacher.detach(), x_t, timesteps, weight)
    torch.testing.assert_close(student.grad.cpu(), 3.5 * ref_grad, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bitwise_deterministic(backend):
    """Repeated calls are bitwise equal whichever program draws the last ticket. Only a GPU runs programs
    concurrently: the interpreter runs them in order, so on CPU the repeat could not fail (skipped)."""
    _skip_unavailable(backend)
    if DEVICE != "cuda":
        pytest.skip("needs a CUDA device: the interpreter runs programs in order, so any reduction repeats")
    _, _, alpha_bar, student, teacher, x_t, weight = _inputs((3, 4, 40, 50), torch.float16, True, "v_prediction")
    runs = []
    for _ in range(2):
        student.grad = None
        loss = _op(backend)(student, teacher, x_t, alpha_bar, "v_prediction", weight)
        loss.backward()
        runs.append((loss.detach().clone(), student.grad.clone()))
    assert torch.equal(runs[0][0], runs[1][0]) and torch.equal(runs[0][1], runs[1][1])


def test_public_op_dispatches_to_triton(monkeypatch):
    monkeypatch.setenv("RIL_FAST_KERNELS", "triton")
    K.clear_cache()
    sched, timesteps, alpha_bar, student, teacher, x_t, weight = _inputs((2, 4, 6, 6), torch.float32, True, "epsilon")
    calls = []
    orig = D._triton_fwd
    monkeypatch.setattr(D, "_triton_fwd", lambda *a: calls.append(1) or orig(*a))
    loss = K.distill_mse(student, teacher, x_t, alpha_bar, "epsilon", weight)
    assert calls == [1]
    ref_loss, _ = _oracle(sched, student, teacher, x_t, timesteps, weight)
    torch.testing.assert_close(loss.detach().cpu(), ref_loss, rtol=1e-5, atol=0)


def test_opcheck():
    _, _, alpha_bar, student, teacher, _, weight = _inputs((2, 3, 5, 7), torch.float32, True, "v_prediction")
    for w in (weight, None):
        torch.library.opcheck(torch.ops.ril_fast.distill_mse_fwd.default,
                              (student, teacher, alpha_bar.float(), w, "v_prediction"))
    grad = torch.tensor(1.5, device=DEVICE)
    torch.library.opcheck(torch.ops.ril_fast.distill_mse_bwd.default,
                          (grad, student.detach(), teacher, alpha_bar.float(), weight, "epsilon"))


@pytest.mark.parametrize("bad,match", [
    (dict(prediction_type="x0"), "prediction_type must be one of"),
    (dict(teacher_out=torch.zeros(2, 3)), "same shape"),
    (dict(alpha_bar=torch.ones(3)), r"alpha_bar must be a \(2,\) tensor"),
    (dict(weight=torch.ones(2, 1)), r"weight must be a \(2,\) tensor"),
    (dict(student_out=torch.zeros(2, 4, dtype=torch.float64)), "dtype torch.float64"),
])
def test_rejects_bad_arguments(bad, match):
    args = dict(student_out=torch.zeros(2, 4), teacher_out=torch.zeros(2, 4), x_t=torch.zeros(2, 4),
                alpha_bar=torch.ones(2), prediction_type="epsilon", weight=None)
    args.update(bad)
    if "student_out" in bad:
        args["teacher_out"] = args["x_t"] = torch.zeros_like(bad["student_out"])
    with pytest.raises(ValueError, match=match):
        D.distill_mse(**args)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_cuda_graph_capture_without_host_sync(backend):
    _skip_unavailable(backend)
    sched, timesteps, alpha_bar, student, teacher, x_t, weight = _inputs((4, 4, 64, 64), torch.bfloat16, True,
                                                                         "epsilon")
    leaf = student.detach().clone().requires_grad_(True)

    def step():
        leaf.grad = None
        loss = _op(backend)(leaf, teacher, x_t, alpha_bar, "epsilon", weight)
        loss.backward()
        return loss

    torch.cuda.set_sync_debug_mode("error")  # any host sync inside the op raises
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up compiles and loads everything outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loss = step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    graph.replay()
    torch.cuda.synchronize()
    ref_loss, ref_grad = _oracle(sched, leaf, teacher, x_t, timesteps, weight)
    torch.testing.assert_close(loss.cpu(), ref_loss, rtol=1e-4, atol=0)
    torch.testing.assert_close(leaf.grad.float().cpu(), ref_grad, rtol=1.6e-2, atol=1.6e-2 * ref_grad.abs().max())


# ------------------------------------------------------------------------------------------------
# One-launch forward: last-program ticket reduction
# ------------------------------------------------------------------------------------------------

# Rows that span several forward programs (Triton: 4096 elements each, CUDA: 8192), with a ragged
# last block, so every program but one leaves after drawing its ticket and one sums all partials.
TICKET_SHAPES = [((3, 5, 71, 103), True), ((2, 1, 3, 8193), False), ((1, 1, 1, 12289), True)]


def _launch_counter(monkeypatch):
    """Wrap every Triton kernel that distill launches; returns the list of launched kernel names."""
    calls = []

    class _Counted:
        def __init__(self, name, fn):
            self.name, self.fn = name, fn

        def __getitem__(self, grid):
            calls.append(self.name)
            return self.fn[grid]

    for name in [n for n in vars(D) if n.endswith("_kernel")]:
        monkeypatch.setattr(D, name, _Counted(name, getattr(D, name)))
    return calls


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pred", PREDS)
@pytest.mark.parametrize("shape,weighted", TICKET_SHAPES, ids=["b3_9prog", "b2_7prog", "b1_4prog"])
def test_many_programs_per_sample_match_ddim(backend, pred, shape, weighted):
    _skip_unavailable(backend)
    sched, timesteps, alpha_bar, student, teacher, x_t, weight = _inputs(shape, torch.float32, weighted, pred)
    loss = _op(backend)(student, teacher, x_t, alpha_bar, pred, weight)
    loss.backward()
    ref_loss, ref_grad = _oracle(sched, student, teacher, x_t, timesteps, weight)
    torch.testing.assert_close(loss.detach().cpu(), ref_loss, rtol=2e-5, atol=1e-7)
    torch.testing.assert_close(student.grad.cpu(), ref_grad, rtol=1e-5, atol=1e-5 * ref_grad.abs().max())


@pytest.mark.parametrize("block,programs", [(16, 6), (32, 2), (64, 1)])
def test_several_blocks_per_forward_program_match_ddim(monkeypatch, block, programs):
    """Programs that reduce several blocks each (big inputs: the grid is capped at FWD_PROGRAMS),
    with ragged last programs and blocks, give the scheduler's loss; the program-count heuristic
    only grows the blocks per program past FWD_PROGRAMS."""
    assert D._iters_for(D.FWD_PROGRAMS, 1) == 1 and D._iters_for(D.FWD_PROGRAMS + 1, 1) == 2
    assert D._iters_for(10 ** 6, 4) == D.MAX_FWD_ITERS and D._iters_for(320, 4) == 4
    monkeypatch.setattr(D, "BLOCK", block)  # small shapes, many blocks: what a feature map does at 4096
    monkeypatch.setattr(D, "FWD_PROGRAMS", programs)
    sched, timesteps, alpha_bar, student, teacher, x_t, weight = _inputs((3, 5, 7, 11), torch.float32, True,
                                                                         "v_prediction")
    assert D._iters_for(-(-385 // block), 3) > 1
    got = D.distill_mse(student, teacher, x_t, alpha_bar, "v_prediction", weight)
    ref_loss, _ = _oracle(sched, student, teacher, x_t, timesteps, weight)
    torch.testing.assert_close(got.detach().cpu(), ref_loss, rtol=2e-5, atol=1e-7)


def test_forward_is_one_triton_launch(monkeypatch):
    calls = _launch_counter(monkeypatch)
    _, _, alpha_bar, student, teacher, x_t, weight = _inputs((3, 5, 71, 103), torch.bfloat16, True, "epsilon")
    loss = D.distill_mse(student, teacher, x_t, alpha_bar, "epsilon", weight)
    assert calls == ["_distill_fwd_kernel"]
    loss.backward()
    assert calls == ["_distill_fwd_kernel", "_distill_bwd_kernel"]
    torch.testing.assert_close(loss.detach().cpu(), K.reference.distill_mse(student, teacher, x_t, alpha_bar,
                                                                              "epsilon", weight).detach().cpu(),
                               rtol=1e-5, atol=0)


def test_ticket_counter_is_cached_and_back_to_zero():
    dev = torch.device(DEVICE)
    counter = D._ticket_counter(dev)
    assert counter.dtype == torch.int32 and counter.numel() == 1 and D._ticket_counter(dev) is counter
    # Grids of 27, 1 and 7 programs in turn: each call must start from 0 and leave 0 behind.
    for shape in [(3, 5, 71, 103), (2, 3, 5), (1, 1, 1, 4096 * 6 + 3), (3, 5, 71, 103)]:
        _, _, alpha_bar, student, teacher, x_t, weight = _inputs(shape, torch.float32, True, "v_prediction")
        loss = D.distill_mse(student, teacher, x_t, alpha_bar, "v_prediction", weight)
        assert int(counter.item()) == 0
        ref = K.reference.distill_mse(student, teacher, x_t, alpha_bar, "v_prediction", weight)
        torch.testing.assert_close(loss.detach().cpu(), ref.detach().cpu(), rtol=2e-5, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("pred", PREDS)
def test_consecutive_calls_bitwise_equal_across_sizes(backend, pred):
    """Interleaved sizes (different program counts) repeat bit for bit: the counter resets every call."""
    _skip_unavailable(backend)
    cases = [_inputs(shape, dtype, True, pred) for shape, dtype in
             [((3, 5, 71, 103), torch.bfloat16), ((2, 3, 5), torch.float16), ((2, 1, 3, 8193), torch.float32)]]
    first = []
    for rep in range(2):
        for i, (_, _, alpha_bar, student, teacher, x_t, weight) in enumerate(cases):
            student.grad = None
            loss = _op(backend)(student, teacher, x_t, alpha_bar, pred, weight)
            loss.backward()
            got = (loss.detach().clone(), student.grad.clone())
            if rep == 0:
                first.append(got)
                ref = K.reference.distill_mse(student, teacher, x_t, alpha_bar, pred, weight)
                torch.testing.assert_close(got[0].cpu(), ref.detach().cpu(), rtol=1e-4, atol=0)
            else:
                assert torch.equal(got[0], first[i][0]) and torch.equal(got[1], first[i][1]), f"case {i}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_feature_map_bitwise_over_repeats_and_streams(backend):
    """A (4, 320, 64, 64) map: >1000 programs finish in a different order every run, yet the loss is
    bitwise equal over repeats and on other streams, also two streams at once."""
    _skip_unavailable(backend)
    shape = (4, 320, 64, 64)
    _, _, alpha_bar, student, teacher, x_t, weight = _inputs(shape, torch.bfloat16, True, "epsilon")
    student = student.detach()

    def run(s):
        return _op(backend)(s, teacher, x_t, alpha_bar, "epsilon", weight)

    first = run(student)
    ref = K.reference.distill_mse(student, teacher, x_t, alpha_bar, "epsilon", weight)
    torch.testing.assert_close(first, ref, rtol=1e-4, atol=0)
    for _ in range(20):
        assert torch.equal(run(student), first)
    other = (student.float() * 0.5).to(torch.bfloat16)
    first_other = run(other)
    streams = [torch.cuda.Stream(), torch.cuda.Stream()]
    for st in streams:
        st.wait_stream(torch.cuda.current_stream())
    outs = [[], []]
    for _ in range(10):  # the two streams' forwards overlap; each stream has its own counter
        for st, inp, acc in zip(streams, (student, other), outs):
            with torch.cuda.stream(st):
                acc.append(run(inp))
    for st in streams:
        torch.cuda.current_stream().wait_stream(st)
    torch.cuda.synchronize()
    assert all(torch.equal(o, first) for o in outs[0]) and all(torch.equal(o, first_other) for o in outs[1])
    if backend == "triton":
        counters = []
        for st in streams:
            with torch.cuda.stream(st):
                counters.append(D._ticket_counter(student.device))
        assert counters[0].data_ptr() != counters[1].data_ptr()
        assert all(int(c.item()) == 0 for c in counters)


@pytest.mark.gpu
@pytest.mark.parametrize("cache", ["slab", "fresh"])
def test_capture_gets_a_zero_counter(cache, monkeypatch):
    """Under capture a stream with no counter takes a free slab entry, or (no slab yet) a zeroed
    tensor inside the capture that is not cached; either way every replay is correct."""
    _, _, alpha_bar, student, teacher, x_t, weight = _inputs((2, 4, 64, 64), torch.bfloat16, True, "sample")
    student = student.detach()
    ref = D.distill_mse(student, teacher, x_t, alpha_bar, "sample", weight)  # compiles, outside the capture
    torch.cuda.synchronize()
    if cache == "fresh":
        monkeypatch.setattr(D, "_slabs", {})
        monkeypatch.setattr(D, "_counters", {})
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = D.distill_mse(student, teacher, x_t, alpha_bar, "sample", weight)
    assert (len(D._counters) == 0) == (cache == "fresh")  # capture-pool memory is never cached
    for _ in range(3):
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(loss, ref)
