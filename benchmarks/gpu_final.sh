#!/usr/bin/env bash
# The session's GPU check in one call: LoRA kernel tests + benchmark, distillation benchmark, and the
# full-size SD1.5 / SDXL RID step (time and peak memory next to the planner). At most 8 files come
# back from the device, so logs are tarred and only results are left under $OUT.
set -x
cd "$(dirname "$0")/.." || exit 1
FINAL="${OUT:-benchmarks/results/gpu}"
WORK=$(mktemp -d)
mkdir -p "$WORK"/{lora,distill,step} "$FINAL"
if ls .whl/*.whl > /dev/null 2>&1; then  # diffusers is missing from the GPU image
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHON=python3 PY=python3 TRITON_INTERPRET=0 PYTHONUNBUFFERED=1
OUT="$WORK/lora" BENCH_TIMEOUT=${BENCH_TIMEOUT:-90} bash benchmarks/gpu_lora.sh
timeout 60 python3 benchmarks/bench_distill.py --out "$WORK/distill/bench_distill.json" > "$WORK/distill/log" 2>&1
tail -n 12 "$WORK/distill/log"
OUT="$WORK/step" bash benchmarks/gpu_step.sh
for f in "$WORK"/step/*.json; do python3 -c "import json,sys; d=json.load(open(sys.argv[1])); print(sys.argv[1].split('/')[-1], {k: d.get(k) for k in ('step_seconds','max_memory_allocated_gib','planned_peak_gib','measured_over_planned')})" "$f"; done
cp "$WORK"/lora/bench_lora_quick.json "$WORK"/lora/summary.txt "$WORK"/distill/bench_distill.json "$WORK"/step/*.json "$FINAL"/ 2>/dev/null
tar -czf "$FINAL/logs.tar.gz" -C "$WORK" .
ls -la "$FINAL"
cat "$WORK/lora/summary.txt" 2>/dev/null
exit 0
