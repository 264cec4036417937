"""The ctypes loader of the CUDA library (CPU: loading, ABI and error paths) and its kernels (GPU).

CPU tests build tiny stand-in shared libraries with the system C compiler, so they check the real
``ctypes`` loading path without nvcc. Status-to-error on the real library is covered in
test_kernels_compile_cuda.py (built there with nvcc); parity with the torch reference runs on a GPU.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess

import pytest
import torch

from ril_fast import kernels
from ril_fast.kernels import cuda_lib, reference


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """An empty library folder and no cached library."""
    monkeypatch.setattr(cuda_lib, "LIB_DIR", tmp_path)
    cuda_lib.reset()
    yield tmp_path
    cuda_lib.reset()


def _build_so(tmp_path, name: str, source: str):
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to build a stand-in library")
    src = tmp_path / f"{name}.c"
    src.write_text(source)
    out = tmp_path / f"{name}.so"
    subprocess.run([cc, "-shared", "-fPIC", str(src), "-o", str(out)], check=True)
    return out


def test_missing_library_gives_reason(fresh):
    ok, why = cuda_lib.available()
    assert not ok
    assert "no libril_fast_cuda" in why and "cmake" in why
    with pytest.raises(RuntimeError, match="CUDA library unavailable: no libril_fast_cuda"):
        cuda_lib._lib()


def test_abi_mismatch_is_refused(fresh, monkeypatch):
    _build_so(fresh, "libril_fast_cuda130", "int ril_abi_version(void) { return 999; }\n")
    ok, why = cuda_lib.available()
    assert not ok
    assert f"ABI version 999 but this ril_fast needs {cuda_lib.ABI_VERSION}" in why and "rebuild" in why


def test_foreign_library_is_refused(fresh, monkeypatch):
    _build_so(fresh, "libril_fast_cuda130", "int something_else(void) { return 1; }\n")
    ok, why = cuda_lib.available()
    assert not ok and "not a ril_fast CUDA library" in why


def test_library_missing_a_symbol_is_refused(fresh):
    # Found by the folder search, right ABI, but built from an older csrc/ without the ops.
    _build_so(fresh, "libril_fast_cuda130", f"int ril_abi_version(void) {{ return {cuda_lib.ABI_VERSION}; }}\n"
              "const char* ril_status_string(int s) { return \"x\"; }\n"
              "long ril_distill_mse_workspace_floats(long b, long n) { return 0; }\n")
    ok, why = cuda_lib.available()
    assert not ok and "lacks ril_lora_group_fwd_f32" in why


def test_search_prefers_torch_cuda_version(fresh, monkeypatch):
    for tag in ("118", "130", "126"):
        (fresh / f"libril_fast_cuda{tag}.so").write_bytes(b"")
    monkeypatch.setattr(torch.version, "cuda", "12.6")
    assert cuda_lib._candidates()[0].name == "libril_fast_cuda126.so"
    monkeypatch.setattr(torch.version, "cuda", None)
    assert cuda_lib._candidates()[0].name == "libril_fast_cuda130.so"


class _FakeFn:
    def __init__(self, status):
        self.status, self.args = status, None

    def __call__(self, *args):
        self.args = args
        return self.status


class _FakeLib:
    """Stands in for the CDLL: one op returning a status, and the status strings."""

    def __init__(self, status):
        self.ril_distill_mse_fwd_bf16 = _FakeFn(status)

    @staticmethod
    def ril_status_string(status):
        return {1: b"invalid argument (null pointer)", 1002: b"out of memory"}[status]


@pytest.mark.parametrize("status,text", [(1, "invalid argument"), (1002, "out of memory")])
def test_nonzero_status_raises_runtime_error(monkeypatch, status, text):
    monkeypatch.setattr(cuda_lib, "_stream", lambda: 1234)
    lib = _FakeLib(status)
    expected = rf"ril_distill_mse_fwd_bf16\(B=2, N=8\) failed with status {status}: {text}"
    with pytest.raises(RuntimeError, match=expected):
        cuda_lib._call(lib, "ril_distill_mse_fwd", torch.bfloat16, "B=2, N=8", 1, 2)
    assert lib.ril_distill_mse_fwd_bf16.args == (1, 2, 1234)  # the stream goes last


def test_zero_status_passes(monkeypatch):
    """Status 0: the op ran (arguments, then the stream) and nothing is raised or looked up."""
    monkeypatch.setattr(cuda_lib, "_stream", lambda: 77)
    lib = _FakeLib(0)  # its ril_status_string has no entry for 0: looking it up would raise KeyError
    assert cuda_lib._call(lib, "ril_distill_mse_fwd", torch.bfloat16, "B=1, N=1", 5, 6) is None
    assert lib.ril_distill_mse_fwd_bf16.args == (5, 6, 77)


def test_refuses_unsupported_dtype_and_device():
    x = torch.zeros(4, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="supports .*float64"):
        cuda_lib.lora_group_linear(x, torch.zeros(3, 8, dtype=torch.float64), None, [], [], [])
    with pytest.raises(ValueError, match="x is on cpu; the CUDA library needs cuda tensors"):
        cuda_lib.lora_group_linear(x.float(), torch.zeros(3, 8), None, [], [], [])
    with pytest.raises(ValueError, match="student_out is on cpu"):
        cuda_lib._distill_fwd(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2), None, 0)


def test_signature_table_matches_header():
    """Each argtypes table has as many entries as the C prototype in csrc/ril_fast.h."""
    from pathlib import Path

    header = (Path(__file__).resolve().parents[1] / "csrc" / "ril_fast.h").read_text()
    for name, argtypes in cuda_lib.SIGNATURES.items():
        start = header.index(f"{name}_##SUFFIX(")
        proto = header[start:header.index(";", start)]
        assert proto.count(",") + 1 == len(argtypes), name
        assert proto.rstrip().rstrip("\\").rstrip().endswith("cudaStream_t stream)") and argtypes[-1] is ctypes.c_void_p


# ------------------------------------------------------------------------------------------------
# GPU parity with the torch reference
# ------------------------------------------------------------------------------------------------


def _need_lib():
    cuda_lib.reset()
    kernels.clear_cache()
    ok, why = cuda_lib.available()
    if not ok:
        pytest.skip(f"CUDA library unavailable: {why}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.float16, 1e-2), (torch.bfloat16, 2e-2)],
                         ids=["fp32", "fp16", "bf16"])
@pytest.mark.parametrize("m,d_in,d_out,ranks,train", [(154, 320, 123, [4, 16, 8], 1), (4096, 320, 320, [64], 0),
                                                       (77, 768, 320, [], None)], ids=["mixed", "sd15", "no-lora"])
def test_lora_group_matches_reference(dtype, tol, m, d_in, d_out, ranks, train):
    _need_lib()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cuda"
    x = torch.randn(2, m // 2 if m % 2 == 0 else m, d_in, device=dev, dtype=dtype).requires_grad_(True)
    w = (torch.randn(d_out, d_in, device=dev) / d_in**0.5).to(dtype)
    bias = torch.randn(d_out, device=dev, dtype=dtype)
    a = [(torch.randn(r, d_in, device=dev) / d_in**0.5).to(dtype).requires_grad_(i == train)
         for i, r in enumerate(ranks)]
    b = [(torch.randn(d_out, r, device=dev) * 0.1).to(dtype).requires_grad_(i == train) for i, r in enumerate(ranks)]
    scales = [0.5 + i for i in range(len(ranks))]
    y = cuda_lib.lora_group_linear(x, w, bias, a, b, scales)
    gy = torch.randn_like(y)
    y.backward(gy)
    # fp32 oracle on the same (rounded) inputs
    x32 = x.detach().float().requires_grad_(True)
    a32 = [t.detach().float().requires_grad_(t.requires_grad) for t in a]
    b32 = [t.detach().float().requires_grad_(t.requires_grad) for t in b]
    y32 = reference.lora_group_linear(x32, w.float(), bias.float(), a32, b32, scales)
    y32.backward(gy.float())

    def close(got, want):
        torch.testing.assert_close(got.float(), want, rtol=tol, atol=tol * want.abs().max().item())

    assert y.dtype == dtype
    close(y, y32)
    close(x.grad, x32.grad)
    for i in range(len(ranks)):
        if i == train:
            close(a[i].grad, a32[i].grad)
            close(b[i].grad, b32[i].grad)
        else:
            assert a[i].grad is None and b[i].grad is None


@pytest.mark.gpu
def test_lora_group_weight_and_bias_grads_fp32():
    _need_lib()
    torch.backends.cuda.matmul.allow_tf32 = False
    dev = "cuda"
    x = torch.randn(37, 70, device=dev, requires_grad=True)
    w = torch.randn(45, 70, device=dev, requires_grad=True)
    bias = torch.randn(45, device=dev, requires_grad=True)
    a, b = [torch.randn(8, 70, device=dev)], [torch.randn(45, 8, device=dev)]
    cuda_lib.lora_group_linear(x, w, bias, a, b, [2.0]).square().sum().backward()
    refs = [t.detach().clone().requires_grad_(True) for t in (x, w, bias)]
    reference.lora_group_linear(*refs, a, b, [2.0]).square().sum().backward()
    for got, want in zip((x, w, bias), refs):
        torch.testing.assert_close(got.grad, want.grad, rtol=1e-4, atol=1e-3)


@pytest.mark.gpu
def test_distill_matches_reference_and_status_on_bad_args():
    _need_lib()
    s = torch.randn(4, 4, 64, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    t = torch.randn_like(s).detach()
    ab = torch.rand(4, device="cuda") * 0.9 + 0.05
    loss = cuda_lib.distill_mse(s, t, torch.randn_like(t), ab, "epsilon")
    ref = reference.distill_mse(s.float(), t.float(), t.float(), ab, "epsilon")
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=0)
    # A null pointer reaches the library's own argument check and comes back as a RuntimeError.
    with pytest.raises(RuntimeError, match=r"ril_distill_mse_fwd_f32\(.*failed with status 1: invalid argument"):
        cuda_lib._call(cuda_lib._lib(), "ril_distill_mse_fwd", torch.float32, "null test", None, None, None, None,
                       None, None, 1, 1, 0)
    loss.backward()  # through the library's backward: d loss / d s = 2 c² (s - t) / N
    c2 = ((1 - ab) / ab).view(-1, 1, 1, 1)
    torch.testing.assert_close(s.grad.float(), 2 * c2 * (s.float() - t.float()) / s.numel(), rtol=2e-2, atol=1e-6)
