#!/usr/bin/env bash
# Device call 2: single-GPU workloads side by side on four GPUs; each job runs zerotune and the
# peer in the same call on the same machine.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl
export PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
B="python3 benchmarks/bench.py --steps 10 --warmup 3 --timeout 240 --budget-s ${BUDGET:-400}"
NOGC="train.gradient_checkpointing=false"
Z0="distributed.zero=0 $NOGC"
CUDA_VISIBLE_DEVICES=0 $B --only full-1b --peer-settings none --variants none \
  --variant "zero0-no-gc=$Z0" --variant "zero0-no-gc-unfused=$Z0 train.fused_loss=false" \
  --variant "zero0-no-gc-compile=$Z0 train.compile=true" --variant "zero0-no-gc-compile-unfused=$Z0 train.compile=true train.fused_loss=false" \
  --work-dir /tmp/w0 --results "$OUT/r0" > "$OUT/g0.log" 2>&1 &
(CUDA_VISIBLE_DEVICES=1 $B --only full-1b --variants none --peer-settings default,no-gc --work-dir /tmp/w1 --results "$OUT/r1a"
 CUDA_VISIBLE_DEVICES=1 $B --only full-1b-offload --variants default,no-gc --peer-settings default --work-dir /tmp/w1 --results "$OUT/r1b") > "$OUT/g1.log" 2>&1 &
CUDA_VISIBLE_DEVICES=2 $B --only chat-alpaca,chat-sharegpt --variants default --variant "zero0-no-gc=$Z0" \
  --peer-settings default,no-gc --work-dir /tmp/w2 --results "$OUT/r2" > "$OUT/g2.log" 2>&1 &
(CUDA_VISIBLE_DEVICES=3 $B --only lora-8b --variants no-gc --variant "zero0-no-gc-compile=$Z0 train.compile=true" \
   --peer-settings default,no-gc --work-dir /tmp/w3 --results "$OUT/r3a"
 CUDA_VISIBLE_DEVICES=3 $B --only qlora-8b --variants default,no-gc --peer-settings default,no-gc --work-dir /tmp/w3 --results "$OUT/r3b") > "$OUT/g3.log" 2>&1 &
wait
for i in 0 1 2 3; do echo "== g$i"; grep -E "tok/s|ratio|failed|error|Error" "$OUT/g$i.log" | grep -v "^|" | tail -20; done
for f in "$OUT"/r*/*.jsonl; do case $f in *-runs.jsonl) cat "$f" >> "$OUT/all-runs.jsonl";; *) cat "$f" >> "$OUT/all.jsonl";; esac; done
rm -rf "$OUT"/r*/; ls "$OUT"
