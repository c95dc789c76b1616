"""How long a checkpoint save stops training, with checkpoint.async_save on and off, measured
through `zerotune train` (RUN_DIR/metrics.jsonl: each checkpoint event's blocked_s, the time
the training thread spent in the save).

    python benchmarks/save_blocking.py --layers 12 --hidden 768 --steps 6 --nproc 1

A random Llama of the given shape (vocabulary of examples/stories260K's tokenizer) is written
to a temporary folder; both runs train it on the Alpaca demo data with a save every step.
Prints one JSON line per setting: parameters, checkpoint bytes, blocked seconds per save.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_setup import REPO as ROOT, random_llama  # noqa: E402


def run(work: Path, model: Path, async_save: bool, steps: int, nproc: int) -> dict:
    import yaml
    name = "async" if async_save else "sync"
    recipe = {"name": name, "output_dir": str(work / "runs"),
              "model": {"path": str(model), "dtype": "fp32", "chat_template": "alpaca"},
              "method": {"kind": "full"},
              "data": {"train": [{"path": str(ROOT / "examples/data/alpaca/alpaca_en_demo.json"), "format": "alpaca"}],
                       "max_len": 256},
              "train": {"max_steps": steps, "micro_batch_size": 2, "lr": 1e-4, "gradient_checkpointing": False},
              "distributed": {"zero": 3}, "logging": {"progress": False, "tensorboard": False},
              "checkpoint": {"every": 1, "keep": 2, "save_final": False, "async_save": async_save}}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(recipe))
    subprocess.run([sys.executable, "-m", "zerotune.launcher.cli", "train", str(path), "--nproc", str(nproc)],
                   check=True, capture_output=True, text=True)
    events = [json.loads(ln) for ln in (work / "runs" / name / "metrics.jsonl").read_text().splitlines()]
    blocked = [round(e["blocked_s"], 3) for e in events if e.get("event") == "checkpoint"]
    last = sorted((work / "runs" / name / "checkpoints").glob("step-*"))[-1]
    size = sum(f.stat().st_size for f in last.rglob("*") if f.is_file())
    return {"async_save": async_save, "blocked_s": blocked, "checkpoint_bytes": size}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--nproc", type=int, default=1)
    a = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        n = random_llama(work / "model", a.hidden, a.layers, a.hidden * 8 // 3, max_position_embeddings=512)
        for async_save in (False, True):
            print(json.dumps({"parameters": n, "nproc": a.nproc, **run(work, work / "model", async_save, a.steps, a.nproc)}),
                  flush=True)


if __name__ == "__main__":
    main()
