#!/usr/bin/env bash
# Device call D (written 2026-12-06; ran 2026-12-07 12:31-12:45 UTC on one H100 80GB with DEADLINE=1100, every
# stage rc=0: benchmarks/results/raw/2026-12-07-h100-callD/, summary benchmarks/results/2026-12-07-h100-callD.jsonl,
# read in benchmarks/README.md "call D"). One GPU (H100 or H200), ~25 minutes.
# Stages in the order the issues need them (each has its own limit; none starts after DEADLINE seconds):
#   testgpu  make test-gpu in one process (issue 27 item 6). Call C: 10 passed, 1 failed: the offload test's
#            peak counted the previous run's model (~0.33 GiB, kept by reference cycles until a gc); the test
#            now collects and measures above what was allocated before each run
#   partA    issue 29 Part A: 43 steps so that later saves exist beside the first (call C: the step-12 save
#            was deferred to the last step, so save_blocking had none); each run's checkpoints removed after
#            it (call C: four 17 GB checkpoints filled the disk and the profiled run failed); every save's
#            event now splits blocked_s into wait_s (the previous write) and snapshot_s (the device-to-host
#            copy): call C's first save blocked 6.2 s, which part is the pinning of ~17 GB of host buffers?
#            Since 2026-12-07 a snapshot with room on the GPU is staged there (a device copy; the writer
#            moves it to the pinned buffers on its own stream): staged_gib > 0 in each event, and
#            test-gpu's test_gpu_snapshot_is_pinned_reused_and_a_true_copy[staged|host] covers both paths
#   lora32k  issues 26/28: LoRA 8B at 32k as written (train.recompute_attention: auto keeps attention there
#            now) against recompute-attn (the recipe before) and the peer's best, same call
#   qlora8b  issue 26: QLoRA 8B as written vs the peer's best
#   lora128k issue 28: LoRA and QLoRA 8B at 131,072 tokens as written (fits only an H200: on an H100 the
#            launcher refuses in one line, 124,928 is the longest that fits); the recipe before (2,543 tok/s
#            on an H200, 2026-12-06) is the baseline, so recompute-attn is not rerun here. Run after partA
#            (2026-12-07, on an H200, DEADLINE 1400 so that the whole call fits 30 minutes of device time)
# Lead's commands (carry [".whl"] from ../shared/device/wheels.sh), each within 30 s of the last:
#   1. python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (setsid nohup bash benchmarks/calls/2026-12-07-h100-callD.sh > /tmp/callD-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/callD 570
#   2. bash benchmarks/detached.sh wait /tmp/callD 570
#   3. bash benchmarks/detached.sh wait /tmp/callD 400   (only if 2 printed no "done")
set -u
LOG=/tmp/callD DEADLINE=${DEADLINE:-1400}
source benchmarks/detached.sh
prepare_machine
stage testgpu 170 make test-gpu GPU_PIP_ARGS="--no-deps --no-build-isolation" PYTEST_ARGS="-p no:cacheprovider -rs -q"
stage partA 420 python3 benchmarks/zero3_one_gpu.py --size 1b --steps 43 --every 6 --profile --work /tmp/z3 --out "$LOG/results/zero3_one_gpu.jsonl"
for m in /tmp/z3/runs/*/metrics.jsonl; do cp "$m" "$LOG/results/$(basename "$(dirname "$m")").metrics.jsonl"; done 2>/dev/null
cp /tmp/z3/runs/z3-profile/profile/summary.txt "$LOG/results/z3-profile.summary.txt" 2>/dev/null
rm -rf /tmp/z3
B=(python3 benchmarks/bench.py --work-dir /tmp/wb --models /tmp/models --results "$LOG/results" --timeout 240 --steps 12 --warmup 4)
stage lora32k 300 "${B[@]}" --only lora-8b-32k --variants default,recompute-attn --peer-settings liger --steps 6 --warmup 2; keep_runs /tmp/wb
stage qlora8b 200 "${B[@]}" --only qlora-8b --variants default --peer-settings liger-no-gc; keep_runs /tmp/wb
stage lora128k 460 "${B[@]}" --only lora-8b-128k,qlora-8b-128k --variants default --peer-settings none --steps 3 --warmup 1 --timeout 230; keep_runs /tmp/wb
finish
