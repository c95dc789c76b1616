#!/usr/bin/env bash
# Device call H1 (2026-12-07, session from 21:24 UTC; ran 21:28-21:30 on one H100 80GB though an H200 was free to come; raw
# benchmarks/results/raw/2026-12-07-h100-callH1/, summary benchmarks/results/2026-12-07-h100-callH1.jsonl): where the kept-weight FP8 path's time goes at 8k
# tokens, where call G measured it at 0.91x bf16 (one 8B layer's frozen linears, forward + backward, eager).
# Now with torchao's fast accumulation on the output GEMM. Each stage: bf16, the kept path and torchao's
# Float8Linear at 8,192 and 32,768 tokens, with the issue time and the top GPU kernels of each case;
# the three stages differ only in the per-call cast (fp8_frozen.quantize_fast as shipped, compiled per
# shape, eager). ~3 minutes.
# Lead's command (carry [".whl"]):
#   python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl || exit 1; (setsid nohup bash benchmarks/calls/2026-12-07-h100-callH1.sh > /tmp/callH1-driver.log 2>&1 < /dev/null &); sleep 2; bash benchmarks/detached.sh wait /tmp/callH1 400
set -u
LOG=/tmp/callH1 DEADLINE=${DEADLINE:-360}
source benchmarks/detached.sh
prepare_machine
F=(python3 benchmarks/fp8_gemm.py --models 8b --modes frozen --tokens 8192,32768 --compile off --recipes tensorwise --profile --budget-s 60)
stage product 100 "${F[@]}"
stage static 90 "${F[@]}" --quantize static
stage eager 90 "${F[@]}" --quantize eager
finish
