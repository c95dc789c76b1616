#!/usr/bin/env bash
# Device call H2 (2026-12-07, session from 21:24 UTC; written for an H200, may get an H100: gpu.txt says which).
# Every issue-26 workload as a user writes it against the peer's best setting of the earlier calls, in one
# call, after call H1 showed where the kept-weight FP8 path lost at 8k tokens (a whole-tensor amax compiled
# with symbolic sizes: 2.4 of 11.6 ms; the FP8 weight's transpose through ATen's unvectorised copy: 1.5 ms).
# Now: per-row amax first, the transpose compiled, fast accumulation on the output GEMM.
#   testgpu  make test-gpu (tests/test_fp8.py trains LoRA through the kept-weight path)
#   fp8gemm  one 8B layer's frozen linears: bf16, the kept path, torchao's Float8Linear; 8k and 32k; profiled
#   lora8b   LoRA 8B mbs 4: default, fp8 (train.precision=fp8), peer liger-no-gc
#   full1b   full 1B mbs 8: default, peer plain-liger-no-gc
#   qlora8b  QLoRA 8B mbs 4: default, peer liger-no-gc
#   lora32k  LoRA 8B at 32k: default, fp8, peer liger; 6 steps after 2
#   chat     chat-lora-8b: default (packing on), TRL trl-packing-liger-no-gc, HF liger-no-gc-mbs16
# ~18 minutes. Lead's commands (carry [".whl"]), each within 30 s of the last:
#   1. python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (setsid nohup bash benchmarks/calls/2026-12-07-h100-callH2.sh > /tmp/callH2-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/callH2 560
#   2. bash benchmarks/detached.sh wait /tmp/callH2 560
#   3. bash benchmarks/detached.sh wait /tmp/callH2 300   (only if 2 printed no "done")
set -u
LOG=/tmp/callH2 DEADLINE=${DEADLINE:-1200}
source benchmarks/detached.sh
prepare_machine
stage testgpu 150 make test-gpu GPU_PIP_ARGS="--no-deps --no-build-isolation" PYTEST_ARGS="-p no:cacheprovider -rs -q"
stage fp8gemm 70 python3 benchmarks/fp8_gemm.py --models 8b --modes frozen --tokens 8192,32768 --compile off --recipes tensorwise --profile --budget-s 40
B=(python3 benchmarks/bench.py --work-dir /tmp/wb --models /tmp/models --results "$LOG/results" --timeout 240 --steps 12 --warmup 4)
FP8=(--variant fp8='train.precision=fp8')
stage lora8b 300 "${B[@]}" --only lora-8b --variants default "${FP8[@]}" --peer-settings liger-no-gc; keep_runs /tmp/wb
stage full1b 150 "${B[@]}" --only full-1b --variants default --peer-settings plain-liger-no-gc; keep_runs /tmp/wb
stage qlora8b 150 "${B[@]}" --only qlora-8b --variants default --peer-settings liger-no-gc; keep_runs /tmp/wb
stage lora32k 300 "${B[@]}" --only lora-8b-32k --variants default "${FP8[@]}" --peer-settings liger --steps 6 --warmup 2; keep_runs /tmp/wb
stage chat 240 "${B[@]}" --only chat-lora-8b --variants default --peer-settings trl-packing-liger-no-gc,liger-no-gc-mbs16; keep_runs /tmp/wb
finish
