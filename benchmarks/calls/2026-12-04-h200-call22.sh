#!/usr/bin/env bash
# Device call 22 (one H200): where the step time of LoRA 8B at 32k tokens goes (the recipe as
# written + logging.profile_start), the one issue-20 miss that call 20 did not profile.
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (setsid nohup bash benchmarks/calls/2026-12-04-h200-call22.sh > /tmp/call22-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/call22 330
set -u
LOG=/tmp/call22 DEADLINE=330
source benchmarks/detached.sh
export PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
B=(python3 benchmarks/bench.py --work-dir /tmp/wb --results "$LOG/results" --peer-settings none)
stage profile32k 300 "${B[@]}" --only lora-8b-32k --variants none --steps 6 --warmup 2 --timeout 280 \
  --variant 'profiled=logging.profile_start=4 logging.profile_steps=2'
mkdir -p "$LOG/wb"; cp -r /tmp/wb/logs "$LOG/wb/" 2>/dev/null
finish
