"""Runs a job on this machine (torchrun or RUN_DIR/launch.sh) or submits it to Slurm; reads job state.

torchrun reports any failing worker as exit code 1, so the training's save-and-exit code
(REQUEUE_EXIT_CODE) is recovered from the RUN_DIR/PREEMPTED marker the training writes.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

from zerotune.core.layout import PREEMPT_MARKER, REQUEUE_EXIT_CODE
from zerotune.core.errors import UserError

JOB_ID_FILE = "slurm_job_id"


class SlurmError(UserError, RuntimeError):
    """sbatch / squeue / scontrol refused or are missing."""


def visible_gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def torchrun_argv(run_dir: Path, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "zerotune.training", str(run_dir)]


def _exit_code(run_dir: Path, rc: int, started: float) -> int:
    marker = Path(run_dir) / PREEMPT_MARKER
    if rc != 0 and marker.is_file() and marker.stat().st_mtime >= started - 1:
        return REQUEUE_EXIT_CODE
    return rc


def run_local(run_dir: Path, nproc: int) -> int:
    """torchrun on this machine; returns its exit code, or REQUEUE_EXIT_CODE after a save forced by a signal."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    started = time.time()
    return _exit_code(run_dir, subprocess.call(torchrun_argv(run_dir, nproc), env=env), started)


def run_script(script: Path) -> int:
    """Runs RUN_DIR/launch.sh (it maps the exit code itself)."""
    return subprocess.call(["bash", str(script)])


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
