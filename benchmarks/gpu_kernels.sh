#!/usr/bin/env bash
# One device call for both kernel checks (LoRA group + distillation/CUDA library).
# The device tool returns at most 8 files, so the many logs go into one tarball and only the JSON
# results and the tarball are left under $OUT.
set -x
cd "$(dirname "$0")/.." || exit 1
FINAL="${OUT:-benchmarks/results/gpu}"
WORK=$(mktemp -d)
export PYTHON=${PYTHON:-python3}
mkdir -p "$WORK/lora" "$WORK/cuda" "$FINAL"
FULL_BENCH_TIMEOUT=${FULL_BENCH_TIMEOUT:-40} OUT="$WORK/lora" bash benchmarks/gpu_lora.sh
OUT="$WORK/cuda" bash benchmarks/gpu_cuda.sh
cp "$WORK"/lora/bench_lora*.json "$WORK"/cuda/bench_distill.json "$FINAL"/ 2>/dev/null
tar -czf "$FINAL/kernel_logs.tar.gz" -C "$WORK" lora cuda
ls -la "$FINAL"
exit 0
