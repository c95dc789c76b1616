#!/usr/bin/env bash
# Device call H3 (2026-12-07, after call H2; the session's last ~360 s of device time; ran 22:05-22:09 UTC on one H100 80GB and
# was cut when the device time ran out, while the profiled run went on: no files came back. Its output: lora-8b as
# written 11,580 tok/s, MFU 37.3%, 67.5 GiB: bf16, auto's fp8 fell back for want of room (fixed since: replan_fp8)): the recipe as written now
# that core/precision.py MEASURED holds call H2's LoRA rows (auto should pick fp8 for LoRA 8B), and where that
# step's time goes (the same recipe profiled over steps 8-10: RUN_DIR/profile/summary.txt). ~3 minutes.
# Lead's command (carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (DEADLINE=200 setsid nohup bash benchmarks/calls/2026-12-07-h100-callH3.sh > /tmp/callH3-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/callH3 230
set -u
LOG=/tmp/callH3 DEADLINE=${DEADLINE:-200}
source benchmarks/detached.sh
prepare_machine
B=(python3 benchmarks/bench.py --work-dir /tmp/wb --models /tmp/models --results "$LOG/results" --timeout 120 --steps 12 --warmup 4)
stage auto 170 "${B[@]}" --only lora-8b --variants default --variant 'profile=logging.profile_start=8 logging.profile_steps=3' --peer-settings none; keep_runs /tmp/wb
cp -r /tmp/wb/runs/*/profile/summary.txt "$LOG/profile-summary.txt" 2>/dev/null
finish
