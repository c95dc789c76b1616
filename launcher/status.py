"""`zerotune status RUN_DIR`: where a run stands, from its files alone (works on a login node
while the job runs elsewhere): the Slurm job state if it was submitted, the last step, loss,
eval loss, tokens/s, ETA, and the newest complete checkpoint and its age.

It reads RUN_DIR/metrics.jsonl (written by training/monitoring/metrics.py on rank 0), the checkpoint
markers, RUN_DIR/FAILED, RUN_DIR/PREEMPTED and RUN_DIR/HEARTBEAT (training/run/heartbeat.py: a
run whose process is gone is "stopped" at once on its host, after STALE_AFTER_S elsewhere);
it never imports torch.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

from zerotune.core.layout import METRICS_FILE, RECIPE_FILE

HELP = "show a run's state: job, step, loss, speed, ETA, newest checkpoint"
DESCRIPTION = ("Show where a run stands, reading only files in RUN_DIR (safe on a login node while\n"
               "the job runs):\n\n"
               "  zerotune status runs/demo\n"
               "  zerotune status runs/demo --json     # the same as one JSON object")

TAIL_BYTES = 4 << 20  # the last records are enough; metrics.jsonl of a long run can be large


def add_arguments(p) -> None:
    p.add_argument("run_dir", help="the run folder (output_dir/name)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def read_records(path: Path, tail_bytes: int = TAIL_BYTES) -> list[dict]:
    """The JSON records at the end of metrics.jsonl (a torn last line is skipped)."""
    if not path.is_file():
        return []
    with open(path, "rb") as f:
        size = f.seek(0, 2)
        f.seek(max(0, size - tail_bytes))
        chunk = f.read().decode("utf-8", errors="replace")
    lines = chunk.splitlines()
    if size > tail_bytes:
        lines = lines[1:]  # the first line is cut
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            continue
    return out


def ago(seconds: float) -> str:
    from zerotune.training.monitoring.console import format_duration
    return format_duration(max(0.0, seconds)) + " ago"


def collect(run_dir: Path) -> dict:
    """Everything status shows, as plain data."""
    from zerotune.core.layout import complete_checkpoints, partial_checkpoints, step_of
    now = time.time()
    records = read_records(run_dir / METRICS_FILE)
    train = [r for r in records if "train/loss" in r]
    evals = [r for r in records if "eval/loss" in r and r.get("event") != "end"]
    starts = [r for r in records if r.get("event") == "start"]
    last = records[-1] if records else None
    s: dict = {"run_dir": str(run_dir), "name": None, "job": None, "state": None, "step": None,
               "total_steps": None, "loss": None, "eval_loss": None, "eval_step": None, "best_eval_loss": None,
               "tokens_per_sec": None, "mfu": None, "epoch": None, "eta_s": None, "updated_s_ago": None,
               "skipped_steps": None, "checkpoint": None, "checkpoint_age_s": None, "partial_checkpoints": 0,
               "failure": None, "heartbeat": None}
    recipe = run_dir / RECIPE_FILE
    if recipe.is_file():
        import yaml
        try:
            s["name"] = (yaml.safe_load(recipe.read_text()) or {}).get("name")
        except yaml.YAMLError:
            pass
    try:
        from zerotune.launcher.submit import slurm_job_state
        s["job"] = slurm_job_state(run_dir)
    except ImportError:
        pass
    if starts:
        s["total_steps"] = starts[-1].get("total_steps")
    if train:
        t = train[-1]
        s.update(step=t["step"], loss=t["train/loss"], tokens_per_sec=t.get("train/tokens_per_sec"),
                 mfu=t.get("train/mfu"), epoch=t.get("train/epoch"), total_steps=t.get("total_steps", s["total_steps"]))
        if t.get("eta_s") is not None:
            s["eta_s"] = max(0.0, t["eta_s"] - (now - t["time"]))
    if last:
        s["updated_s_ago"] = now - last["time"]
        s["step"] = max(s["step"] or 0, last.get("step") or 0)
        skipped = [r["train/skipped_steps"] for r in records if "train/skipped_steps" in r]
        s["skipped_steps"] = skipped[-1] if skipped else 0
    if evals:
        s.update(eval_loss=evals[-1]["eval/loss"], eval_step=evals[-1]["step"],
                 best_eval_loss=min(r["eval/loss"] for r in evals))
    done = complete_checkpoints(run_dir)
    if done:
        marker = done[-1] / "COMPLETE"
        s.update(checkpoint=str(done[-1].relative_to(run_dir)), checkpoint_step=step_of(done[-1]),
                 checkpoint_age_s=now - marker.stat().st_mtime)
    s["partial_checkpoints"] = len(partial_checkpoints(run_dir))

    s["state"] = state_of(run_dir, s, last, now)
    return s


def state_of(run_dir: Path, s: dict, last: dict | None, now: float) -> str:
    """The run's state, most specific first: RUN_DIR/FAILED, then rank 0's heartbeat (the newest
    attempt's own word, or its process found gone), then what metrics.jsonl and Slurm say."""
    from zerotune.core.layout import FAILED_FILE, PREEMPT_MARKER
    from zerotune.training.run import heartbeat
    failed, preempted = run_dir / FAILED_FILE, run_dir / PREEMPT_MARKER
    if failed.is_file():
        s["failure"] = failed.read_text().strip()
        s["eta_s"] = None
        return "failed: " + s["failure"].splitlines()[0].removeprefix("zerotune: ")
    beat = heartbeat.read(run_dir)
    if beat:
        told = from_heartbeat(beat, s, now)
        if told:
            return told
    if last and last.get("event") == "end":
        s["eta_s"] = None
        return "finished"
    if preempted.is_file():
        return f"preempted after step {json.loads(preempted.read_text()).get('step')}: saved, waiting for requeue"
    if last is None:
        return "not started (no metrics.jsonl yet)"
    if s["job"] and s["job"]["state"] not in ("RUNNING", "UNKNOWN", "COMPLETING"):
        return f"job {s['job']['state'].lower()} before the run finished"
    if s["updated_s_ago"] is not None and s["updated_s_ago"] > 600 and not s["job"]:
        return "no update for " + ago(s["updated_s_ago"]).removesuffix(" ago") + ": stopped or stuck?"
    return "running"


def from_heartbeat(beat: dict, s: dict, now: float) -> str | None:
    """What the heartbeat says, or None to let the other files decide (a finished run)."""
    from zerotune.core import runlock
    from zerotune.training.run import heartbeat
    step, sig = beat.get("step"), beat.get("signal") or "a signal"
    s["heartbeat"] = beat
    if beat.get("state") == heartbeat.RUNNING:
        why = runlock.gone(beat, now)
        if why is None:
            return "running"
        s["eta_s"] = None
        return f"stopped: {why} (last heartbeat {ago(now - beat.get('time', now))}, step {step})"
    if beat.get("state") in ("interrupted", "preempted"):
        s["eta_s"] = None
        if beat["state"] == "preempted" and s["job"]:
            return f"preempted by {sig} after step {step}: saved, waiting for requeue"
        return f"stopped by {sig} after step {step}: saved; run the same command to resume"
    return None


def render(s: dict) -> str:
    from zerotune.training.monitoring.console import format_duration
    rows = [("run", s["run_dir"] + (f" ({s['name']})" if s["name"] else ""))]
    j = s["job"]
    if j:
        extra = ", ".join(x for x in (
            f"on {j['nodes']}" if j.get("nodes") and j["nodes"] != "(null)" else "",
            f"{j['elapsed']} of {j['time_limit']}" if j.get("elapsed") and j.get("time_limit") else "",
            f"reason {j['reason']}" if j.get("reason") not in (None, "None") else "",
            f"{j['restarts']} restart(s)" if j.get("restarts") else "",
            f"exit code {j['exit_code']}" if j.get("exit_code") not in (None, "0:0") else "") if x)
        rows.append(("job", f"Slurm {j['job_id']}: {j['state']}" + (f" ({extra})" if extra else "")))
    rows.append(("state", s["state"]))
    if s["step"] is not None:
        total = s["total_steps"]
        pct = f" ({100 * s['step'] / total:.0f}%)" if total else ""
        epoch = f", epoch {s['epoch']:.2f}" if s["epoch"] is not None else ""
        rows.append(("step", f"{s['step']}/{total or '?'}{pct}{epoch}"))
    if s["loss"] is not None:
        rows.append(("loss", f"{s['loss']:.4f}"))
    if s["eval_loss"] is not None:
        rows.append(("eval loss", f"{s['eval_loss']:.4f} at step {s['eval_step']} (best {s['best_eval_loss']:.4f})"))
    if s["tokens_per_sec"] is not None:
        rows.append(("speed", f"{s['tokens_per_sec']:,.0f} tokens/s" +
                     (f", MFU {100 * s['mfu']:.1f}%" if s["mfu"] is not None else "")))
    if s["eta_s"] is not None and s["state"] == "running":
        rows.append(("ETA", f"{format_duration(s['eta_s'])} (finishes ~{time.strftime('%H:%M', time.localtime(time.time() + s['eta_s']))})"))
    if s["skipped_steps"]:
        rows.append(("skipped", f"{s['skipped_steps']} step(s) with a NaN/inf loss"))
    if s["checkpoint"]:
        rows.append(("checkpoint", f"{s['checkpoint']} ({format_duration(s['checkpoint_age_s'])} old)"))
    else:
        rows.append(("checkpoint", "none complete yet"))
    if s["partial_checkpoints"]:
        rows[-1] = (rows[-1][0], rows[-1][1] + f"; {s['partial_checkpoints']} incomplete (ignored by resume)")
    if s["updated_s_ago"] is not None:
        rows.append(("updated", ago(s["updated_s_ago"])))
    if s["failure"] and len(s["failure"].splitlines()) > 1:
        rows.append(("", "\n".join("  " + line for line in s["failure"].splitlines()[1:])))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" if k else v for k, v in rows)


def run(args) -> int:
    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: no such run folder")
    if not (run_dir / RECIPE_FILE).is_file() and not (run_dir / METRICS_FILE).is_file():
        raise FileNotFoundError(f"{run_dir}: not a zerotune run folder (no recipe.yaml or metrics.jsonl)")
    s = collect(run_dir)
    print(json.dumps(s, indent=1) if args.json else render(s))
    return 0
