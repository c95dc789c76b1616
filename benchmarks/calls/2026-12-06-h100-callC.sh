#!/usr/bin/env bash
# Device call C (ran 2026-12-06 on one H100: benchmarks/results/raw/2026-12-06-h100-callC/; call B's measurements are in
# benchmarks/results/raw/2026-12-06-h100-callB/). One GPU, ~26 minutes. Stages in the order the issues
# need them (each has its own limit; the driver starts none after DEADLINE seconds):
#   testgpu    make test-gpu in one process (issue 27 item 6; GPU_PYTHON's site-packages now reach the nested venv)
#   partA      issue 29 Part A after the save deferral: benchmarks/zero3_one_gpu.py (full 1B, ZeRO-3 forced,
#              mbs 4 x 2048, packing, a save every 6 steps; no saves; ZeRO-0; a profiled save step and plain
#              step): save_blocking and zero3_vs_zero0 rows, where ZeRO-3 on one GPU loses its time
#   lora32k / lora128k   issues 26 and 28: LoRA 8B at 32k (vs the peer's best, 0.95x before) and 131,072 tokens,
#              the recipe as written and keep-attn (train.recompute_attention=false: checkpointed layers keep
#              attention's output; by FLOPs ~1.1x at 32k and ~1.2x at 128k, unmeasured). The planner's per-layer
#              bytes were corrected on 2026-12-06: fewer layers checkpointed where memory allows.
#   lora8b / full1b / chat   issue 26 on an H200 (call B ran on an H100), while time is left
# 512k (one step is ~12 minutes by the planner) has its own call: benchmarks/calls/next-h200-512k.sh.
# Lead's commands (kind nvidia-h200, carry [".whl"] from ../shared/device/wheels.sh), each within 30 s of the last:
#   1. python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (setsid nohup bash benchmarks/calls/2026-12-06-h100-callC.sh > /tmp/callC-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/callC 570
#   2. bash benchmarks/detached.sh wait /tmp/callC 570
#   3. bash benchmarks/detached.sh wait /tmp/callC 480   (only if 2 printed no "done")
set -u
LOG=/tmp/callC DEADLINE=${DEADLINE:-1620}
source benchmarks/detached.sh
prepare_machine
stage testgpu 300 make test-gpu GPU_PIP_ARGS="--no-deps --no-build-isolation" PYTEST_ARGS="-p no:cacheprovider -rs -q"
stage partA 420 python3 benchmarks/zero3_one_gpu.py --size 1b --steps 19 --every 6 --profile --work /tmp/z3 --out "$LOG/results/zero3_one_gpu.jsonl"
cp /tmp/z3/runs/*/metrics.jsonl "$LOG/results/" 2>/dev/null; rm -rf /tmp/z3
B=(python3 benchmarks/bench.py --work-dir /tmp/wb --models /tmp/models --results "$LOG/results" --timeout 240 --steps 12 --warmup 4)
stage lora32k 300 "${B[@]}" --only lora-8b-32k --variants default,keep-attn --peer-settings liger --steps 6 --warmup 2; keep_runs /tmp/wb
stage lora128k 460 "${B[@]}" --only lora-8b-128k --variants default,keep-attn --peer-settings none --steps 3 --warmup 1; keep_runs /tmp/wb
stage lora8b 240 "${B[@]}" --only lora-8b --variants default --peer-settings liger-no-gc; keep_runs /tmp/wb
stage full1b 170 "${B[@]}" --only full-1b --variants default --variant 'fp8c=train.precision=fp8 train.compile=true model.kernels=none' --peer-settings plain-liger-no-gc; keep_runs /tmp/wb
stage chat 200 "${B[@]}" --only chat-lora-8b --variants default,unpacked-mbs16 --peer-settings trl-packing-liger-no-gc; keep_runs /tmp/wb
finish
