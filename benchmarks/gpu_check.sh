#!/usr/bin/env bash
# The one prepared GPU check, under 8 minutes: the CUDA tests of the shipped kernels, then the
# whole training step A/B at SD1.5 and SDXL shapes (random weights): ours against the diffusers +
# PEFT loop and against the floor, k = 8 against k = 1, eager against compiled, RIL_FAST_KERNELS
# auto against torch and triton, peak memory. JSON under <out>/<gpu>/, logs under <out>/<gpu>/logs/.
#
#   benchmarks/gpu_check.sh [--dry-run] [OUT_DIR]     (OUT_DIR default: $OUT, else benchmarks/results)
#
# Every phase has its own time limit and writes its own files, so a phase that fails or runs out
# of time loses only itself; the exit status is the number of failed phases. diffusers and peft
# must import: where the GPU image lacks them, carry wheels in ./wheels/ (pip download
# diffusers==0.42.1 peft==0.21.2 --no-deps -d wheels) and the script installs them offline.
# --dry-run: the same phases on CPU with tiny settings (the embedded model, one round), writing
# under <out>/cpu-dry-run/; tests/test_gpu_check.py runs it.
set -u
cd "$(dirname "$0")/.."
DRY=0
if [ "${1:-}" = "--dry-run" ]; then DRY=1; shift; fi
OUT_ROOT=${1:-${OUT:-benchmarks/results}}
PY=${PYTHON:-python}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
START=$(date +%s)
FAILED=0

if [ "$DRY" = 1 ]; then
  SLUG=cpu-dry-run
else
  SLUG=$($PY -c "import re, torch; print(re.sub(r'[^a-z0-9]+', '-', torch.cuda.get_device_name().lower()).strip('-'))") || exit 1
fi
DIR="$OUT_ROOT/$SLUG"
LOGS="$DIR/logs"
mkdir -p "$LOGS"

# phase NAME SECONDS CMD...: run CMD under a time limit, log to logs/NAME.log, count failures
phase() {
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s, $(( $(date +%s) - START ))s elapsed)"
  if [ "$DRY" = 1 ]; then limit=$(( limit < 240 ? limit : 240 )); fi
  timeout --kill-after=5 "$limit" "$@" > "$LOGS/$name.log" 2>&1
  local rc=$?
  tail -n 3 "$LOGS/$name.log"
  if [ $rc -ne 0 ]; then echo "   $name: exit $rc"; FAILED=$((FAILED + 1)); fi
}

# 0. environment, and the parts the GPU image may lack
if ! $PY -c "import diffusers, peft" 2>/dev/null && ls wheels/*.whl >/dev/null 2>&1; then
  $PY -m pip install --no-deps --no-index -q wheels/*.whl > "$LOGS/wheels.log" 2>&1 || FAILED=$((FAILED + 1))
fi
phase env 20 bash -c "nvidia-smi 2>/dev/null || true; $PY -m ril_fast"

if [ "$DRY" = 1 ]; then
  SD15=(--config configs/tiny.json --rounds 1 --warmup 0)
  SDXL=(--config configs/tiny.json --rounds 1 --warmup 0 --set train.batch_size=1)
  STEP=(--config configs/tiny.json --device cpu --iters 1 --no-plan)
  BUILD=(cmake --version)  # (tests/test_kernels_compile_cuda.py builds csrc/ on CPU)
else
  # random-weight SD1.5 / SDXL from ril_fast/models/arch, a model-free reward (no reward weights here)
  SD15=(--config configs/sd15.json --rounds 2 --warmup 1 --set tasks.0.reward=contrast)
  SDXL=(--config configs/sdxl.json --rounds 1 --warmup 1 --set tasks.0.reward=contrast)
  STEP=(--config configs/sd15.json --iters 4 --task 3)
  CC=$($PY -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")
  BUILD=(bash -c "cmake -S . -B build -DRIL_CUDA_ARCHS=$CC && cmake --build build -j")
fi

# 1. the CUDA library for this GPU (its tests below load it from ril_fast/_lib)
phase cuda_lib_build 45 "${BUILD[@]}"

# 2. CUDA tests of the shipped kernels (Triton LoRA and distillation, the CUDA library)
phase kernel_tests 80 $PY -m pytest -q -x -m gpu tests/test_kernels_lora.py tests/test_kernels_distill.py \
  tests/test_cuda_lib.py

# 3. whole step, SD1.5 512²: ours vs peer (k 1, 3), RID k 3 vs floor, k 8 vs k 1
phase peer_sd15 80 $PY benchmarks/bench_peer.py "${SD15[@]}" --name bench_peer_sd15 --out "$DIR/bench_peer_sd15.json"

# 4. the same at SDXL 1024² (fewer variants: each holds a UNet copy and steps for seconds)
phase peer_sdxl 80 $PY benchmarks/bench_peer.py "${SDXL[@]}" --name bench_peer_sdxl --out "$DIR/bench_peer_sdxl.json" \
  --variants ours_k3,peer_k3,floor

# 5. RIL_FAST_KERNELS auto vs torch vs triton in one process, with peak memory (SD1.5, RID task 3)
phase backends_sd15 45 $PY benchmarks/bench_step.py "${STEP[@]}" --backends auto,torch,triton \
  --out "$DIR/step_backends_sd15.json"

# 6. eager vs compiled (train.compile), SD1.5; compile time is the first step's (the dry run only
#    checks the command: a CPU compile of the UNet takes minutes)
COMPILED=ours_k3,peer_k3
if [ "$DRY" = 1 ]; then COMPILED=peer_k1; fi
phase compile_sd15 55 $PY benchmarks/bench_peer.py "${SD15[@]}" --name bench_compile_sd15 --out "$DIR/bench_compile_sd15.json" \
  --variants $COMPILED --compile

echo "== done in $(( $(date +%s) - START ))s, $FAILED failed phase(s); results in $DIR"
exit $FAILED
