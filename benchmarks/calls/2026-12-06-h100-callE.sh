#!/usr/bin/env bash
# Device call E (2026-12-06, one GPU, ~5 minutes): what the device time left (275 s) could hold after call D
# (benchmarks/calls/2026-12-06-h100-callD.sh) was refused (no machine started) several times:
#   testgpu  make test-gpu in one process (issue 27 item 6) after the kept-model fix in tests/test_layers_gpu.py
#   partA    issue 29 Part A, the save-blocking run only (full 1B, ZeRO-3, a save every 6 steps, 31 steps): each
#            save's blocked seconds now split into the wait for the previous write and the snapshot (wait_s,
#            snapshot_s in its checkpoint event; the rest is DeepSpeed gathering its state)
#   lora32k  issues 26/28: LoRA 8B at 32k as written (train.recompute_attention: auto now keeps attention there)
#            vs the peer's best, only if 170 s are left
# Lead's command (carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (setsid nohup bash benchmarks/calls/2026-12-06-h100-callE.sh > /tmp/callE-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/callE 210
set -u
LOG=/tmp/callE DEADLINE=${DEADLINE:-200}
source benchmarks/detached.sh
prepare_machine
stage testgpu 150 make test-gpu GPU_PIP_ARGS="--no-deps --no-build-isolation" PYTEST_ARGS="-p no:cacheprovider -rs -q"
stage partA 110 python3 benchmarks/zero3_one_gpu.py --size 1b --steps 31 --every 6 --runs z3-saves --work /tmp/z3 --out "$LOG/results/zero3_one_gpu.jsonl"
cp /tmp/z3/runs/z3-saves/metrics.jsonl "$LOG/results/z3-saves.metrics.jsonl" 2>/dev/null; rm -rf /tmp/z3
if [ "$(left)" -ge 170 ]; then
  B=(python3 benchmarks/bench.py --work-dir /tmp/wb --models /tmp/models --results "$LOG/results" --timeout 120 --steps 6 --warmup 2)
  stage lora32k 170 "${B[@]}" --only lora-8b-32k --variants default --peer-settings liger; keep_runs /tmp/wb
fi
finish
