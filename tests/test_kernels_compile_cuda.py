"""Compile gate for csrc/: CMake + nvcc build the C-ABI library for every target arch, no GPU needed.

Also checks what can be checked without a driver: the exported symbols load through the real
ctypes loader, the cubins for each arch are present, the library's own argument checks return a
status that the loader turns into a RuntimeError, and CMake without a CUDA compiler builds nothing.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch

from ril_fast.kernels import cuda_lib

pytestmark = pytest.mark.compile_gate

ROOT = Path(__file__).resolve().parents[1]
NVCC = shutil.which("nvcc")
CMAKE = shutil.which("cmake")
ARCHS = "80;86;89;90"  # the GPUs users train on: A100, RTX 3090 / A10, RTX 4090 / L4, H100 / H200


@pytest.fixture(scope="module")
def built_lib(tmp_path_factory):
    if NVCC is None:
        pytest.skip("nvcc not on PATH: the CUDA compile gate needs the CUDA toolkit")
    if CMAKE is None:
        pytest.skip("cmake not on PATH")
    build = tmp_path_factory.mktemp("cuda_build")
    out = build / "lib"
    t0 = time.perf_counter()
    cfg = subprocess.run([CMAKE, "-S", str(ROOT), "-B", str(build), f"-DRIL_CUDA_ARCHS={ARCHS}",
                          f"-DRIL_LIB_OUTPUT_DIR={out}", f"-DCMAKE_CUDA_COMPILER={NVCC}"],
                         capture_output=True, text=True)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    t1 = time.perf_counter()
    bld = subprocess.run([CMAKE, "--build", str(build), "-j", "2"], capture_output=True, text=True)
    assert bld.returncode == 0, bld.stdout[-4000:] + bld.stderr[-4000:]
    t2 = time.perf_counter()
    print(f"\ncmake configure {t1 - t0:.1f}s, build for sm {ARCHS} {t2 - t1:.1f}s")
    libs = list(out.glob("libril_fast_cuda*.so"))
    assert len(libs) == 1, f"expected one library in {out}, found {libs}"
    return libs[0]


def test_library_loads_with_every_symbol(built_lib):
    lib, reason = cuda_lib._open(built_lib)
    assert reason is None and lib is not None
    assert lib.ril_abi_version() == cuda_lib.ABI_VERSION
    assert lib.ril_distill_mse_workspace_floats(3, 8193) == 3 * 2  # 8192-element chunks per sample
    tag = "".join(v for v in built_lib.stem.replace("libril_fast_cuda", "") if v.isdigit())
    assert tag, f"no CUDA version in {built_lib.name}"


def test_bf16_gemm_uses_tensor_cores(tmp_path):
    """The bf16/fp16 GEMM must lower to mma.sync (no cuobjdump here, so check the PTX for sm_80)."""
    if NVCC is None:
        pytest.skip("nvcc not on PATH")
    ptx = tmp_path / "lora_group.ptx"
    subprocess.run([NVCC, "-std=c++17", "-ptx", "-arch=sm_80", "-I", str(ROOT / "csrc"),
                    str(ROOT / "csrc" / "lora_group.cu"), "-o", str(ptx)], check=True, capture_output=True)
    text = ptx.read_text()
    assert "wmma.mma.sync.aligned.row.col.m16n16k16.f32.bf16.bf16.f32" in text
    assert "wmma.mma.sync.aligned.row.col.m16n16k16.f32.f32" in text  # the f16-input form


def test_library_status_becomes_runtime_error(built_lib, monkeypatch):
    """Null pointers fail the library's own argument checks before any CUDA call (no driver needed)."""
    lib, _ = cuda_lib._open(built_lib)
    monkeypatch.setattr(cuda_lib, "_stream", lambda: 0)
    assert lib.ril_distill_mse_fwd_bf16(None, None, None, None, None, None, 2, 8, 0, None) == 1
    assert "invalid argument" in lib.ril_status_string(1).decode()
    assert lib.ril_status_string(1002).decode() == "out of memory"  # RIL_ERR_CUDA_BASE + cudaErrorMemoryAllocation
    with pytest.raises(RuntimeError, match=r"ril_lora_group_fwd_f16\(M=4\) failed with status 1: invalid argument"):
        cuda_lib._call(lib, "ril_lora_group_fwd", torch.float16, "M=4", None, 8, None, None, None, None, None, None,
                       None, 8, 4, 8, 8, 2)
    # A bad prediction type is refused by the library, not silently treated as 'sample'.
    assert lib.ril_distill_mse_bwd_f32(1, 1, 1, 1, None, 1, 2, 8, 7, None) == 1


def test_cmake_without_cuda_compiler_builds_nothing(tmp_path):
    if CMAKE is None:
        pytest.skip("cmake not on PATH")
    env = {k: v for k, v in os.environ.items() if k not in ("CUDACXX", "CUDA_HOME", "CUDA_PATH")}
    env["PATH"] = "/usr/bin:/bin"
    if shutil.which("nvcc", path=env["PATH"]):
        pytest.skip("nvcc is on the system PATH; cannot hide it")
    cfg = subprocess.run([CMAKE, "-S", str(ROOT), "-B", str(tmp_path / "b"), f"-DRIL_LIB_OUTPUT_DIR={tmp_path}/lib"],
                         capture_output=True, text=True, env=env)
    assert cfg.returncode == 0, cfg.stdout + cfg.stderr
    assert "no CUDA compiler found; the CUDA library is not built" in cfg.stdout
    bld = subprocess.run([CMAKE, "--build", str(tmp_path / "b")], capture_output=True, text=True, env=env)
    assert bld.returncode == 0
    assert not (tmp_path / "lib").exists() or not list((tmp_path / "lib").glob("*.so"))
