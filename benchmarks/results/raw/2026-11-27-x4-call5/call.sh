#!/usr/bin/env bash
# Device call 5 (nvidia-h100-x4, served as 4x H200), after call 4's NCCL bug was fixed
# (training/engine.init_distributed): the gpu-marked tests of test_training.py (then: 2 GPUs, train
# and resume on 2) and test_monitoring.py, the truth run (1B on 2 and 4 GPUs), and zerotune on
# long-8b-32k if time was left (it was not). Detached as call 4. The commands:
#   1. pip install .whl; setsid nohup bash THIS > /tmp/call5-driver.log 2>&1 < /dev/null &
#      bash benchmarks/detached.sh wait /tmp/call5 530
#   2. bash benchmarks/detached.sh wait /tmp/call5 200
#   3. (device time nearly spent) scale-4 trained 6 steps, then resume-4-on-2 by hand, to read the
#      failure that truth.jsonl recorded without its message: "state_steps is on cpu, different
#      from other tensors on cuda:0" in torch's fused AdamW (fixed since: reshard.place_step_counts)
set -u
LOG=/tmp/call5 DEADLINE=660
source benchmarks/detached.sh
export PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export ZT_DEVICE="$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr -cs 'A-Za-z0-9' '-')x$(nvidia-smi -L | wc -l)"
python3 -c 'import sys; sys.path.insert(0, "benchmarks"); from pathlib import Path; from bench_setup import make_package; make_package(Path("/tmp/pkg"))'
stage gputests 200 env PYTHONPATH=/tmp/pkg:/tmp/site python3 -m pytest -m gpu -v -s -p no:cacheprovider \
  tests/test_training.py tests/test_monitoring.py
stage truth 480 python3 benchmarks/truth_run.py --size 1b --gpus 2,4 --steps 12 --work /tmp/truth --out "$LOG/truth.jsonl"
rm -rf /tmp/truth/runs
[ "$(left)" -ge 200 ] && stage long 400 python3 benchmarks/bench.py --only long-8b-32k --variants default --peer-settings none \
  --steps 6 --warmup 2 --timeout 300 --work-dir /tmp/wl --results "$LOG/long"
finish
