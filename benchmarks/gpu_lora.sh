#!/usr/bin/env bash
# GPU check of the fused LoRA kernels, ≤ 3.5 minutes (H100/H200; torch 2.11, triton 3.6 or 3.7).
# Usage (repo root): bash benchmarks/gpu_lora.sh      -- results under $OUT if set, else benchmarks/results/
# Each part has its own timeout; a failing or slow part never blocks the next one.
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
cat "$OUT_DIR/versions.txt"

# 1. correctness on cuda tensors, every failure shown (no -x); ~40-70 s incl. JIT
timeout -k 10 95 "$PY" -m pytest -q -p no:randomly -p no:cacheprovider tests/test_kernels_lora.py -m "not slow" \
    -rfE --junitxml="$OUT_DIR/test_kernels_lora.xml" > "$OUT_DIR/test_kernels_lora.log" 2>&1
echo "pytest rc=$?" | tee -a "$OUT_DIR/test_kernels_lora.log"
grep -E "^(FAILED|ERROR)|passed|failed" "$OUT_DIR/test_kernels_lora.log" | tail -n 25

# 2. quick benchmark: plain + CUDA-graph replay timings, incl. large-M cases (JSON after every case)
timeout -k 10 "${BENCH_TIMEOUT:-95}" "$PY" benchmarks/bench_lora.py --quick --out "$OUT_DIR/bench_lora_quick.json" \
    > "$OUT_DIR/bench_lora_quick.log" 2>&1
echo "bench quick rc=$?" | tee -a "$OUT_DIR/bench_lora_quick.log"

# 3. compact summary table from the JSON (also after a timeout: it holds every finished case)
"$PY" - "$OUT_DIR/bench_lora_quick.json" <<'PYEOF' 2>&1 | tee "$OUT_DIR/summary.txt"
import json, sys
sys.path.insert(0, "benchmarks")
from bench_lora import summarize, table
rec = json.load(open(sys.argv[1]))
errs = sorted({(r["provider"], r["error"][:120]) for r in rec["results"] if "error" in r})
print(f"{rec['env'].get('gpu')}  torch {rec['env'].get('torch')}  triton {rec['env'].get('triton')}  "
      f"elapsed {rec.get('elapsed_s')} s   p = plain do_bench, g = CUDA-graph replay")
print(table(summarize(rec["results"])))
for e in errs:
    print("error:", *e)
PYEOF
exit 0
