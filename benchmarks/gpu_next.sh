#!/usr/bin/env bash
# The GPU check waiting for the next session with a device, on one H100/H200, in two calls:
#   bash benchmarks/gpu_next.sh kernels   (parts 1-4: timeouts sum to 9.1 min, a call may run 10)    bash benchmarks/gpu_next.sh step   (part 5, ≤ 4.5 min)
#   1. CUDA library build (sm_90) + distillation tests (single-launch forward: ticket counter,
#      bitwise repeats, graph capture) + LoRA tests (cuBLAS forward/dX paths, tuning table) on CUDA;
#   2. benchmarks/tune_lora.py --quick: per-shape choice of cuBLAS / Triton split / fused + tiles,
#      written to the user cache (the op reads it) and copied to $OUT;
#   3. bench_lora --quick with the table in force (provider "fused" = the op as dispatched);
#   4. bench_distill (one-launch forward; target ≥ 80 % of copy bandwidth at feature size);
#   5. bench_step SD1.5 / SDXL with memory.idle_rewards=cpu (planner residency = the step's).
# At most 8 files come back from the device: logs are tarred, results copied flat to $OUT.
set -x
PART="${1:-kernels}"
cd "$(dirname "$0")/.." || exit 1
FINAL="${OUT:-benchmarks/results/gpu}"
WORK=$(mktemp -d)
mkdir -p "$WORK"/{cuda,lora,distill,step,tune} "$FINAL"
if ls .whl/*.whl > /dev/null 2>&1; then  # diffusers is missing from the GPU image
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHON=python3 PY=python3 TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
if [ "$PART" = step ]; then
  OUT="$WORK/step" timeout 260 bash benchmarks/gpu_step.sh > "$WORK/step/log" 2>&1
  for f in "$WORK"/step/*.json; do python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], {k: d.get(k) for k in ('step_seconds','max_memory_allocated_gib','planned_peak_gib','measured_over_planned')})" "$f"; done
  cp "$WORK"/step/*.json "$FINAL"/ 2>/dev/null
  tar -czf "$FINAL/step_logs.tar.gz" -C "$WORK" step
  exit 0
fi
BUILD=/tmp/ril_fast_cuda_build
timeout 40 cmake -S . -B "$BUILD" -DRIL_CUDA_ARCHS=90 > "$WORK/cuda/build.log" 2>&1 \
  && timeout 90 cmake --build "$BUILD" -j "$(nproc)" >> "$WORK/cuda/build.log" 2>&1
echo "build rc=$?"
timeout 100 python3 -m pytest -q -rfE -p no:cacheprovider tests/test_kernels_distill.py tests/test_cuda_lib.py \
  > "$WORK/cuda/tests.log" 2>&1; echo "distill/cuda tests rc=$?"; tail -n 8 "$WORK/cuda/tests.log"
RIL_FAST_KERNELS=triton timeout 80 python3 -m pytest -q -rfE -p no:cacheprovider tests/test_kernels_lora.py \
  > "$WORK/lora/tests.log" 2>&1; echo "lora tests rc=$?"; tail -n 8 "$WORK/lora/tests.log"
timeout 110 python3 benchmarks/tune_lora.py --quick --out "$WORK/tune/tune_lora.json" > "$WORK/tune/log" 2>&1
echo "tune rc=$?"; cat "$WORK/tune/log" | tail -n 12
cp ~/.cache/ril_fast/lora_tuning/*.json "$FINAL/" 2>/dev/null
RIL_FAST_KERNELS=triton timeout 80 python3 benchmarks/bench_lora.py --quick --out "$WORK/lora/bench_lora_quick.json" \
  > "$WORK/lora/bench.log" 2>&1; echo "bench_lora rc=$?"
python3 - "$WORK/lora/bench_lora_quick.json" <<'PYEOF' 2>&1 | tee "$WORK/lora/summary.txt"
import json, sys
sys.path.insert(0, "benchmarks")
from bench_lora import summarize, table
rec = json.load(open(sys.argv[1]))
print(f"{rec['env'].get('gpu')}  torch {rec['env'].get('torch')}  triton {rec['env'].get('triton')}  p = plain, g = graph")
print(table(summarize(rec["results"])))
PYEOF
timeout 45 python3 benchmarks/bench_distill.py --out "$WORK/distill/bench_distill.json" > "$WORK/distill/log" 2>&1
tail -n 12 "$WORK/distill/log"
cp "$WORK"/tune/tune_lora.json "$WORK"/lora/bench_lora_quick.json "$WORK"/lora/summary.txt \
   "$WORK"/distill/bench_distill.json "$FINAL"/ 2>/dev/null
tar -czf "$FINAL/logs.tar.gz" -C "$WORK" .
ls -la "$FINAL"
exit 0
