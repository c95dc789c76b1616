#!/usr/bin/env bash
# Device call D (2026-12-06, one GPU, ~9 minutes), after call C (benchmarks/results/raw/2026-12-06-h100-callC/):
#   testgpu  make test-gpu in one process (issue 27 item 6) after the kept-model fix in tests/test_layers_gpu.py
#            (call C: the offload test counted the previous run's model, ~0.33 GiB, in its peak)
#   partA    issue 29 Part A again: 43 steps so that later saves exist beside the first (call C: the step-12
#            save was deferred to the last step, so save_blocking had none), each run's checkpoints removed
#            after it (call C: four 17 GB checkpoints filled the disk and the profiled run failed)
#   lora32k  issues 26/28: LoRA 8B at 32k as written, now that train.recompute_attention: auto keeps attention
#            there (call C measured it as the keep-attn variant), vs the peer's best in the same call
# Lead's commands (carry [".whl"]), each within 30 s of the last:
#   1. python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (setsid nohup bash benchmarks/calls/2026-12-06-h100-callD.sh > /tmp/callD-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/callD 570
#   (the session had 652 s of device time left: lora32k runs only if the stages before leave it time)
set -u
LOG=/tmp/callD DEADLINE=${DEADLINE:-520}
source benchmarks/detached.sh
prepare_machine
stage testgpu 170 make test-gpu GPU_PIP_ARGS="--no-deps --no-build-isolation" PYTEST_ARGS="-p no:cacheprovider -rs -q"
stage partA 300 python3 benchmarks/zero3_one_gpu.py --size 1b --steps 43 --every 6 --profile --work /tmp/z3 --out "$LOG/results/zero3_one_gpu.jsonl"
for m in /tmp/z3/runs/*/metrics.jsonl; do cp "$m" "$LOG/results/$(basename "$(dirname "$m")").metrics.jsonl"; done 2>/dev/null
rm -rf /tmp/z3
B=(python3 benchmarks/bench.py --work-dir /tmp/wb --models /tmp/models --results "$LOG/results" --timeout 150 --steps 12 --warmup 4)
stage lora32k 200 "${B[@]}" --only lora-8b-32k --variants default --peer-settings liger --steps 6 --warmup 2; keep_runs /tmp/wb
finish
