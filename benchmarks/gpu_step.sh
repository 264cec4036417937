#!/usr/bin/env bash
# GPU check of the memory planner: one full RID step of full-size random-weight SD1.5 and SDXL,
# torch.cuda.max_memory_allocated next to the planned peak. Needs torch + transformers + diffusers
# (bring the wheel); no deepspeed/bitsandbytes needed (adamw, offload is planned only). ~4 min.
#   OUT=/some/dir bash benchmarks/gpu_step.sh
set -x
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
PY=${PY:-python}
export HF_HUB_OFFLINE=0 PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$OUT/gpu.txt" 2>&1
# SD1.5 512 px, batch 2, CFG, K=1, aesthetic (ViT-L/14 random weights), planner included; each
# iteration steps the fused LoRA op (auto) and torch's stacked path in turn (no distillation in task 1:
# only the LoRA op differs), so the record has the whole-step ratio side by side
timeout 100 $PY benchmarks/bench_step.py --config configs/sd15.json --task 1 --iters 3 --backends auto,torch \
  --out "$OUT/step_sd15_aesthetic.json"
# SDXL 1024 px, batch 1, CFG, K=1, aesthetic; the distilling task (2: hpsv2 ViT-H/14) without the planner
timeout 110 $PY benchmarks/bench_step.py --config configs/sdxl.json --task 1 --iters 3 \
  --out "$OUT/step_sdxl_aesthetic.json"
timeout 50 $PY benchmarks/bench_step.py --config configs/sdxl.json --task 2 --iters 2 --no-plan \
  --out "$OUT/step_sdxl_hpsv2_gpu_only.json"
ls -l "$OUT"
