"""The run-folder contract: every file name in RUN_DIR and every exit code, in one place, and
which checkpoints are complete. No torch import: `zerotune status` and the launcher read these
on login nodes.

    RUN_DIR/recipe.yaml                 the resolved recipe (RECIPE_FILE)
    RUN_DIR/ds_config.json              the filled DeepSpeed config (DS_CONFIG_FILE)
    RUN_DIR/plan.txt                    the planner's table for this run (PLAN_FILE)
    RUN_DIR/launch.sh, job.sbatch       torchrun / Slurm scripts (LAUNCH_SCRIPT, SBATCH_SCRIPT)
    RUN_DIR/metrics.jsonl               one JSON record per logged step and event (METRICS_FILE)
    RUN_DIR/tensorboard/                TensorBoard events (TENSORBOARD_DIR)
    RUN_DIR/checkpoints/step-000500/    DeepSpeed shards, zerotune_state.json, rng-rank*.safetensors
    RUN_DIR/checkpoints/step-000500/COMPLETE   written last, atomically: the checkpoint counts
    RUN_DIR/final/                      the Hugging Face model (or adapter) at the end (FINAL_DIR)
    RUN_DIR/checkpoints/step-000500/MANIFEST.json   every file's size (and crc32 of the small
                                        ones), written before COMPLETE; resume verifies it
    RUN_DIR/checkpoints/step-000500/DAMAGED   why resume skipped it (COMPLETE is then removed)
    RUN_DIR/PREEMPTED                   written after a save forced by SIGUSR1/SIGTERM
    RUN_DIR/FAILED                      why the run stopped (an error, OOM, bad loss), one line first
    RUN_DIR/HEARTBEAT                   rank 0's pid, host, step and state, every ~30 s (HEARTBEAT_FILE)
    RUN_DIR/LOCK                        the job that trains into RUN_DIR: host, pid, start, Slurm job
                                        id; flock-held while it runs (LOCK_FILE, core/runlock.py)
    RUN_DIR/logs/rank-<N>.log           rank N's lines from other packages, and the full traceback
                                        of an error raised on it (LOGS_DIR; core/quiet.py)
    RUN_DIR/logs/launcher.log           the same for the command and torchrun's agent (LAUNCHER_LOG)
    RUN_DIR/attempts.tsv                one line per requeueable Slurm attempt: job id, exit code,
                                        newest checkpoint, FAILED reason (ATTEMPTS_FILE)
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import RecipeError

RECIPE_FILE = "recipe.yaml"
DS_CONFIG_FILE = "ds_config.json"
PLAN_FILE = "plan.txt"
LAUNCH_SCRIPT = "launch.sh"
SBATCH_SCRIPT = "job.sbatch"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINTS_DIR = "checkpoints"
FINAL_DIR = "final"
FAILED_FILE = "FAILED"
PREEMPT_MARKER = "PREEMPTED"
MARKER = "COMPLETE"
STATE_FILE = "zerotune_state.json"
MANIFEST_FILE = "MANIFEST.json"
DAMAGED_MARKER = "DAMAGED"
HEARTBEAT_FILE = "HEARTBEAT"
LOCK_FILE = "LOCK"
LOGS_DIR = "logs"
LAUNCHER_LOG = "launcher.log"        # other packages' lines of the command (core/quiet.py); ranks: rank-<N>.log
ATTEMPTS_FILE = "attempts.tsv"
TRACKERS_FILE = "trackers.json"      # wandb / MLflow run ids, so a resume continues the same tracker run
MLRUNS_DIR = "mlruns"                # the default MLflow file store
EXPORT_MARKER = ".zerotune-export.json"  # in every export folder: whose export it is
CACHE_DIR_NAME = ".zerotune-cache"   # beside the run folders (RUN_DIR/..), unless data.cache_dir

# Exit codes of `python -m zerotune.training` (and so of torchrun, launch.sh and job.sbatch).
USER_ERROR_EXIT_CODE = 2     # a recipe, data or file problem, printed as one line
BAD_LOSS_EXIT_CODE = 3       # too many non-finite losses in a row (train.max_bad_steps)
OOM_EXIT_CODE = 4            # CUDA out of memory; FAILED holds the advice
REQUEUE_EXIT_CODE = 85       # saved because of SIGUSR1/SIGTERM: the Slurm script requeues the job
INTERRUPT_EXIT_CODE = 130    # saved because of SIGINT (Ctrl-C): not requeued
_TAG = re.compile(r"^step-(\d{6,})$")


def rank_log(run_dir: Path, rank: int) -> Path:
    return Path(run_dir) / LOGS_DIR / f"rank-{rank}.log"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / CHECKPOINTS_DIR


def tag(step: int) -> str:
    return f"step-{step:06d}"


def step_of(path: Path) -> int:
    return int(_TAG.match(Path(path).name).group(1))


def _all(run_dir: Path) -> list[Path]:
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted((p for p in d.iterdir() if p.is_dir() and _TAG.match(p.name)), key=step_of)


def complete_checkpoints(run_dir: Path) -> list[Path]:
    return [p for p in _all(run_dir) if (p / MARKER).is_file()]


def partial_checkpoints(run_dir: Path) -> list[Path]:
    return [p for p in _all(run_dir) if not (p / MARKER).is_file()]


def latest_complete(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def read_state(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / STATE_FILE).read_text())


def check_fresh_start(run_dir: Path, resume: str, overwrite: bool) -> None:
    """`resume: never` must not silently replace a run that has checkpoints."""
    if resume == "never" and not overwrite and complete_checkpoints(run_dir):
        raise RecipeError(
            f"checkpoint.resume: 'never' but {run_dir} already holds checkpoints "
            f"({', '.join(p.name for p in complete_checkpoints(run_dir))}); use resume: auto to continue it, "
            "another name for a new run, or checkpoint.overwrite: true to replace it")
