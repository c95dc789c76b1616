#!/usr/bin/env bash
# Device call E (2026-12-06, one GPU, ~5 minutes): what 380 s of device time left could hold after call D
# (benchmarks/calls/2026-12-06-h100-callD.sh) was refused four times (no machine started):
#   testgpu  make test-gpu in one process (issue 27 item 6) after the kept-model fix in tests/test_layers_gpu.py
#   lora32k  issues 26/28: LoRA 8B at 32k as written (train.recompute_attention: auto now keeps attention there)
#            vs the peer's best in the same call, if the deadline leaves it time
# Lead's command (carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (setsid nohup bash benchmarks/calls/2026-12-06-h100-callE.sh > /tmp/callE-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/callE 320
set -u
LOG=/tmp/callE DEADLINE=${DEADLINE:-300}
source benchmarks/detached.sh
prepare_machine
stage testgpu 150 make test-gpu GPU_PIP_ARGS="--no-deps --no-build-isolation" PYTEST_ARGS="-p no:cacheprovider -rs -q"
B=(python3 benchmarks/bench.py --work-dir /tmp/wb --models /tmp/models --results "$LOG/results" --timeout 120 --steps 6 --warmup 2)
stage lora32k 200 "${B[@]}" --only lora-8b-32k --variants default --peer-settings liger; keep_runs /tmp/wb
finish
