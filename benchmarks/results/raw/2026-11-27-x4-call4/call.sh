#!/usr/bin/env bash
# Device call 4 (nvidia-h100-x4, served as 4x H200): the gpu-marked tests, the truth run
# (benchmarks/truth_run.py, 1B on 2 and 4 GPUs through `zerotune train`) and long context (8B,
# ZeRO-3, sequence parallel over 4 GPUs, 32k and 128k, zerotune and the peer), detached
# (benchmarks/detached.sh; when it ran, its functions were written out in this file). The commands:
#   1. pip install .whl (as benchmarks/README.md); setsid nohup bash THIS > /tmp/call4-driver.log 2>&1 < /dev/null &
#      bash benchmarks/detached.sh wait /tmp/call4 500
#   2. bash benchmarks/detached.sh wait /tmp/call4 420
# Found: every multi-GPU `zerotune train` failed before its first step (fixed since: see call 5).
set -u
LOG=/tmp/call4 DEADLINE=1320
source benchmarks/detached.sh
export PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export ZT_DEVICE="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cs 'A-Za-z0-9' '-')x$(nvidia-smi -L | wc -l)"
python3 benchmarks/bench.py --help > /dev/null  # imports check
python3 -c 'import sys; sys.path.insert(0, "benchmarks"); from pathlib import Path; from bench_setup import make_package; make_package(Path("/tmp/pkg"))'
stage gputests 420 env PYTHONPATH=/tmp/pkg:/tmp/site python3 -m pytest -m gpu -v -s -p no:cacheprovider \
  tests/test_loss.py tests/test_monitoring.py tests/test_sequence_parallel.py
stage truth 540 python3 benchmarks/truth_run.py --size 1b --gpus 2,4 --steps 12 --work /tmp/truth --out "$LOG/truth.jsonl"
rm -rf /tmp/truth/runs
stage long 720 python3 benchmarks/bench.py --only long-8b-32k,long-8b-128k --variants default --peer-settings default \
  --steps 6 --warmup 2 --timeout 300 --budget-s $(( $(left) - 200 )) --work-dir /tmp/wl --results "$LOG/long"
cp -r /tmp/wl/logs "$LOG/long-logs" 2>/dev/null
for f in /tmp/wl/runs/*/FAILED; do [ -f "$f" ] && { echo "== $f"; cat "$f"; }; done > "$LOG/failed.txt" 2>&1
finish
