#!/usr/bin/env bash
# Device call C (written 2026-12-06 for the next session with device time; call B's measurements are in
# benchmarks/results/raw/2026-12-06-h100-callB/). One GPU, ~26 minutes. Stages in the order the issues
# need them (each has its own limit; the driver starts none after DEADLINE seconds):
#   testgpu    make test-gpu in one process (issue 27 item 6; GPU_PYTHON's site-packages now reach the nested venv)
#   partA      issue 29 Part A after the save deferral: benchmarks/zero3_one_gpu.py (full 1B, ZeRO-3 forced,
#              mbs 4 x 2048, packing, a save every 6 steps; no saves; ZeRO-0): save_blocking and zero3_vs_zero0 rows
#   lora8b / full1b / chat   issue 26: the recipe as written against the peer's best (fp8 as a variant)
#   lora128k / qlora128k     issue 28: 8B at 131,072 tokens on one GPU, the recipe as written (the planner's
#              per-layer bytes were corrected on 2026-12-06: fewer layers checkpointed where memory allows)
# 512k (one step is ~12 minutes by the planner) has its own call: benchmarks/calls/next-h200-512k.sh.
# Lead's commands (kind nvidia-h200, carry [".whl"] from ../shared/device/wheels.sh), each within 30 s of the last:
#   1. python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (setsid nohup bash benchmarks/calls/next-h200-callC.sh > /tmp/callC-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/callC 570
#   2. bash benchmarks/detached.sh wait /tmp/callC 570
#   3. bash benchmarks/detached.sh wait /tmp/callC 480   (only if 2 printed no "done")
set -u
LOG=/tmp/callC DEADLINE=${DEADLINE:-1560}
source benchmarks/detached.sh
prepare_machine
stage testgpu 300 make test-gpu GPU_PIP_ARGS="--no-deps --no-build-isolation" PYTEST_ARGS="-p no:cacheprovider -rs -q"
stage partA 330 python3 benchmarks/zero3_one_gpu.py --size 1b --steps 19 --every 6 --work /tmp/z3 --out "$LOG/results/zero3_one_gpu.jsonl"
cp /tmp/z3/runs/*/metrics.jsonl "$LOG/results/" 2>/dev/null; rm -rf /tmp/z3
B=(python3 benchmarks/bench.py --work-dir /tmp/wb --models /tmp/models --results "$LOG/results" --timeout 240 --steps 12 --warmup 4)
stage lora8b 260 "${B[@]}" --only lora-8b --variants default --variant 'fp8=train.precision=fp8' --peer-settings liger-no-gc; keep_runs /tmp/wb
stage full1b 170 "${B[@]}" --only full-1b --variants default --variant 'fp8c=train.precision=fp8 train.compile=true model.kernels=none' --peer-settings plain-liger-no-gc; keep_runs /tmp/wb
stage chat 200 "${B[@]}" --only chat-lora-8b --variants default,unpacked-mbs16 --peer-settings trl-packing-liger-no-gc; keep_runs /tmp/wb
stage lora128k 200 "${B[@]}" --only lora-8b-128k --variants default --steps 5 --warmup 2; keep_runs /tmp/wb
stage qlora128k 200 "${B[@]}" --only qlora-8b-128k --variants default --steps 5 --warmup 2; keep_runs /tmp/wb
finish
