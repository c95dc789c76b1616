#!/usr/bin/env bash
# What the device (H100/H200) calls ran, stage by stage, so every number in the notes can be
# reproduced:  bash benchmarks/device_call.sh setup demo full1b ...
# Needs: .whl/ from ../shared/device/wheels.sh, .bench/peer_hf.py (copy of ../shared/bench/peer_hf.py).
set -uo pipefail
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=9.0 TOKENIZERS_PARALLELISM=false
peer() { torchrun --nproc_per_node 1 .bench/peer_hf.py "$@" 2>&1 | grep RESULT | sed 's/^/peer /' | tee -a "$OUT/results.txt"; }
for stage in "$@"; do
  echo "=== $stage $(date +%T)" | tee -a "$OUT/results.txt"
  case $stage in
    setup)
      python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee -a "$OUT/results.txt" ;;
    demo)   # the demo recipe, bf16 on CUDA, no code change
      python -m zerotune.launcher.cli train recipes/demo.yaml --set model.dtype=bf16 --set "output_dir=$OUT/runs" --set logging.progress=false 2>&1 | grep -vi warn | tail -8
      python - "$OUT/runs/demo" <<'PY' | tee -a "$OUT/results.txt"
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
tr = [r for r in recs if "train/loss" in r]; ev = [r["eval/loss"] for r in recs if r.get("eval/loss") is not None]
tps = sorted(r["train/tokens_per_sec"] for r in tr[5:])
print(json.dumps({"demo_bf16": True, "steps": len(tr), "loss_first": tr[0]["train/loss"], "loss_last": tr[-1]["train/loss"],
                  "eval": ev, "median_tokens_per_s": tps[len(tps) // 2],
                  "peak_gib": max(r.get("train/gpu_mem_peak_gib", 0) for r in tr)}))
PY
      ;;
    full1b)  python benchmarks/measure_memory.py full-1b-zero3 | tee -a "$OUT/results.txt"
             peer full --size 1b --seq 2048 --mbs 8 ;;
    offload) python benchmarks/measure_memory.py full-1b-zero3-offload | tee -a "$OUT/results.txt"
             peer full --size 1b --seq 2048 --mbs 8 --offload ;;
    peft8b)  python benchmarks/measure_memory.py lora-8b qlora-8b | tee -a "$OUT/results.txt"
             peer lora --size 8b --seq 2048 --mbs 4
             peer qlora --size 8b --seq 2048 --mbs 4 ;;
    train1b)  # `zerotune train` end to end on a 1B-shape random-init Llama: packing, eval, checkpoints, resume, export
      python - <<'PY'
import torch
from transformers import AutoModelForCausalLM, LlamaConfig
cfg = LlamaConfig(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                  num_key_value_heads=8, vocab_size=32064, tie_word_embeddings=True, max_position_embeddings=4096)
with torch.device("cuda"):
    m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
m.save_pretrained("/tmp/llama-1b-random")
PY
      set1b=(--set model.path=/tmp/llama-1b-random --set model.tokenizer=examples/tokenizers/phi-3-mini --set model.dtype=bf16
             --set model.chat_template=null --set "output_dir=$OUT/runs" --set name=l1b --set data.max_len=2048
             --set data.packing=true --set train.micro_batch_size=8 --set train.grad_accum=1 --set train.lr=1e-4
             --set train.eval_every=10 --set train.eval_batches=4 --set checkpoint.every=10 --set logging.progress=false)
      python -m zerotune.launcher.cli train recipes/demo.yaml "${set1b[@]}" --set train.max_steps=20 2>&1 | grep -E "zerotune|step 1|step 2|saved|done|final|Error" | tail -12 | tee -a "$OUT/results.txt"
      python -m zerotune.launcher.cli train recipes/demo.yaml "${set1b[@]}" --set train.max_steps=25 2>&1 | grep -E "zerotune|resumed|saved|done|final|Error" | tail -8 | tee -a "$OUT/results.txt"
      du -sh "$OUT"/runs/l1b/checkpoints/step-000020 | tee -a "$OUT/results.txt"
      python - "$OUT/runs/l1b" <<'PY' | tee -a "$OUT/results.txt"
import json, sys
recs = [json.loads(l) for l in open(sys.argv[1] + "/metrics.jsonl")]
tr = [r for r in recs if "train/loss" in r]
tps = sorted(r["train/tokens_per_sec"] for r in tr[3:])
print(json.dumps({"train1b": True, "steps": [r["step"] for r in tr][-6:], "loss_first": tr[0]["train/loss"],
                  "loss_last": tr[-1]["train/loss"], "median_tokens_per_s": tps[len(tps) // 2],
                  "mfu": sorted(r.get("train/mfu", 0) for r in tr[3:])[len(tps) // 2],
                  "peak_gib": max(r.get("train/gpu_mem_peak_gib", 0) for r in tr),
                  "events": [r for r in recs if r.get("event") in ("checkpoint", "start")][-4:]}))
PY
      rm -rf "$OUT"/runs/l1b/checkpoints "$OUT"/runs/l1b/final ;;
    packing) python benchmarks/packing_attention.py --device cuda --dtype bf16 --hidden 2048 --layers 8 --heads 16 --max-len 4096 --samples 512 --mbs 1 | tee -a "$OUT/results.txt" ;;
    gputests) python -m pytest -m gpu -q -x tests 2>&1 | tail -15 | tee -a "$OUT/results.txt" ;;
  esac
done
