#!/usr/bin/env bash
# Device call E (written 2026-12-07; ran 16:00-16:15 UTC on one H100 80GB, every stage rc=0:
# benchmarks/results/raw/2026-12-07-h100-callE/, summary benchmarks/results/2026-12-07-h100-callE.jsonl, read in
# benchmarks/README.md "call E"). One GPU (H100 or H200), ~15 minutes. Stages, in the order the issues need them
# (each has its own limit; none starts after DEADLINE seconds):
#   before   issue 29 Part A, the cause: call D's first background save (1B, ZeRO-3, 13.8 GiB staged on the GPU)
#            blocked training 2.65 s with a 0.007 s snapshot, and the step after it took 2.76 s (0.79 s of data
#            wait) against 0.22 s. Suspect: the writer thread page-locking 13.8 GiB (cudaHostAlloc holds the
#            driver; every CUDA call of the process waits). The code before the fix (callE-baseline/*.before,
#            = b02d6c9) in its own copy of the tree, profiled over the save step and the next: top_cpu.txt lists
#            the longest events by thread
#   after    the fix (training/checkpoint/async_save.py Bounce: the writer moves the staged copy through two
#            64 MiB page-locked buffers into plain ones): z3-saves and z3 43 steps, a save every 6, and the
#            profiled run; save_blocking's fraction is now the worst save, the first included
#   testgpu  make test-gpu (test_gpu_snapshot_reuses_its_host_buffers_and_is_a_true_copy covers the Bounce)
#   lora128k issue 28: LoRA and QLoRA 8B at 131,072 tokens as written, after the planner fix 2c3deef (on an
#            H100 it now plans LoRA with 31/32 layers checkpointed and the MLP tiled, 67.5 GiB; QLoRA 31/32,
#            71.5 GiB; neither has run). Call D on an H100: QLoRA 2,361 tok/s (28 layers offloaded), LoRA refused
# Lead's commands (carry [".whl"] from ../shared/device/wheels.sh), each within 30 s of the last:
#   1. python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (setsid nohup bash benchmarks/calls/2026-12-07-h100-callE.sh > /tmp/callE-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/callE 570
#   2. bash benchmarks/detached.sh wait /tmp/callE 570
set -u
LOG=/tmp/callE DEADLINE=${DEADLINE:-1080}
source benchmarks/detached.sh
prepare_machine
rm -rf /tmp/before && mkdir /tmp/before && cp -r benchmarks training launcher core ds_configs slurm examples pyproject.toml /tmp/before/ 2>/dev/null
cp benchmarks/calls/callE-baseline/async_save.py.before /tmp/before/training/checkpoint/async_save.py
cp benchmarks/calls/callE-baseline/save.py.before /tmp/before/training/checkpoint/save.py
Z="--size 1b --every 6 --out $LOG/results/zero3_one_gpu.jsonl"
stage before 200 python3 /tmp/before/benchmarks/zero3_one_gpu.py $Z --steps 10 --runs z3-profile --work /tmp/z3b
mkdir -p /tmp/z3 && mv /tmp/z3b/models /tmp/z3/models
stage after 420 python3 benchmarks/zero3_one_gpu.py $Z --steps 43 --runs z3-saves,z3 --profile --work /tmp/z3
for w in z3b z3; do
  for m in /tmp/$w/runs/*/metrics.jsonl; do cp "$m" "$LOG/results/$w.$(basename "$(dirname "$m")").metrics.jsonl"; done 2>/dev/null
  T=/tmp/$w/runs/z3-profile/profile/trace-rank0.json
  [ -f "$T" ] && python3 - "$T" > "$LOG/results/$w.top_cpu.txt" <<'PY'
import json, sys
ev = [e for e in json.load(open(sys.argv[1]))["traceEvents"] if e.get("ph") == "X"]
t0 = min(e["ts"] for e in ev)
for e in sorted(ev, key=lambda e: -e.get("dur", 0))[:80]:
    print(f'{e["dur"] / 1e3:9.1f} ms at {(e["ts"] - t0) / 1e3:9.1f} ms tid {e.get("tid")} {e.get("cat")} {e["name"][:90]}')
PY
  [ -f "$T" ] && gzip -c "$T" > "$LOG/results/$w.trace.json.gz"
done
rm -rf /tmp/z3b /tmp/z3/runs
stage testgpu 170 make test-gpu GPU_PIP_ARGS="--no-deps --no-build-isolation" PYTEST_ARGS="-p no:cacheprovider -rs -q"
B=(python3 benchmarks/bench.py --work-dir /tmp/wb --models /tmp/models --results "$LOG/results" --timeout 240)
stage lora128k 460 "${B[@]}" --only lora-8b-128k,qlora-8b-128k --variants default --peer-settings none --steps 3 --warmup 1 --timeout 230; keep_runs /tmp/wb
finish
