"""Issue 29 part B: what one optimizer step costs beyond the model, per world size, on CPU (gloo).

    python benchmarks/step_syncs.py --worlds 1,2,4 --zero 3,0 --work /tmp/syncs
    python benchmarks/step_syncs.py --out benchmarks/results/2026-12-06-cpu-step-syncs.jsonl

Runs `zerotune train --nproc N` on the tiny stories260K model (examples/) with
ZEROTUNE_TEST_COUNT_SYNCS set: training/run/sync_counter.py then counts, on every rank and for every
step, the collectives (kind, calls, bytes) and host syncs (.item(), .tolist(), .cpu(), bool(t),
float(t), int(t), ...; on a GPU also CUDA event waits), ours apart from ZeRO's (those issued
inside DeepSpeed's engine forward/backward/step), and the Python time outside those engine calls.

Steady state: the steps after the first and before the last (the last carries the run's end)
of rank 0; every steady step must count the same. One row per (world, zero) goes to --out:

    {"check": "step_syncs", "world": N, "zero": Z, "host_syncs": S, "collectives": C,
     "collectives_by_kind": {...}, "collective_bytes": B, "sync_sites": {...}, "zero_collectives": ...,
     "zero_host_syncs": ..., "python_s": ..., "steps": [...]}

host_syncs and collectives are ours (what the loop adds to ZeRO's own); tests/test_step_syncs.py
runs this and holds: ours constant in the world size, at most one host sync per step.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO / "examples" / "stories260K"
ALPACA = REPO / "examples" / "data" / "alpaca" / "alpaca_en_demo.json"


def write_recipe(work: Path, name: str, zero: int, steps: int) -> Path:
    import yaml
    r = {"name": name, "output_dir": str(work / "runs"),
         "model": {"path": str(STORIES), "dtype": "fp32", "chat_template": "alpaca"},
         "method": {"kind": "full"},
         "data": {"train": [{"path": str(ALPACA), "format": "alpaca"}], "max_len": 64, "eval_split": 0.0},
         "train": {"max_steps": steps, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 0,
                   "gradient_checkpointing": False},
         "distributed": {"zero": zero},
         "checkpoint": {"every": None, "save_final": False},
         "logging": {"progress": False}}
    path = work / f"{name}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(r, sort_keys=False))
    return path


def run(work: Path, world: int, zero: int, steps: int) -> list[dict]:
    """`zerotune train` with the counting switched on; returns the per-step lines of every rank."""
    name = f"w{world}-z{zero}"
    counts = work / f"{name}.counts.jsonl"
    counts.unlink(missing_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false",
               ZEROTUNE_TEST_COUNT_SYNCS=str(counts))
    p = subprocess.run([sys.executable, "-m", "zerotune.launcher.cli", "train", str(write_recipe(work, name, zero, steps)),
                        "--nproc", str(world)], capture_output=True, text=True, env=env, cwd=REPO, timeout=900)
    if p.returncode != 0:
        raise RuntimeError(f"zerotune train --nproc {world} (ZeRO-{zero}) exited {p.returncode}\n"
                           f"{p.stdout[-2000:]}\n{p.stderr[-4000:]}")
    return [json.loads(ln) for ln in counts.read_text().splitlines()]


def _calls(table: dict) -> int:
    return sum(c["calls"] for c in table.values())


def summarize(lines: list[dict], world: int, zero: int) -> dict:
    """Rank 0's steady steps (not the first, not the last) into one row; `steady` says whether
    every steady step of every rank counted the same collectives and syncs."""
    def key(ln):
        return (json.dumps(ln["ours"], sort_keys=True), json.dumps(ln["host_syncs"], sort_keys=True))
    steady = [ln for ln in lines if ln["step"] > 1 and not ln["last"]]
    last_step = max(ln["step"] for ln in lines)
    steady = [ln for ln in steady if ln["step"] < last_step]
    if not steady:
        raise RuntimeError(f"no steady steps in {len(lines)} counted lines: run more steps")
    mine = sorted((ln for ln in steady if ln["rank"] == 0), key=lambda ln: ln["step"])
    first = mine[0]
    return {"check": "step_syncs", "world": world, "zero": zero,
            "host_syncs": sum(first["host_syncs"].values()),
            "collectives": _calls(first["ours"]),
            "collectives_by_kind": first["ours"],
            "collective_bytes": sum(c["bytes"] for c in first["ours"].values()),
            "sync_sites": first["host_syncs"],
            "steady": len({key(ln) for ln in steady}) == 1,
            "zero_collectives": _calls(first["zero"]), "zero_collectives_by_kind": first["zero"],
            "zero_host_syncs": first["zero_host_syncs"], "zero_sync_sites": first.get("zero_sync_sites"),
            "python_s": round(statistics.median(ln["python_s"] for ln in mine), 4),
            "wall_s": round(statistics.median(ln["wall_s"] for ln in mine), 4),
            "steps": [ln["step"] for ln in mine]}


def measure(work: Path, worlds: list[int], zeros: list[int], steps: int = 5) -> list[dict]:
    return [summarize(run(work, w, z, steps), w, z) for z in zeros for w in worlds]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--worlds", default="1,2,4")
    ap.add_argument("--zero", default="3,0", help="ZeRO stages to run (comma-separated)")
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--work", type=Path, default=Path("/tmp/zerotune-step-syncs"))
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--label", default=None, help="added to every row (e.g. the code measured)")
    a = ap.parse_args()
    rows = measure(a.work, [int(w) for w in a.worlds.split(",")], [int(z) for z in a.zero.split(",")], a.steps)
    for r in rows:
        if a.label:
            r["code"] = a.label
        print(json.dumps({k: r[k] for k in ("world", "zero", "host_syncs", "collectives", "zero_collectives",
                                            "zero_host_syncs", "python_s", "steady")}), flush=True)
        if a.out:
            a.out.parent.mkdir(parents=True, exist_ok=True)
            with open(a.out, "a") as f:
                f.write(json.dumps(r) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
