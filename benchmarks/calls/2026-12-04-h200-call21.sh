#!/usr/bin/env bash
# Device call 21 (one H200, after call 20, the merged code of issues 19-22): what call 20 left
# unmeasured among issue 20's targets, zerotune only (the peer's figures for these are in call 20 or
# out of memory at 128k):
#   QLoRA 8B mbs 4 in its memory-saving setting: the recipe + --set train.gradient_checkpointing=true
#   LoRA 8B at 131,072 tokens, mbs 1, the recipe as written (does it train on one GPU, how fast)
# Commands (the run tool, kind nvidia-h200, carry [".whl"]):
#   1. python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (setsid nohup bash benchmarks/calls/2026-12-04-h200-call21.sh > /tmp/call21-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/call21 560
#   2. (if 1 printed no "done") bash benchmarks/detached.sh wait /tmp/call21 200
set -u
LOG=/tmp/call21 DEADLINE=700
source benchmarks/detached.sh
export PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv > "$LOG/gpu.txt"
B=(python3 benchmarks/bench.py --work-dir /tmp/wb --results "$LOG/results" --peer-settings none)
keep() { mkdir -p "$LOG/wb"; cp -r /tmp/wb/logs "$LOG/wb/" 2>/dev/null; }   # the runs' logs come back too
stage qlora_memsave 240 "${B[@]}" --only qlora-8b --variants none --timeout 200 \
  --variant 'memsave=train.gradient_checkpointing=true'; keep
stage lora128k 420 "${B[@]}" --only lora-8b-128k --variants default --steps 4 --warmup 2 --timeout 400; keep
rm -rf /tmp/wb/runs
finish
