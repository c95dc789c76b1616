"""Issue 13 item 6, the multi-GPU truth run, in one command (one device call), everything through
`zerotune train` on a random Llama of benchmarks/bench_setup.py's SIZES:

    python benchmarks/truth_run.py --size 8b --gpus 2,4 --steps 12 --work /tmp/truth
    python benchmarks/truth_run.py --size tiny --gpus 1,2 --steps 6 --work /tmp/truth   # CPU smoke test

1. scaling: the same recipe (micro-batch per GPU fixed) on each GPU count: tokens/s per GPU
   (median after --warmup steps), peak GiB, and per-GPU efficiency against the smallest count.
2. resume on another count: the largest count's checkpoint (saved at --steps // 2) resumed on the
   smallest count and on the same count: the "loaded in" seconds the run prints, and the loss of
   each resumed step against the uninterrupted run's.
3. preemption drill: SIGUSR1 to `zerotune train` (its process group) mid-run on the largest
   count: it must exit 85 with a checkpoint; the same command resumes; losses against the
   uninterrupted run's.
4. export: RUN_DIR/final (streamed from the ranks at the end) against `zerotune export` of the
   same run's last checkpoint: every tensor equal.
One JSON line per check goes to --out (default benchmarks/results/<date>-truth-<device>.jsonl).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_results import last_step, parse_metrics, train_records  # noqa: E402
from bench_setup import REPO, TOKENIZER, child_env, make_model, make_package, model_dir, random_words_file  # noqa: E402


def recipe(a, name: str, data: Path, global_batch: int | None = None, **checkpoint) -> Path:
    import yaml
    r = {"name": name, "output_dir": str(a.work / "runs"),
         "model": {"path": str(model_dir(a.work / "models", a.size)), "tokenizer": str(REPO / TOKENIZER),
                   "dtype": "fp32" if a.size == "tiny" else "bf16", "chat_template": None},
         "method": {"kind": "full"},
         "data": {"train": [{"path": str(data), "format": "text"}], "max_len": a.seq, "packing": True, "eval_split": 0.0},
         "train": {"max_steps": a.steps, "micro_batch_size": a.mbs, "lr": 1e-5, "warmup_steps": 0,
                   "scheduler": "constant", "gradient_checkpointing": True,
                   **({"global_batch_size": global_batch} if global_batch else {"grad_accum": 1})},
         "distributed": {"zero": 3}, "logging": {"progress": False},
         "checkpoint": {"every": a.steps // 2, "keep": 3, **checkpoint}}
    path = a.work / "recipes" / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def train(a, path: Path, nproc: int, stop_at: int | None = None) -> dict:
    """`zerotune train`; with stop_at, SIGUSR1 to its process group once that step is logged."""
    cmd = [sys.executable, "-m", "zerotune.launcher.cli", "train", str(path), "--nproc", str(nproc)]
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=a.env,
                            start_new_session=True)
    if stop_at is not None:
        metrics = a.work / "runs" / path.stem / "metrics.jsonl"
        while proc.poll() is None and last_step(metrics) < stop_at:
            time.sleep(0.1)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGUSR1)
    out, _ = proc.communicate()
    loaded = re.search(r"loaded in ([0-9.]+)s", out)
    return {"rc": proc.returncode, "seconds": round(time.time() - t0, 1), "tail": out[-1500:],
            "loaded_s": float(loaded.group(1)) if loaded else None}


def drop_checkpoints(a, name: str) -> None:
    """A run's checkpoints once no later check reads them (an 8B one is ~130 GB)."""
    shutil.rmtree(a.work / "runs" / name / "checkpoints", ignore_errors=True)


def losses(metrics: Path) -> dict[int, float]:
    """step -> train loss (the last record of each step; none when the run wrote no metrics)."""
    return {r["step"]: r["train/loss"] for r in train_records(metrics)[0]} if metrics.is_file() else {}


def worst_rel(ref: dict[int, float], got: dict[int, float], steps) -> float | None:
    diffs = [abs(got[s] - ref[s]) / abs(ref[s]) for s in steps if s in got and s in ref]
    return max(diffs) if diffs else None


