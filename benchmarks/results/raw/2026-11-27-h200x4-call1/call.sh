#!/usr/bin/env bash
# Device call 1: four GPUs, four independent single-GPU bench jobs side by side.
set -u
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site ../.whl/*.whl
export PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader | tee "$OUT/gpus.txt"
free -g | head -2 >> "$OUT/gpus.txt"; nproc >> "$OUT/gpus.txt"
B="python3 benchmarks/bench.py --steps 10 --warmup 3 --timeout 240 --budget-s ${BUDGET:-420}"
NOGC="train.gradient_checkpointing=false"
CUDA_VISIBLE_DEVICES=0 $B --only full-1b --peer-settings none --variants default,unfused-loss,no-gc,zero2-no-gc \
  --variant "zero1-no-gc=distributed.zero=1 $NOGC" --variant "zero0-no-gc=distributed.zero=0 $NOGC" \
  --work-dir /tmp/w0 --results "$OUT/r0" > "$OUT/g0.log" 2>&1 &
CUDA_VISIBLE_DEVICES=1 $B --only full-1b --variants none --work-dir /tmp/w1 --results "$OUT/r1" > "$OUT/g1.log" 2>&1 &
CUDA_VISIBLE_DEVICES=2 $B --only lora-8b --variants default,unfused-loss,no-gc --peer-settings default,no-gc,liger \
  --work-dir /tmp/w2 --results "$OUT/r2" > "$OUT/g2.log" 2>&1 &
CUDA_VISIBLE_DEVICES=3 $B --only qlora-8b --variants default,unfused-loss,no-gc --peer-settings default,no-gc,liger \
  --work-dir /tmp/w3 --results "$OUT/r3" > "$OUT/g3.log" 2>&1 &
wait
echo "== gpu tests"; PYTHONPATH=/tmp/w0/pkg:$PYTHONPATH timeout 120 python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_loss.py tests/test_monitoring.py -s 2>&1 | tail -8
for i in 0 1 2 3; do echo "== g$i"; grep -vi "warn" "$OUT/g$i.log" | tail -25; done
for d in /tmp/w0/runs/*/ ; do [ -f "$d/FAILED" ] && { echo "FAILED $d"; head -5 "$d/FAILED"; }; done
ls -R "$OUT" | head -40
