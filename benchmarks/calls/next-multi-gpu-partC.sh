#!/usr/bin/env bash
# Issue 29 Part C, for the first session that `status` lends a kind of 4 (or 8) GPUs: one call, ~28 minutes,
# everything through `zerotune train` installed from the package, the peer beside it. Written 2026-12-06, not
# yet run (no multi-GPU kind has been lent since 2026-11-27).
#   truth1b   full 1B ZeRO-3, mbs 8, on 1 -> 2 -> 4 GPUs: tok/s/GPU (target >= 32,000 on 4), the 4-GPU
#             checkpoint resumed on 2 and on 4 (every resumed step's loss against the uninterrupted run, 1e-3),
#             the SIGUSR1 drill on 4 (exit 85, a checkpoint, the same command resumes), export vs final
#   truth8b   full 8B ZeRO-3, mbs 4, on 2 -> 4 GPUs: per-GPU tok/s on 4 >= 90% of 2
#   loradp    LoRA 8B data-parallel over every GPU against the peer (HF Trainer under torchrun)
#   lora128k  LoRA 8B at 131,072 tokens, sequence parallelism 4 (trains: finite losses)
#   testgpu2  every gpu test in one process, the two-GPU ones included
# Lead's commands (kind nvidia-h100-x4 or what status lends, carry [".whl"]), each within 30 s of the last:
#   1. python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (setsid nohup bash benchmarks/calls/next-multi-gpu-partC.sh > /tmp/callC4-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/partC 570
#   2., 3. bash benchmarks/detached.sh wait /tmp/partC 570
set -u
LOG=/tmp/partC DEADLINE=${DEADLINE:-1680}
source benchmarks/detached.sh
prepare_machine
N=$(nvidia-smi --list-gpus | wc -l); [ "$N" -gt 8 ] && N=8
COUNTS=1,2,4; [ "$N" -ge 8 ] && COUNTS=1,2,4,8
stage truth1b 420 python3 benchmarks/truth_run.py --size 1b --gpus "$COUNTS" --mbs 8 --steps 12 --work /tmp/t1b --out "$LOG/results/truth-1b.jsonl"
rm -rf /tmp/t1b
stage truth8b 480 python3 benchmarks/truth_run.py --size 8b --gpus 2,4 --mbs 4 --steps 10 --work /tmp/t8b --out "$LOG/results/truth-8b.jsonl"
rm -rf /tmp/t8b
B=(python3 benchmarks/bench.py --work-dir /tmp/wb --models /tmp/models --results "$LOG/results" --timeout 300 --steps 12 --warmup 4 --gpus 4)
stage loradp 300 "${B[@]}" --only lora-8b-dp --variants default --peer-settings liger-no-gc; keep_runs /tmp/wb
stage lora128k 240 "${B[@]}" --only long-lora-8b-128k --variants default --steps 5 --warmup 2; keep_runs /tmp/wb
stage testgpu2 240 make test-gpu GPU_PIP_ARGS="--no-deps --no-build-isolation" PYTEST_ARGS="-p no:cacheprovider -rs -q"
finish
