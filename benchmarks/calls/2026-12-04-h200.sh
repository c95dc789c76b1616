#!/usr/bin/env bash
# Device call for issue 20 (one H200, ~18-20 min of device time): the gpu tests of
# tests/test_kernels.py (liger vs none: loss and gradients, fp32/bf16, full/LoRA), then zerotune's
# recipe AS WRITTEN (bench variant `default`: no --set; gradient checkpointing, model.kernels,
# fused loss and the ZeRO stage left to auto, planned for the 140.4 GiB nvidia-smi reports) against
# the peer's best setting(s) from ../shared/bench/README.md, 12 steps (6 at 32k):
#   full 1B mbs 8 ......... peer --plain --liger --no-gc   (best: 55,173 tok/s, 2026-12-04)
#   LoRA 8B mbs 4 ......... peer --liger --no-gc           (best: 11,866)
#   QLoRA 8B mbs 4 ........ peer --no-gc, --liger --no-gc  (best known: --no-gc 7,932; liger unmeasured)
#   LoRA 8B 32k mbs 1 ..... peer default, --liger           (default 4,941; --no-gc is expected to OOM)
# Expected: ~3 min setup (wheels, DeepSpeed op build, the 8B model ~1.5 min), tests ~1.5 min,
# ~12 min of runs. If time is left, a profiled run of full 1B and LoRA 8B (logging.profile_start).
#
# Wheels (here, before the call; liger-kernel 0.8.5 is in the default list):
#   cd /work/wt20 && ../shared/device/wheels.sh .venv/bin/python
# The lead's device commands (the run tool, kind nvidia-h200, carry [".whl"]), each within 30 s of
# the previous one:
#   1. python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (setsid nohup bash benchmarks/calls/2026-12-04-h200.sh > /tmp/call20-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/call20 500
#   2. bash benchmarks/detached.sh wait /tmp/call20 550
#   3. (only if 2 printed no "done") bash benchmarks/detached.sh wait /tmp/call20 300
# Each returns $OUT/call20.tgz (progress, one log per stage, results/*.jsonl, the gpu test output):
# unpack it into benchmarks/results/raw/2026-12-04-h200-call20/ and copy results/*.jsonl into
# benchmarks/results/.
set -u
LOG=/tmp/call20 DEADLINE=1140
source benchmarks/detached.sh
export PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
python3 -c 'import sys; sys.path.insert(0, "benchmarks"); from pathlib import Path; from bench_setup import make_package; make_package(Path("/tmp/pkg"))'
nvidia-smi --query-gpu=name,memory.total --format=csv > "$LOG/gpu.txt"
B=(python3 benchmarks/bench.py --work-dir /tmp/wb --results "$LOG/results" --timeout 240)
keep() { mkdir -p "$LOG/wb"; cp -r /tmp/wb/logs "$LOG/wb/" 2>/dev/null; }   # the runs' logs come back too
stage gputests 200 env PYTHONPATH=/tmp/pkg:/tmp/site python3 -m pytest -m gpu -v -s -p no:cacheprovider tests/test_kernels.py
stage full1b 330 "${B[@]}" --only full-1b --variants default --peer-settings plain-liger-no-gc; keep
stage lora8b 360 "${B[@]}" --only lora-8b --variants default --peer-settings liger-no-gc; keep
stage qlora8b 330 "${B[@]}" --only qlora-8b --variants default --peer-settings no-gc,liger-no-gc; keep
stage lora32k 300 "${B[@]}" --only lora-8b-32k --variants default --peer-settings default,liger --steps 6 --warmup 2; keep
# where the step time goes (logging.profile_start: the summary by category is in the run's log)
[ "$(left)" -ge 240 ] && stage profile 300 "${B[@]}" --only full-1b,lora-8b --variants none --peer-settings none \
  --variant 'profiled=logging.profile_start=8 logging.profile_steps=2'
keep
rm -rf /tmp/wb/runs
finish
