#!/usr/bin/env bash
# GPU check of the fused LoRA kernels for a ~4 minute slice (H100/H200; torch 2.11, triton 3.6).
# Usage (repo root): bash benchmarks/gpu_lora.sh      -- results under $OUT if set, else benchmarks/results/
# Each part has its own timeout; a failing or slow part never blocks the next one.
set -x
cd "$(dirname "$0")/.." || exit 1
OUT_DIR="${OUT:-benchmarks/results}"
mkdir -p "$OUT_DIR"
PY="${PYTHON:-python}"
export TRITON_INTERPRET=0            # conftest only sets it when unset; the GPU runs compiled kernels
export RIL_FAST_KERNELS=triton
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.total --format=csv > "$OUT_DIR/gpu_info.csv" 2>&1 || true
"$PY" -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)" \
    > "$OUT_DIR/versions.txt" 2>&1 || true

# 1. correctness on cuda tensors (tiny shapes + real SD-sized bf16 shapes); ~60-90 s incl. JIT
timeout -k 10 110 "$PY" -m pytest -q -x tests/test_kernels_lora.py -m "not slow" -p no:cacheprovider \
    --junitxml="$OUT_DIR/test_kernels_lora.xml" > "$OUT_DIR/test_kernels_lora.log" 2>&1
echo "pytest rc=$?" | tee -a "$OUT_DIR/test_kernels_lora.log"
tail -n 25 "$OUT_DIR/test_kernels_lora.log"

# 2. benchmark: quick grid first (JSON rewritten after every case, so a timeout keeps the rest)
timeout -k 10 100 "$PY" benchmarks/bench_lora.py --quick --out "$OUT_DIR/bench_lora_quick.json" \
    > "$OUT_DIR/bench_lora_quick.log" 2>&1
echo "bench quick rc=$?" | tee -a "$OUT_DIR/bench_lora_quick.log"
tail -n 8 "$OUT_DIR/bench_lora_quick.log"

# 3. full grid with whatever time is left in the slice
timeout -k 10 "${FULL_BENCH_TIMEOUT:-45}" "$PY" benchmarks/bench_lora.py --out "$OUT_DIR/bench_lora.json" \
    > "$OUT_DIR/bench_lora.log" 2>&1
echo "bench full rc=$?" | tee -a "$OUT_DIR/bench_lora.log"
tail -n 3 "$OUT_DIR/bench_lora.log"
exit 0
