#!/usr/bin/env bash
# Device call G (written 2026-12-07 18:45 UTC for an H200; after repeated starts that got no machine (18:49-19:14) it ran 19:25-19:35 UTC
# on one H100 80GB with DEADLINE=540: testgpu, fp8gemm, lora8b rc=0; chat cut at its 121 s (TRL's run killed);
# full1b, qlora8b, lora32k skipped. benchmarks/results/raw/2026-12-07-h100-callG/, summary
# benchmarks/results/2026-12-07-h100-callG.jsonl, read in benchmarks/README.md "call G"). ~21 minutes in all.
# What it shows: the recipe as written against the peer's best setting of the earlier calls, every issue-26
# workload in one call, and the FP8 frozen base of LoRA with its weight cast once (training/model/fp8_frozen.py,
# new since call B, where torchao's per-call casts made LoRA 8B in FP8 0.58x bf16).
#   testgpu  make test-gpu first: the Bounce buffers made at Writer init (call F's test stage was cut) and the
#            FP8 LoRA numerics through the kept-weight path (tests/test_fp8.py)
#   fp8gemm  one 8B layer's linears, frozen: bf16 against the kept-weight tensorwise path and torchao's
#            Float8Linear (casts its weight every call), 8,192 and 32,768 tokens, eager
#   lora8b   LoRA 8B mbs 4: default, fp8 (train.precision=fp8), peer liger-no-gc (its best in calls B-D)
#   chat     chat-lora-8b: default (packing on), TRL trl-packing-liger-no-gc (its best, call C), HF liger-no-gc-mbs16
#   full1b   full 1B mbs 8: default, peer plain-liger-no-gc
#   qlora8b  QLoRA 8B mbs 4: default, peer liger-no-gc
#   lora32k  LoRA 8B at 32k: default, fp8, peer liger; 6 steps after 2
# Lead's commands (carry [".whl"]), each within 30 s of the last:
#   1. python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (setsid nohup bash benchmarks/calls/2026-12-07-h100-callG.sh > /tmp/callG-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/callG 570
#   2. bash benchmarks/detached.sh wait /tmp/callG 570
#   3. bash benchmarks/detached.sh wait /tmp/callG 300   (only if 2 printed no "done")
set -u
LOG=/tmp/callG DEADLINE=${DEADLINE:-1250}
source benchmarks/detached.sh
prepare_machine
stage testgpu 150 make test-gpu GPU_PIP_ARGS="--no-deps --no-build-isolation" PYTEST_ARGS="-p no:cacheprovider -rs -q"
stage fp8gemm 70 python3 benchmarks/fp8_gemm.py --models 8b --tokens 8192,32768 --compile off --recipes tensorwise --budget-s 45
B=(python3 benchmarks/bench.py --work-dir /tmp/wb --models /tmp/models --results "$LOG/results" --timeout 240 --steps 12 --warmup 4)
FP8=(--variant fp8='train.precision=fp8')
stage lora8b 400 "${B[@]}" --only lora-8b --variants default "${FP8[@]}" --peer-settings liger-no-gc; keep_runs /tmp/wb
stage chat 300 "${B[@]}" --only chat-lora-8b --variants default --peer-settings trl-packing-liger-no-gc,liger-no-gc-mbs16; keep_runs /tmp/wb
stage full1b 200 "${B[@]}" --only full-1b --variants default --peer-settings plain-liger-no-gc; keep_runs /tmp/wb
stage qlora8b 200 "${B[@]}" --only qlora-8b --variants default --peer-settings liger-no-gc; keep_runs /tmp/wb
stage lora32k 300 "${B[@]}" --only lora-8b-32k --variants default "${FP8[@]}" --peer-settings liger --steps 6 --warmup 2; keep_runs /tmp/wb
finish
