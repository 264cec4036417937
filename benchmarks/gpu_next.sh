#!/usr/bin/env bash
# The GPU check waiting for the next session with a device, on one H100/H200, in two calls:
#   bash benchmarks/gpu_next.sh kernels   (timeouts sum to <= 9.7 min, a call may run 10; the build takes ~12 s of its 110)
#   bash benchmarks/gpu_next.sh step      (<= 4.5 min)
# kernels (the LoRA issue; the distillation one is resolved):
#   1. CUDA library build (sm_90; the LoRA graph-capture test covers its backend too), then the
#      LoRA tests on CUDA: the persistent TMA GEMM (lora_tma) against the fp64 reference on sm_90;
#   2. benchmarks/tune_lora.py --quick ALWAYS (compiling its candidates in 8 processes first; the
#      fused backward now also with dA in the same kernel, "fused_da"),
#      into a fresh table ($OUT/<gpu>.json): the shipped
#      H200 table predates the TMA candidates (pointer / TMA / TMA with split stores);
#   3. bench_lora --quick --graph-repeat 8 with that table in force (RIL_FAST_LORA_TUNING), with the
#      triton_base / triton_base_tma providers (our GEMM alone against cuBLAS, target >= 0.9x), and
#      the CTAs per SM each TMA variant's persistent grid ran with;
#   4. profile_lora_host: host cost per LoRA call (TMA descriptors are built per call);
#   5. bench_distill, only if the call has time left (checks the fresh-leaf fix of its capture).
#   step: bench_step SD1.5 / SDXL with the backends in force; SD1.5 also steps torch's stacked LoRA
#   path in turn with the fused op (step_over_first_backend: the whole-step ratio).
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
  for f in "$WORK"/step/*.json; do python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], {k: d.get(k) for k in ('step_seconds','max_memory_allocated_gib','planned_peak_gib','measured_over_planned','step_over_first_backend')})" "$f"; done
  cp "$WORK"/step/*.json "$FINAL"/ 2>/dev/null
  tar -czf "$FINAL/step_logs.tar.gz" -C "$WORK" step
  exit 0
fi
BUILD=/tmp/ril_fast_cuda_build
timeout 30 cmake -S . -B "$BUILD" -DRIL_CUDA_ARCHS=90 > "$WORK/cuda/build.log" 2>&1 \
  && timeout 80 cmake --build "$BUILD" -j "$(nproc)" >> "$WORK/cuda/build.log" 2>&1
echo "build rc=$?"
RIL_FAST_KERNELS=triton timeout 150 python3 -m pytest -q -rfE -p no:cacheprovider tests/test_kernels_lora.py \
  -k "not runs_on_cpu" > "$WORK/lora/tests.log" 2>&1; echo "lora tests rc=$?"; tail -n 8 "$WORK/lora/tests.log"
SLUG=$(python3 -c "import torch; from ril_fast.kernels import lora_tuning as t; print(t.gpu_slug(torch.cuda.get_device_name()))")
TABLE="$WORK/tune/$SLUG.json"
timeout 170 python3 benchmarks/tune_lora.py --quick --table "$TABLE" --out "$WORK/tune/tune_lora.json" \
  > "$WORK/tune/log" 2>&1; echo "tune rc=$?"; tail -n 12 "$WORK/tune/log"
[ -f "$TABLE" ] && export RIL_FAST_LORA_TUNING="$TABLE"
RIL_FAST_KERNELS=triton timeout 110 python3 benchmarks/bench_lora.py --quick --graph-repeat 8 \
  --out "$WORK/lora/bench_lora_quick.json" > "$WORK/lora/bench.log" 2>&1; echo "bench_lora rc=$?"
python3 - "$WORK/lora/bench_lora_quick.json" <<'PYEOF' 2>&1 | tee "$WORK/lora/summary.txt"
import json, sys
sys.path.insert(0, "benchmarks")
from bench_lora import summarize, table
rec = json.load(open(sys.argv[1]))
print(f"{rec['env'].get('gpu')}  torch {rec['env'].get('torch')}  triton {rec['env'].get('triton')}  p = plain, "
      f"g = graph ({rec.get('graph_repeat', 1)} calls per replay)")
print(table(summarize(rec["results"])))
print("TMA kernel CTAs per SM (lora_tma.occupancy of each variant's first launch):", rec.get("tma_ctas_per_sm"))
PYEOF
timeout 40 python3 benchmarks/profile_lora_host.py --out "$WORK/lora/profile_lora_host.json" > "$WORK/lora/host.log" 2>&1
echo "profile_lora_host rc=$?"; grep -E "forward .* full" "$WORK/lora/host.log"
if [ "$SECONDS" -lt 470 ]; then
  timeout 45 python3 benchmarks/bench_distill.py --out "$WORK/distill/bench_distill.json" > "$WORK/distill/log" 2>&1
  tail -n 8 "$WORK/distill/log"
fi
cp "$TABLE" "$WORK"/tune/tune_lora.json "$WORK"/lora/bench_lora_quick.json "$WORK"/lora/summary.txt \
   "$WORK"/lora/profile_lora_host.json "$WORK"/distill/bench_distill.json "$FINAL"/ 2>/dev/null
tar -czf "$FINAL/logs.tar.gz" -C "$WORK" .
ls -la "$FINAL"
exit 0
