#!/usr/bin/env bash
# Device call F (written 2026-12-07, after call E; ran 16:29-16:33 UTC on one H100 80GB with DEADLINE=240: after rc=0,
# testgpu cut at its 61 s; benchmarks/results/raw/2026-12-07-h100-callF/). One GPU, ~5 minutes. Call E's fix left one page-locking in the
# first save: the Bounce's two 64 MiB buffers, made at its first use, held the training thread ~60 ms (first save
# blocked 0.080 s, 0.117 s profiled, against ~0.03 s for later saves). They are now made with the Writer, before
# training. Stages: after (z3-saves and z3, 43 steps, a save every 6), then make test-gpu if time is left.
# Lead's command (carry [".whl"]; timeout_s 420):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; bash benchmarks/calls/2026-12-07-h100-callF.sh; bash benchmarks/detached.sh wait /tmp/callF 1
set -u
LOG=/tmp/callF DEADLINE=${DEADLINE:-330}
source benchmarks/detached.sh
prepare_machine
stage after 200 python3 benchmarks/zero3_one_gpu.py --size 1b --every 6 --out "$LOG/results/zero3_one_gpu.jsonl" --steps 43 --runs z3-saves,z3 --work /tmp/z3
for m in /tmp/z3/runs/*/metrics.jsonl; do cp "$m" "$LOG/results/$(basename "$(dirname "$m")").metrics.jsonl"; done 2>/dev/null
rm -rf /tmp/z3/runs
stage testgpu 110 make test-gpu GPU_PIP_ARGS="--no-deps --no-build-isolation" PYTEST_ARGS="-p no:cacheprovider -rs -q"
finish
