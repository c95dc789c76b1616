"""Issue 13 item 1, step 1: a ZeRO-3 checkpoint of a 2-process `zerotune train` run of a random Llama.
usage: python benchmarks/reshard_checkpoint.py WORKDIR HIDDEN LAYERS INTER   (e.g. 512 12 1376: 38.5M parameters)
then: python benchmarks/reshard_time.py WORKDIR/runs/b/checkpoints/step-000002"""
import json, sys, time
from pathlib import Path
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import ALPACA, base_recipe, write_recipe, zerotune
from bench_setup import random_llama

work, hidden, layers, inter = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
work.mkdir(parents=True, exist_ok=True)
model = work / "model"
if not model.is_dir():
    print("params", random_llama(model, hidden, layers, inter, max_position_embeddings=256, bos_token_id=1, eos_token_id=2))
data = json.loads(ALPACA.read_text())
short = [r for r in data if len(r["instruction"]) + len(r["input"]) < 200][:16]
(work / "a.json").write_text(json.dumps(short))
r = write_recipe(work, base_recipe(work, name="b", model={"path": str(model), "dtype": "fp32", "chat_template": "alpaca"},
                 distributed={"zero": 3}, data={"train": [{"path": str(work / "a.json"), "format": "alpaca"}], "max_len": 64},
                 train={"max_steps": 2, "micro_batch_size": 1, "global_batch_size": 2, "lr": 1e-3, "warmup_steps": 0,
                        "gradient_checkpointing": False},
                 checkpoint={"every": 2, "keep": 3, "save_final": False}), "b.yaml")
run = work / "runs" / "b"
ckpt = run / "checkpoints" / "step-000002"
if not (ckpt / "COMPLETE").is_file():
    t = time.time(); zerotune("train", str(r), "--nproc", "2"); print(f"train 2 procs: {time.time()-t:.1f}s")
print("checkpoint bytes", sum(f.stat().st_size for f in ckpt.iterdir() if f.is_file()))
