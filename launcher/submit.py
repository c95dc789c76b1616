"""Runs a job on this machine (torchrun, supervised by launcher/agent.py, or RUN_DIR/launch.sh) or
submits it to Slurm; reads job state.

The agent returns the training's own exit code (2, 3, 4, 85, 130); `_exit_code` still recovers
REQUEUE_EXIT_CODE from a fresh RUN_DIR/PREEMPTED marker when something in between reports 1.
"""
from __future__ import annotations

import os
import sys
import subprocess
import time
from pathlib import Path
from typing import Optional

from zerotune.core.layout import PREEMPT_MARKER, REQUEUE_EXIT_CODE
from zerotune.core.errors import UserError

JOB_ID_FILE = "slurm_job_id"
STOP_MARGIN_S = 60     # beyond the save itself: the step in flight and the final barriers
DEFAULT_GRACE_S = 300  # when the planner cannot estimate the save (e.g. a hub model not cached)


class SlurmError(UserError, RuntimeError):
    """sbatch / squeue / scontrol refused or are missing."""


def grace_seconds(recipe, gpus_per_node: int, nodes: int = 1) -> int:
    """How long a stop signal may take before SIGKILL: the planner's save-time estimate
    (core/checkpoint_cost.py: save_seconds) plus STOP_MARGIN_S."""
    from zerotune.core import memory
    from zerotune.core.checkpoint_cost import save_seconds
    try:
        w = memory.workload_of(recipe, max(1, gpus_per_node), nodes)
        st = memory.Strategy(recipe.method.kind, recipe.zero_stage(), recipe.distributed.offload_optimizer,
                             recipe.distributed.offload_params, recipe.train.gradient_checkpointing)
        return int(STOP_MARGIN_S + save_seconds(w, st))
    except Exception:  # the estimate is a convenience: never a reason not to run
        return DEFAULT_GRACE_S


def torchrun_args(run_dir: Path, nproc: int) -> list[str]:
    return ["--standalone", f"--nproc-per-node={nproc}", "--max-restarts=0", "-m", "zerotune.training", str(run_dir)]


def _exit_code(run_dir: Path, rc: int, started: float) -> int:
    marker = Path(run_dir) / PREEMPT_MARKER
    if rc == 1 and marker.is_file() and marker.stat().st_mtime >= started - 1:
        return REQUEUE_EXIT_CODE
    return rc


def run_local(run_dir: Path, nproc: int, grace: float = DEFAULT_GRACE_S) -> int:
    """torchrun on this machine, in this process, supervised (launcher/agent.py); returns the
    training's exit code: 0, or 130 after Ctrl-C, 85 after SIGTERM/SIGUSR1 (both saved first)."""
    from .agent import run_torchrun
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    started = time.time()
    return _exit_code(run_dir, run_torchrun(torchrun_args(run_dir, nproc), grace), started)


def run_script(script: Path) -> int:
    """Becomes RUN_DIR/launch.sh (exec): its signals and exit code are the command's own."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp("bash", ["bash", str(script)])


def sbatch(script: Path, extra: list[str] = ()) -> str:
    """`sbatch --parsable`; returns the job id."""
    try:
        proc = subprocess.run(["sbatch", "--parsable", *extra, str(script)], capture_output=True, text=True, timeout=120)
    except FileNotFoundError:
        raise SlurmError("sbatch not found: run this on a Slurm login node (or drop --submit)") from None
    if proc.returncode != 0:
        msg = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        raise SlurmError(f"sbatch {script} failed: {msg[-1] if msg else f'exit {proc.returncode}'}")
    return proc.stdout.strip().split(";")[0]


def save_job_id(run_dir: Path, job_id: str) -> None:
    (Path(run_dir) / JOB_ID_FILE).write_text(job_id + "\n")


def _run(argv: list[str]) -> Optional[str]:
    try:
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (FileNotFoundError, subprocess.TimeoutExpired):
        return None
    return proc.stdout if proc.returncode == 0 else None


def parse_scontrol(text: str) -> dict[str, str]:
    """`scontrol show job -o` output: Key=Value pairs separated by spaces."""
    out = {}
    for item in text.split():
        if "=" in item:
            k, v = item.split("=", 1)
            out[k] = v
    return out


def slurm_job_state(run_dir: Path) -> Optional[dict]:
    """The Slurm job of a run, from the id the launcher (or job script) saved in RUN_DIR.

    None when the run was never submitted. Otherwise a dict with job_id, state (PENDING,
    RUNNING, COMPLETED, FAILED, ..., or UNKNOWN when Slurm no longer knows the job or is not
    reachable), exit_code, reason, nodes, elapsed, time_limit, restarts.
    """
    path = Path(run_dir) / JOB_ID_FILE
    if not path.is_file():
        return None
    job_id = path.read_text().strip()
    state = {"job_id": job_id, "state": "UNKNOWN", "exit_code": None, "reason": None, "nodes": None,
             "elapsed": None, "time_limit": None, "restarts": None}
    text = _run(["scontrol", "show", "job", "-o", job_id])
    if text:
        f = parse_scontrol(text.splitlines()[0])
        state.update(state=f.get("JobState", "UNKNOWN"), exit_code=f.get("ExitCode"), reason=f.get("Reason"),
                     nodes=f.get("NodeList"), elapsed=f.get("RunTime"), time_limit=f.get("TimeLimit"),
                     restarts=int(f["Restarts"]) if f.get("Restarts", "").isdigit() else None)
        return state
    text = _run(["squeue", "-h", "-j", job_id, "-o", "%T|%M|%l|%R"])
    if text and text.strip():
        st, elapsed, limit, reason = (text.strip().splitlines()[0].split("|") + [None] * 4)[:4]
        state.update(state=st, elapsed=elapsed, time_limit=limit, reason=reason)
    return state
