#!/usr/bin/env bash
# GPU check of the CUDA library and the fused distillation loss, sized for a ~4 minute slice on one
# H100/H200 (nvcc 13, cmake, torch 2.11, triton 3.6; no internet). Run from anywhere:
#   OUT=/some/dir bash benchmarks/gpu_cuda.sh
# Every part has its own timeout and the script never stops early: a failed build still lets the
# Triton tests and benchmark run (the cuda-backend tests then skip with the reason).
set -x
cd "$(dirname "$0")/.." || exit 1
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PYTHON:-python}
BUILD=${RIL_BUILD_DIR:-/tmp/ril_fast_cuda_build}
# tests/conftest.py defaults TRITON_INTERPRET to 1; on a GPU the kernels must be compiled.
export TRITON_INTERPRET=0
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.total --format=csv > "$OUT/gpu_info.csv" 2>&1
$PY -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)" \
  > "$OUT/versions.txt" 2>&1

# 1. Build the library for sm_90 only (the machine's arch): ~20 s on 16 cores.
start=$(date +%s)
timeout 60 cmake -S . -B "$BUILD" -DRIL_CUDA_ARCHS=90 > "$OUT/cmake_build.log" 2>&1 \
  && timeout 120 cmake --build "$BUILD" -j "$(nproc)" >> "$OUT/cmake_build.log" 2>&1
echo "build rc=$? seconds=$(( $(date +%s) - start ))" | tee -a "$OUT/cmake_build.log"
ls -la ril_fast/_lib/ >> "$OUT/cmake_build.log" 2>&1
$PY -c "from ril_fast.kernels import cuda_lib; print(cuda_lib.available())" >> "$OUT/cmake_build.log" 2>&1

# 2. Tests on CUDA tensors: loader tests, GPU parity of both ops, distill tests for triton and cuda.
timeout 150 $PY -m pytest -q -rs -p no:cacheprovider tests/test_cuda_lib.py tests/test_kernels_distill.py \
  --junitxml "$OUT/gpu_tests.xml" > "$OUT/gpu_tests.log" 2>&1
echo "pytest rc=$?" | tee -a "$OUT/gpu_tests.log"
tail -n 30 "$OUT/gpu_tests.log"

# 3. Benchmark (JSON under $OUT).
timeout 120 $PY benchmarks/bench_distill.py --out "$OUT/bench_distill.json" > "$OUT/bench_distill.log" 2>&1
echo "bench rc=$?" | tee -a "$OUT/bench_distill.log"
cat "$OUT/bench_distill.log"
exit 0
