#!/usr/bin/env bash
# Issue 26's table on one H200 (and issue 28's 128K row), written 2026-12-08 (session from 00:29 UTC), NOT YET RUN:
# that session got no machine (13 tries refused or failed to start, 1,051 s of its device time spent on them, then device
# loans paused). The recipe as a user writes it (train.precision auto: fp8 for LoRA 8B on compute capability 9.0
# from 8,192 tokens, core/precision.py MEASURED; new since call H2: LoRA's dropout drawn again in the backward
# instead of kept, lora_B's add inside its GEMM, training/model/lora_fused.py) against the peer's best setting of
# the earlier calls. The fused adapters have no switch: their before is call H2's rows (H100) and the 2026-12-04/06
# H200 calls (README, benchmarks/README.md). ~21 minutes of stages; with a whole session's device time:
#   testgpu  make test-gpu (FP8 numerics, kernels, the fused LoRA adapters on CUDA)
#   lora8b   LoRA 8B mbs 4: default, bf16 (train.precision=bf16: FP8's before), peer liger-no-gc
#   lora32k  LoRA 8B at 32k: default, peer liger; 6 steps after 2
#   chat     chat-lora-8b: default (packing on), TRL trl-packing-liger-no-gc, HF liger-no-gc-mbs16
#   lora128k LoRA 8B at 131,072 tokens as written (issue 28: >= 3,306 tok/s on an H200); 3 steps after 1
#   qlora8b  QLoRA 8B mbs 4: default, peer liger-no-gc
#   full1b   full 1B mbs 8: default, peer plain-liger-no-gc (nothing of it changed since call H2)
#   profile  LoRA 8B as written, profiled over steps 8-10 (where a missed target's time goes)
# Lead's commands (kind nvidia-h200, carry [".whl"]), each within 30 s of the last; DEADLINE = the device time
# left minus ~150 s (start, wheels, packing); the later stages are skipped past it:
#   1. python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (DEADLINE=1440 setsid nohup bash benchmarks/calls/next-h200-issue26.sh > /tmp/callI-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/callI 560
#   2., 3. bash benchmarks/detached.sh wait /tmp/callI 560
set -u
LOG=/tmp/callI DEADLINE=${DEADLINE:-1440}
source benchmarks/detached.sh
prepare_machine
stage testgpu 150 make test-gpu GPU_PIP_ARGS="--no-deps --no-build-isolation" PYTEST_ARGS="-p no:cacheprovider -rs -q"
B=(python3 benchmarks/bench.py --work-dir /tmp/wb --models /tmp/models --results "$LOG/results" --timeout 240 --steps 12 --warmup 4)
stage lora8b 220 "${B[@]}" --only lora-8b --variants default --variant bf16='train.precision=bf16' --peer-settings liger-no-gc; keep_runs /tmp/wb
stage lora32k 240 "${B[@]}" --only lora-8b-32k --variants default --peer-settings liger --steps 6 --warmup 2; keep_runs /tmp/wb
stage chat 240 "${B[@]}" --only chat-lora-8b --variants default --peer-settings trl-packing-liger-no-gc,liger-no-gc-mbs16; keep_runs /tmp/wb
stage lora128k 330 "${B[@]}" --only lora-8b-128k --variants default --peer-settings none --steps 3 --warmup 1 --timeout 320; keep_runs /tmp/wb
stage qlora8b 180 "${B[@]}" --only qlora-8b --variants default --peer-settings liger-no-gc; keep_runs /tmp/wb
stage full1b 150 "${B[@]}" --only full-1b --variants default --peer-settings plain-liger-no-gc; keep_runs /tmp/wb
stage profile 120 "${B[@]}" --only lora-8b --variants none --variant 'profile=logging.profile_start=8 logging.profile_steps=3' --peer-settings none
cp /tmp/wb/runs/*/profile/summary.txt "$LOG/profile-summary.txt" 2>/dev/null; keep_runs /tmp/wb
finish
