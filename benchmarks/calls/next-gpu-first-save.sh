#!/usr/bin/env bash
# Issue 29 Part A, what call D (benchmarks/results/raw/2026-12-07-h100-callD/) left open: where the first
# background save's ~5 s go (2.65 s blocked with a 0.007 s snapshot, then a 2.76 s step with 0.79 s of data
# wait), against 0.03 s for a later save. One GPU, ~4 minutes with the start. Since call D each checkpoint
# event also carries shards_s (DeepSpeed's save_checkpoint and the RNG file): blocked_s - wait_s - shards_s
# is save.py's own part (folders, collectives). The profiled run keeps RUN_DIR/profile: the CPU timeline
# (top_cpu.txt: the longest events, by thread) shows page-locking (cudaHostAlloc) in the writer thread
# against the training thread's waits.
# Lead's command (carry [".whl"] from ../shared/device/wheels.sh; timeout_s 240):
#   bash benchmarks/calls/next-gpu-first-save.sh
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1
LOG=$OUT/first-save
source benchmarks/detached.sh
prepare_machine   # the environment every detached stage runs in; $LOG/gpu.txt names the GPU
Z="python3 benchmarks/zero3_one_gpu.py --size 1b --every 6 --work /tmp/z3 --out $LOG/z3e.jsonl"
timeout 110 $Z --steps 10 --runs z3-profile > "$LOG/partA2.log" 2>&1; echo "z3-profile rc=$?"
timeout 100 $Z --steps 80 --runs z3-saves >> "$LOG/partA2.log" 2>&1; echo "z3-saves rc=$?"
for n in z3-profile z3-saves; do grep '"event"' "/tmp/z3/runs/$n/metrics.jsonl" > "$LOG/$n.events.jsonl"; done
T=/tmp/z3/runs/z3-profile/profile/trace-rank0.json
python3 - "$T" > "$LOG/top_cpu.txt" <<'PY'
import json, sys
ev = [e for e in json.load(open(sys.argv[1]))["traceEvents"] if e.get("ph") == "X"]
t0 = min(e["ts"] for e in ev)
for e in sorted(ev, key=lambda e: -e.get("dur", 0))[:60]:
    print(f'{e["dur"] / 1e3:9.1f} ms at {(e["ts"] - t0) / 1e3:9.1f} ms tid {e.get("tid")} {e.get("cat")} {e["name"][:90]}')
PY
gzip -c "$T" > "$LOG/trace.json.gz"; cat "$LOG/gpu.txt"; ls -la "$LOG"; cut -c1-330 "$LOG"/*.events.jsonl; head -30 "$LOG/top_cpu.txt"
