#!/usr/bin/env bash
# Device call B of 2026-12-06 (one H200 asked for; it ran on an H100. The "before" call never got a machine).
# Stages, in order of what the issues' acceptance needs (each stage has its own limit; the driver stops
# starting stages DEADLINE seconds after its start):
#   testgpu    make test-gpu: every gpu test in one process (issue 27 item 6; fp8, layer, kernel, save tests)
#   partA      issue 29 Part A: benchmarks/zero3_one_gpu.py (full 1B, ZeRO-3 forced, mbs 4 x 2048, packing:
#              saves every 6 steps; no saves; ZeRO-0), then z3old: the ZeRO-3 run again with the one-process
#              persistence rule of launcher/ds_config.py switched off (a copy of the file, put back after)
#   lora8b / chat / full1b / lora32k   issue 26: the recipe as written (`default`) and `fp8`
#              (train.precision=fp8) against the peer's best setting; chat-lora-8b against TRL's best
#   attention  sdpa backends at 2k x4, 32k, 128k (benchmarks/attention_kernels.py)
# Lead's commands (kind nvidia-h200, carry [".whl"]), each within 30 s of the previous one's end:
#   1. python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (setsid nohup bash benchmarks/calls/2026-12-06-h200-callB.sh > /tmp/callB-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/callB 570
#   2. bash benchmarks/detached.sh wait /tmp/callB 570
#   3. bash benchmarks/detached.sh wait /tmp/callB 240   (only if 2 printed no "done")
set -u
LOG=/tmp/callB DEADLINE=${DEADLINE:-1200}
source benchmarks/detached.sh
export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv > "$LOG/gpu.txt"; df -h /tmp >> "$LOG/gpu.txt"
python3 -c 'import sys; sys.path.insert(0, "benchmarks"); from pathlib import Path; from bench_setup import make_package; make_package(Path("/tmp/pkg"))'
export PYTHONPATH=/tmp/pkg:/tmp/site
stage testgpu 230 make test-gpu GPU_PIP_ARGS="--no-deps --no-build-isolation" PYTEST_ARGS="-p no:cacheprovider -rs -q"
mkdir -p "$LOG/results"
stage partA 240 python3 benchmarks/zero3_one_gpu.py --size 1b --steps 13 --every 6 --work /tmp/z3 --out "$LOG/results/zero3_one_gpu.jsonl"
cp launcher/ds_config.py /tmp/ds_config.py.orig
sed -i 's/if world_size == 1 and not d.offload_params/if False and world_size == 1 and not d.offload_params/' launcher/ds_config.py
stage z3old 90 python3 benchmarks/zero3_one_gpu.py --size 1b --steps 13 --every 6 --runs z3 --work /tmp/z3old --out "$LOG/results/zero3_old_rule.jsonl"
cp /tmp/ds_config.py.orig launcher/ds_config.py
cp /tmp/z3/runs/*/metrics.jsonl "$LOG/results/" 2>/dev/null; rm -rf /tmp/z3 /tmp/z3old
B=(python3 benchmarks/bench.py --work-dir /tmp/wb --models /tmp/models --results "$LOG/results" --timeout 200 --steps 12 --warmup 4)
keep() { mkdir -p "$LOG/runs"; cp -r /tmp/wb/logs "$LOG/" 2>/dev/null; for m in /tmp/wb/runs/*/metrics.jsonl /tmp/wb/runs/*/recipe.yaml; do cp "$m" "$LOG/runs/$(basename "$(dirname "$m")").$(basename "$m")"; done 2>/dev/null; }
stage lora8b 300 "${B[@]}" --only lora-8b --variants default --variant 'fp8=train.precision=fp8' --peer-settings liger-no-gc; keep
stage chat 200 "${B[@]}" --only chat-lora-8b --variants default --peer-settings trl-packing-liger-no-gc; keep
stage full1b 170 "${B[@]}" --only full-1b --variants default --variant 'fp8=train.precision=fp8' --peer-settings plain-liger-no-gc; keep
stage lora32k 150 "${B[@]}" --only lora-8b-32k --variants default --peer-settings liger --steps 5 --warmup 2; keep
stage attention 60 python3 benchmarks/attention_kernels.py --lengths 2048x4,32768x1,131072x1
rm -rf /tmp/wb/runs/*/checkpoints
finish
