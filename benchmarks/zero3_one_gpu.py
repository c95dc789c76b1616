"""Issue 29 part A: the truth run's settings on ONE GPU, through `zerotune train`, to find what
ZeRO-3 and the background saves cost when there is nobody to talk to:

    python benchmarks/zero3_one_gpu.py --size 1b --steps 18 --every 6 --work /tmp/z3   # one GPU (~15 min)
    python benchmarks/zero3_one_gpu.py --size tiny --steps 12 --every 4 --mbs 2 --seq 128 --work /tmp/z3  # CPU smoke

Three runs of a random Llama (benchmarks/bench_setup.py SIZES), full fine-tune, packing, mbs x seq:
  z3-saves  distributed.zero: 3 forced, a checkpoint every --every steps (checkpoint.async_save as
            the recipe default has it: on)
  z3        the same without periodic saves
  z0        distributed.zero: 0, without periodic saves
  (--profile: z3-profile, the z3-saves run with logging.profile_start at a save step, two steps:
   RUN_DIR/profile/ holds the save step and the plain step after it)

Every step's time (metrics.jsonl time/step_s, time/fwd_bwd_s, time/optimizer_s, time/other_s) and every
checkpoint event (blocked_s: the seconds the training thread spent in the save; the writing itself is
in the background) go to --out as rows, then the two checks of issue 29:

  {"check": "save_blocking", "gpus": 1, "fraction": F}   blocked seconds of each periodic save / seconds
      between it and the save before (the first: since `every` steps before it, the run's first step
      counted as its median step: the warm-up is not time between saves), the worst save, the
      first included (it pays the one-time costs: host buffers, the writer thread); "fraction_later": the
      median of the saves after the first. The run's last save is left out. A save due while the
      previous one was still being written waits for it, training going on, so saves may come less
      often than --every ("steps_between" says). Also "fraction_vs_nosave", the worst over the saves:
      (seconds between saves - steps between x the z3 run's median step) / seconds between saves: what
      the save costs the steps around it too (the background copy)
  {"check": "zero3_vs_zero0", "gpus": 1, "ratio": R}     tokens/s of z3 / tokens/s of z0 (medians after
      --warmup steps)
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_results import parse_metrics, train_records  # noqa: E402
from bench_setup import REPO, TOKENIZER, child_env, make_model, make_package, model_dir, random_words_file  # noqa: E402


def recipe(a, name: str, data: Path, zero: int, every: int | None, profile_at: int | None = None) -> Path:
    import yaml
    r = {"name": name, "output_dir": str(a.work / "runs"),
         "model": {"path": str(model_dir(a.work / "models", a.size)), "tokenizer": str(REPO / TOKENIZER),
                   "dtype": "fp32" if a.size == "tiny" else "bf16", "chat_template": None},
         "method": {"kind": "full"},
         "data": {"train": [{"path": str(data), "format": "text"}], "max_len": a.seq, "packing": True,
                  "eval_split": 0.0},
         "train": {"max_steps": a.steps, "micro_batch_size": a.mbs, "grad_accum": 1, "lr": 1e-5,
                   "warmup_steps": 0, "scheduler": "constant", "gradient_checkpointing": True},
         "distributed": {"zero": zero},
         "logging": {"progress": False, **({"profile_start": profile_at, "profile_steps": 2} if profile_at else {})},
         # no periodic save: `every` None; the run's end saves once (after the timed steps)
         "checkpoint": {"every": every, "keep": 1, "save_final": False}}   # keep 1: a 1B full checkpoint is ~17 GB
    path = a.work / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def train(a, path: Path) -> dict:
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "zerotune.launcher.cli", "train", str(path), "--nproc", "1"],
                       capture_output=True, text=True, env=a.env)
    return {"rc": p.returncode, "seconds": round(time.time() - t0, 1),
            **({"tail": (p.stdout + p.stderr)[-2000:]} if p.returncode else {})}


SAVE_PARTS = ("wait_s", "shards_s", "snapshot_s", "staged_gib")   # where a save's blocked_s went (training/checkpoint/async_save.py parts)


def events(metrics: Path) -> tuple[list[dict], list[dict]]:
    """(train records, one per step; checkpoint events) of RUN_DIR/metrics.jsonl."""
    recs, _ = train_records(metrics)
    ckpts = [json.loads(ln) for ln in metrics.read_text().splitlines() if '"event": "checkpoint"' in ln]
    return recs, ckpts


def step_rows(name: str, recs: list[dict], ckpts: list[dict]) -> dict:
    keys = ("time/step_s", "time/data_wait_s", "time/fwd_bwd_s", "time/optimizer_s", "time/other_s")
    return {"check": "zero3_one_gpu_steps", "run": name,
            "steps": [{"step": r["step"], "time": r["time"], "tok_s": r.get("train/tokens_per_sec"),
                       **{k.split("/")[1]: r.get(k) for k in keys}} for r in recs],
            "checkpoints": [{"step": c["step"], "time": c["time"], "blocked_s": c.get("blocked_s"),
                             **{k: c.get(k) for k in SAVE_PARTS},
                             "background": c.get("background"), "due_step": c.get("due_step")} for c in ckpts]}


def save_blocking(recs: list[dict], ckpts: list[dict], every: int, plain_step_s: float | None) -> dict:
    """Each periodic save (not the run's end): its blocked seconds over the seconds since the
    previous save (the first: since the end of the step `every` steps before it, the run's first
    step counted as the run's median step: its warm-up, seconds on a cold machine, is not time
    between saves). A save that waited for the previous one's write (due_step:
    training/run/saves.py periodic_save) is taken later than every x steps: the time between
    counts from the save before it all the same."""
    at = {r["step"]: r["time"] for r in recs}
    warmup = 0.0   # the first step's seconds beyond the median step
    if recs and recs[0].get("time/step_s") is not None:   # the first save counts from the start of step 1
        at.setdefault(recs[0]["step"] - 1, recs[0]["time"] - recs[0]["time/step_s"])
        warmup = max(0.0, recs[0]["time/step_s"] - statistics.median(r["time/step_s"] for r in recs))
    periodic = sorted((c for c in ckpts if c["step"] in at and c["step"] < max(at)), key=lambda c: c["step"])
    per = []
    for i, c in enumerate(periodic):
        prev_step = periodic[i - 1]["step"] if i else c["step"] - every
        prev = periodic[i - 1]["time"] if i else at.get(prev_step)
        if prev is None:
            continue
        between = c["time"] - prev - (warmup if prev_step < recs[0]["step"] else 0.0)
        per.append({"step": c["step"], "due_step": c.get("due_step"), "blocked_s": c["blocked_s"],
                    **{k: c.get(k) for k in SAVE_PARTS},
                    "between_s": round(between, 4), "steps_between": c["step"] - prev_step,
                    "fraction": round(c["blocked_s"] / between, 4),
                    **({"fraction_vs_nosave": round((between - (c["step"] - prev_step) * plain_step_s) / between, 4)}
                       if plain_step_s else {})})
    later = per[1:] or per   # the first save pays one-time costs (host buffers, the writer thread)
    row = {"check": "save_blocking", "gpus": 1, "every": every, "saves": per,
           "fraction": max(p["fraction"] for p in per) if per else None,   # the worst save, the first included
           "fraction_later": round(statistics.median(p["fraction"] for p in later), 4) if later else None}
    if plain_step_s and per:
        row["fraction_vs_nosave"] = max(p["fraction_vs_nosave"] for p in per)
    return row


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="1b")
    p.add_argument("--steps", type=int, default=18)
    p.add_argument("--every", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--profile", action="store_true", help="also a profiled z3-saves run (a save step and the next)")
    p.add_argument("--runs", default="z3-saves,z3,z0",
                   help="which runs, of z3-saves, z3, z0 and z3-profile (the checks need the first three)")
    p.add_argument("--work", type=Path, default=Path("/tmp/zero3-one-gpu"))
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def main() -> int:
    a = parse_args()
    a.work = a.work.resolve()
    device = "cpu" if a.size == "tiny" else os.environ.get("ZT_DEVICE", "gpu")
    out = a.out or REPO / "benchmarks" / "results" / f"{date.today()}-zero3-one-gpu-{device}.jsonl"
    a.env = child_env(make_package(a.work / "pkg"), {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "4")})
    if not (model_dir(a.work / "models", a.size) / ".done").is_file():
        make_model(a.size, model_dir(a.work / "models", a.size))
    data = random_words_file(a.work / "data", a.mbs * (a.steps + 2) + 8, a.seq)

    def record(rec: dict) -> None:
        rec = {"check": rec.pop("check"), "size": a.size, "device": device, "mbs": a.mbs, "seq": a.seq, **rec}
        line = json.dumps(rec)
        print(line if len(line) < 400 else line[:400] + " ...", flush=True)
        with open(out, "a") as f:
            f.write(line + "\n")

    plan = {"z3-saves": (3, a.every, None), "z3": (3, None, None), "z0": (0, None, None),
            "z3-profile": (3, a.every, a.every)}
    got = {}
    for name in a.runs.split(",") + (["z3-profile"] if a.profile else []):
        zero, every, profile_at = plan[name]
        r = train(a, recipe(a, name, data, zero, every, profile_at))
        metrics = a.work / "runs" / name / "metrics.jsonl"
        if r["rc"] != 0 or not metrics.is_file():
            record({"check": "zero3_one_gpu_run", "run": name, **r})
            continue
        recs, ckpts = events(metrics)
        summary = metrics.parent / "profile" / "summary.txt"
        if summary.is_file():   # the profiled steps' time by category (the trace stays in RUN_DIR/profile)
            record({"check": "zero3_one_gpu_profile", "run": name, "summary": summary.read_text()})
        shutil.rmtree(metrics.parent / "checkpoints", ignore_errors=True)   # 17 GB each at 1B: four fill the disk
        got[name] = {"recs": recs, "ckpts": ckpts, "summary": parse_metrics(metrics, a.warmup)}
        record({"check": "zero3_one_gpu_run", "run": name, "zero": zero, "every": every, **r, **got[name]["summary"]})
        record(step_rows(name, recs, ckpts))
    if "z3-saves" in got:
        plain = got["z3"]["summary"]["step_s"] if "z3" in got else None
        record(save_blocking(got["z3-saves"]["recs"], got["z3-saves"]["ckpts"], a.every, plain))
    if "z3" in got and "z0" in got:
        z3, z0 = got["z3"]["summary"]["tok_s_gpu"], got["z0"]["summary"]["tok_s_gpu"]
        record({"check": "zero3_vs_zero0", "gpus": 1, "ratio": round(z3 / z0, 4) if z0 else None,
                "zero3_tok_s": z3, "zero0_tok_s": z0,
                "zero3_step_s": got["z3"]["summary"]["step_s"], "zero0_step_s": got["z0"]["summary"]["step_s"]})
    return 0


if __name__ == "__main__":
    sys.exit(main())
