"""LoRA and QLoRA of an 8B-shape Llama through zerotune's own path (training.model.build_model
+ training.engine.build_engine, the DeepSpeed engine the loop uses), on random-token batches,
next to the HF Trainer peer (../shared/bench/peer_hf.py) on the same work.

Prints one line `RESULT {json}` per mode: steady-state tokens/s per GPU, MFU, peak GPU memory.

    python benchmarks/peft_bench.py                  # lora then qlora, each in its own process
    python benchmarks/peft_bench.py qlora --steps 10 --mbs 4 --seq 2048

The random-init model is written once to /tmp/rand_8b (the same folder peer_hf.py uses, so
running the peer first saves the ~1 minute it takes) and loaded from there, quantised for QLoRA.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

SIZES = {  # Llama-3 shapes, as peer_hf.py
    "tiny": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2, vocab_size=256, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=True),
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
PEAK = float(os.environ.get("PEAK_TFLOPS", "989")) * 1e12  # H100/H200 SXM dense bf16


def make_model(size: str, seq: int) -> Path:
    """A random-init Llama of this shape saved in bf16 (reused when already there)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig
    path = Path(f"/tmp/rand_{size}")
    if not (path / "config.json").is_file():
        cfg = LlamaConfig(**SIZES[size], max_position_embeddings=max(4096, seq), rope_theta=500000.0)
        with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
            m = AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16)
        m.save_pretrained(path)
        del m
    if not (path / "tokenizer_config.json").is_file():  # load_tokenizer needs one; any will do
        AutoTokenizer.from_pretrained(ROOT / "examples" / "stories260K").save_pretrained(path)
    return path


def recipe_for(mode: str, model_path: Path, a):
    from training.config import validate_recipe
    method = {"kind": mode, "lora": {"r": 16, "alpha": 32, "dropout": 0.05, "target_modules": "all-linear"}}
    if mode == "qlora":
        method["quant"] = {"bits": 4, "quant_type": "nf4", "double_quant": True, "compute_dtype": "bf16"}
    return validate_recipe({
        "name": f"bench-{mode}", "output_dir": "/tmp/peft_bench_runs",
        "model": {"path": str(model_path), "dtype": "bf16", "attn_implementation": "sdpa"},
        "method": method,
        "data": {"train": [{"path": str(ROOT / "examples/data/alpaca/alpaca_en_demo.json"), "format": "alpaca"}],
                 "max_len": a.seq},
        "train": {"max_steps": a.steps, "micro_batch_size": a.mbs, "lr": 1e-5, "warmup_steps": 0,
                  "optimizer": "paged_adamw_8bit" if mode == "qlora" else a.lora_optimizer,
                  "gradient_checkpointing": not a.no_gc},
        "distributed": {"zero": a.zero},
    }, source=f"bench {mode}")


def bench(mode: str, a) -> dict:
    import deepspeed
    import torch

    from launcher.ds_config import render
    from training.engine import build_engine
    from training.flops import flops_per_token
    from training.model import build_model, trainable_report
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("LOCAL_RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    deepspeed.init_distributed()
    path = make_model(a.size, a.seq)
    recipe = recipe_for(mode, path, a)
    ds_config = render(recipe, world_size=int(os.environ["WORLD_SIZE"]))
    torch.manual_seed(0)
    t0 = time.perf_counter()
    model = build_model(recipe, ds_config)
    engine = build_engine(model, ds_config, recipe.train, a.steps)
    load_s = time.perf_counter() - t0
    report = trainable_report(model, recipe)
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    gpu = torch.cuda.is_available()  # (CPU only for a smoke test of the code path: --size tiny)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for step in range(a.steps):
        ids = torch.randint(0, vocab, (a.mbs, a.seq), generator=g).to(engine.device)
        sync()
        t = time.perf_counter()
        loss = engine(input_ids=ids, labels=ids).loss
        engine.backward(loss)
        engine.step()
        sync()
        if step >= a.warmup:
            times.append(time.perf_counter() - t)
    step_s = sorted(times)[len(times) // 2]
    tok_s = a.mbs * a.seq / step_s
    cfg = json.loads((path / "config.json").read_text())
    return dict(project="zerotune", mode=mode, size=a.size, seq=a.seq, mbs=a.mbs, zero=a.zero, gc=not a.no_gc,
                optimizer=recipe.train.optimizer, trainable=report.split(": ", 1)[1], step_s=round(step_s, 4),
                tok_s_gpu=round(tok_s), mfu=round(tok_s * flops_per_token(cfg, a.seq) / PEAK, 4),
                load_s=round(load_s, 1), loss=round(float(loss), 3),
                peak_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2) if gpu else None,
                device=torch.cuda.get_device_name() if gpu else "cpu")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("mode", nargs="?", default="both", choices=["both", "lora", "qlora"])
    p.add_argument("--size", default="8b", choices=list(SIZES))
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--zero", type=int, default=0, choices=[0, 1, 2])
    p.add_argument("--lora-optimizer", default="adamw", choices=["adamw", "adamw_8bit"])
    p.add_argument("--no-gc", action="store_true")
    a = p.parse_args()
    if a.mode == "both":  # a fresh process per mode: nothing of the first run's memory stays
        rc = 0
        for mode in ("lora", "qlora"):
            rc |= subprocess.call([sys.executable, __file__, mode, *sys.argv[2 if len(sys.argv) > 1 and
                                                                           sys.argv[1] == "both" else 1:]])
        return rc
    print("RESULT " + json.dumps(bench(a.mode, a)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
