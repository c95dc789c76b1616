#!/usr/bin/env bash
# Device call 3: full 8B, ZeRO-3 on all four GPUs, zerotune and the peer in the same call.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl
export PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
python3 benchmarks/bench.py --only full-8b --gpus 4 --steps 7 --warmup 2 --timeout 200 --budget-s ${BUDGET:-330} \
  --variants default,no-gc --peer-settings default,no-gc --work-dir /tmp/w8 --results "$OUT/r" > "$OUT/g.log" 2>&1
grep -E "tok/s|ratio|failed|rror" "$OUT/g.log" | grep -v "^|" | tail -20
for f in "$OUT"/r/*.jsonl; do case $f in *-runs.jsonl) cat "$f" >> "$OUT/all-runs.jsonl";; *) cat "$f" >> "$OUT/all.jsonl";; esac; done
rm -rf "$OUT"/r