def same_tensors(x: Path, y: Path) -> dict:
    from safetensors.torch import load_file
    def load(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(str(f)))
        return out
    a, b = load(x), load(y)
    differ = [k for k in a if k not in b or not (a[k].shape == b[k].shape and bool((a[k] == b[k]).all()))]
    return {"tensors": len(a), "equal": not differ and a.keys() == b.keys(), "differ": differ[:5]}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="8b")
    p.add_argument("--gpus", default="2,4", help="GPU counts, smallest first")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--mbs", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--work", type=Path, default=Path("/tmp/truth"))
    p.add_argument("--out", type=Path, default=None)
    return p.parse_args()


def main() -> None:
    a = parse_args()
    a.work = a.work.resolve()
    counts = [int(g) for g in a.gpus.split(",")]
    small, large = counts[0], counts[-1]
    device = "cpu" if a.size == "tiny" else os.environ.get("ZT_DEVICE", "gpu")
    out = a.out or REPO / "benchmarks" / "results" / f"{date.today()}-truth-{device}.jsonl"
    # tiny steps take milliseconds: slowed (tests' fault switch) so the drill's signal lands mid-run
    slow = {"ZEROTUNE_TEST_STEP_SLEEP": "0.5"} if a.size == "tiny" else {}
    a.env = child_env(make_package(a.work / "pkg"), {"OMP_NUM_THREADS": "1", **slow})
    if not (model_dir(a.work / "models", a.size) / ".done").is_file():
        make_model(a.size, model_dir(a.work / "models", a.size))
    data = random_words_file(a.work / "data", a.mbs * large * (a.steps + 2) + 8, a.seq)

    def record(rec: dict) -> None:
        rec = {"check": rec.pop("check"), "size": a.size, "device": device, **rec}
        print(json.dumps(rec), flush=True)
        with open(out, "a") as f:
            f.write(json.dumps(rec) + "\n")

    base = {}
    for n in counts:                                     # 1. scaling (and the runs the others compare with)
        r = train(a, recipe(a, f"scale-{n}", data), n)
        metrics = a.work / "runs" / f"scale-{n}" / "metrics.jsonl"
        base[n] = losses(metrics) if r["rc"] == 0 else {}
        record({"check": "scaling", "gpus": n, "rc": r["rc"], "seconds": r["seconds"],
                **({"tail": r["tail"]} if r["rc"] else parse_metrics(metrics, a.warmup))})
        if n != large:
            drop_checkpoints(a, f"scale-{n}")
    ckpt = a.work / "runs" / f"scale-{large}" / "checkpoints" / f"step-{a.steps // 2:06d}"
    for n in dict.fromkeys([small, large]):              # 2. resume the largest count's checkpoint
        path = recipe(a, f"resume-{large}-on-{n}", data, global_batch=a.mbs * large, resume=str(ckpt))
        r = train(a, path, n)
        got = losses(a.work / "runs" / path.stem / "metrics.jsonl")
        drop_checkpoints(a, path.stem)
        record({"check": "resume", "saved_on": large, "resumed_on": n, "rc": r["rc"], "loaded_s": r["loaded_s"],
                "worst_rel_loss_diff": worst_rel(base[large], got, range(a.steps // 2 + 1, a.steps + 1)),
                **({"tail": r["tail"]} if r["rc"] else {})})
    path = recipe(a, "drill", data)                      # 3. preemption drill
    first = train(a, path, large, stop_at=a.steps // 2 + 1)
    second = train(a, path, large)
    got = losses(a.work / "runs" / "drill" / "metrics.jsonl")
    drop_checkpoints(a, "drill")
    record({"check": "preemption", "gpus": large, "first_rc": first["rc"], "stopped_with_85": first["rc"] == 85,
            "second_rc": second["rc"],
            "resumed": "resumed from" in second["tail"] or second["loaded_s"] is not None,
            "worst_rel_loss_diff": worst_rel(base[large], got, range(1, a.steps + 1)),
            **({"tail": second["tail"]} if second["rc"] else {})})
    run = a.work / "runs" / f"scale-{large}"            # 4. streamed final export vs the offline export
    exported = a.work / "exported"
    proc = subprocess.run([sys.executable, "-m", "zerotune.launcher.cli", "export", str(run), "--out", str(exported),
                           "--force"], capture_output=True, text=True, env=a.env)
    record({"check": "export", "rc": proc.returncode, **(same_tensors(run / "final", exported) if proc.returncode == 0
                                                        else {"tail": proc.stderr[-1500:]})})


if __name__ == "__main__":
    main()
