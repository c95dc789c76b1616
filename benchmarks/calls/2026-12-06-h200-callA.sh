#!/usr/bin/env bash
# Device call A of 2026-12-06 (one H200): the "before" numbers for issues 26 and 29 on main at 1cbddc2.
#   1. fp8 probe: torchao float8 vs bf16 on one decoder layer's linears (1B/8B shapes), eager/compiled,
#      trainable/frozen (benchmarks/calls/2026-12-06-probe-fp8.py)
#   2. attention kernels: sdpa flash / cuDNN / efficient at 2k x4, 8k, 32k, 128k (benchmarks/attention_kernels.py)
#   0. make test-gpu (issue 27 item 6), on main with this session's first fixes
#   3. issue 29 Part A before: full 1B, ZeRO-3 forced, mbs 4 x 2048, packing, saves every 6 steps; no saves;
#      ZeRO-0; 18 steps each, through `zerotune train` (bench.py variants), metrics.jsonl of each run back
# Lead's command (carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (setsid nohup bash benchmarks/calls/2026-12-06-h200-callA.sh > /tmp/callA-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/callA 540
set -u
LOG=/tmp/callA DEADLINE=560
source benchmarks/detached.sh
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv > "$LOG/gpu.txt"
python3 -c 'import sys; sys.path.insert(0, "benchmarks"); from pathlib import Path; from bench_setup import make_package; make_package(Path("/tmp/pkg"))'
stage testgpu 240 make test-gpu GPU_PIP_ARGS="--no-deps --no-build-isolation" PYTEST_ARGS="-p no:cacheprovider -rs -q"
stage fp8probe 120 python3 benchmarks/calls/2026-12-06-probe-fp8.py
stage attention 90 python3 benchmarks/attention_kernels.py --lengths 2048x4,32768x1,131072x1
B=(python3 benchmarks/bench.py --work-dir /tmp/wb --results "$LOG/results" --timeout 150 --steps 13 --warmup 3)
keep() { mkdir -p "$LOG/runs"; cp -r /tmp/wb/logs "$LOG/" 2>/dev/null; for m in /tmp/wb/runs/*/metrics.jsonl; do cp "$m" "$LOG/runs/$(basename "$(dirname "$m")").metrics.jsonl"; done 2>/dev/null; }
stage partA 300 "${B[@]}" --only full-1b --variants none --peer-settings none \
  --variant 'z3-save=distributed.zero=3 train.micro_batch_size=4 checkpoint.every=6 checkpoint.keep=2' \
  --variant 'z0=distributed.zero=0 train.micro_batch_size=4'; keep
keep
rm -rf /tmp/wb/runs/*/checkpoints
finish
