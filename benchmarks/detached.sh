#!/usr/bin/env bash
# Device calls longer than the 10-minute command limit: a stage list (a script that sources this
# file) runs detached on the machine, and every command of the call waits for it, then packs what
# it has written so far into $OUT/<name of LOG>.tgz, so a call cut short still returns its results.
#
#   first command:  setsid nohup bash STAGES.sh > /tmp/driver.log 2>&1 < /dev/null &
#                   bash benchmarks/detached.sh wait /tmp/callN 530
#   later commands: bash benchmarks/detached.sh wait /tmp/callN 530     (within 30 s: the machine stays warm)
#
# In STAGES.sh:  LOG=/tmp/callN DEADLINE=660; source benchmarks/detached.sh; stage NAME SECONDS CMD...; finish
# A stage runs with its own limit, never past DEADLINE seconds from the source, and is skipped when
# under 60 s are left; one cut off by its limit has every GPU process killed (zerotune train starts its
# ranks in their own session, out of reach of `timeout`).

left() { echo $(( DEADLINE - ($(date +%s) - START) )); }

stage() {
  local name=$1 limit=$2; shift 2
  local l; l=$(left); [ "$limit" -gt "$l" ] && limit=$l
  if [ "$l" -lt 60 ]; then echo "$(date +%T) $name skipped ($l s left)" >> "$LOG/progress"; return; fi
  echo "$(date +%T) $name start (limit ${limit}s)" >> "$LOG/progress"
  timeout -k 20 "$limit" "$@" > "$LOG/$name.log" 2>&1
  local rc=$?
  echo "$(date +%T) $name rc=$rc" >> "$LOG/progress"
  [ $rc -ge 124 ] && nvidia-smi --query-compute-apps=pid --format=csv,noheader | xargs -r kill -9; sleep 3
}

finish() { echo "$(date +%T) done" >> "$LOG/progress"; touch "$LOG/DONE"; }

prepare_machine() {   # the environment every stage runs in: wheels from /tmp/site, zerotune from /tmp/pkg
  export TORCH_EXTENSIONS_DIR=/tmp/torch_extensions PYTHONPATH=/tmp/site TORCH_CUDA_ARCH_LIST=9.0 \
         TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  { nvidia-smi --query-gpu=name,memory.total,compute_cap --format=csv; df -h /tmp; free -g; } > "$LOG/gpu.txt"
  python3 -c 'import sys; sys.path.insert(0, "benchmarks"); from pathlib import Path; from bench_setup import make_package; make_package(Path("/tmp/pkg"))'
  export PYTHONPATH=/tmp/pkg:/tmp/site
  mkdir -p "$LOG/results"
}

keep_runs() {   # WORK: bench.py's logs, every run's metrics.jsonl and recipe.yaml into $LOG; checkpoints dropped
  local work=$1 m; mkdir -p "$LOG/runs"; cp -r "$work/logs" "$LOG/" 2>/dev/null
  for m in "$work"/runs/*/metrics.jsonl "$work"/runs/*/recipe.yaml; do
    [ -f "$m" ] && cp "$m" "$LOG/runs/$(basename "$(dirname "$m")").$(basename "$m")"
  done
  rm -rf "$work"/runs/*/checkpoints
}

wait_and_pack() {   # LOG SECONDS
  local log=$1 end=$(( $(date +%s) + $2 )) cur
  while [ ! -f "$log/DONE" ] && [ "$(date +%s)" -lt "$end" ]; do
    sleep 30; cur=$(ls -t "$log"/*.log 2>/dev/null | head -1)
    echo "[$(date +%T)] $(tail -1 "$log/progress" 2>/dev/null) | $(basename "${cur:-none}"): $(tail -c 300 "$cur" 2>/dev/null | tr '\n' ' ' | tail -c 200)"
  done
  cat "$log/progress" 2>/dev/null; nvidia-smi --query-gpu=memory.used --format=csv,noheader | tr '\n' ' '; echo
  tar czf "$OUT/$(basename "$log").tgz" -C "$(dirname "$log")" "$(basename "$log")" 2>/dev/null; ls -la "$OUT"
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  [ "${1:-}" = wait ] && [ $# -eq 3 ] || { echo "usage: bash $0 wait LOG SECONDS" >&2; exit 2; }
  wait_and_pack "$2" "$3"
else
  START=$(date +%s); DEADLINE=${DEADLINE:-600}; mkdir -p "$LOG"
fi
