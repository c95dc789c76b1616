#!/usr/bin/env bash
# Issue 28's 512k runs on one H200 (141 GB), written 2026-12-06, not yet run: 8B LoRA then QLoRA at
# 524,288 tokens a sample, as recipes/llama3-8b-lora-512k.yaml writes it (one document a row, no LoRA
# dropout; checkpointing, the tiled MLP and host offload left to auto). By the planner one step is ~12
# minutes (~2.3e17 model FLOPs at ~720 tokens/s): 2 LoRA steps (~26 minutes with the model's load) are
# what one session's 30 minutes of device time hold, QLoRA's stage then starts in a later session (the
# driver skips it past DEADLINE); issue 28's 5 steps (~1 hour) fit no lent machine's 30-minute hold. The rows record
# tok/s, peak GPU GiB and the host's peak RSS (bench.py), every step's loss in runs/*.metrics.jsonl.
# Lead's commands (kind nvidia-h200, needs_h200 true: 141 GB, carry [".whl"]), each within 30 s of the last:
#   1. python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (setsid nohup bash benchmarks/calls/next-h200-512k.sh > /tmp/call512k-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/call512k 570
#   2., 3. bash benchmarks/detached.sh wait /tmp/call512k 570
set -u
LOG=/tmp/call512k DEADLINE=${DEADLINE:-1680}
source benchmarks/detached.sh
prepare_machine
B=(python3 benchmarks/bench.py --work-dir /tmp/wb --models /tmp/models --results "$LOG/results" --timeout 1600 --steps 2 --warmup 1)
stage lora512k 1500 "${B[@]}" --only lora-8b-512k --variants default; keep_runs /tmp/wb
stage qlora512k 1500 "${B[@]}" --only qlora-8b-512k --variants default; keep_runs /tmp/wb
finish
