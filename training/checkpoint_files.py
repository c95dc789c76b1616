"""Where checkpoints live and which are complete. No torch import: `zerotune status` and the
launcher read these on login nodes.

    RUN_DIR/checkpoints/step-000500/    DeepSpeed shards, zerotune_state.json, rng-rank*.safetensors
    RUN_DIR/checkpoints/step-000500/COMPLETE   written last, atomically: the checkpoint counts
    RUN_DIR/PREEMPTED                   written after a save forced by SIGUSR1/SIGTERM
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path

MARKER = "COMPLETE"
PREEMPT_MARKER = "PREEMPTED"
STATE_FILE = "zerotune_state.json"
_TAG = re.compile(r"^step-(\d{6,})$")


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


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


def atomic_write(path: Path, text: str) -> None:
    """Write-to-temp, fsync, rename, fsync the folder: the file is either old or new, never torn."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def check_fresh_start(run_dir: Path, resume: str, overwrite: bool) -> None:
    """`resume: never` must not silently replace a run that has checkpoints."""
    if resume == "never" and not overwrite and complete_checkpoints(run_dir):
        from .config import RecipeError
        raise RecipeError(
            f"checkpoint.resume: 'never' but {run_dir} already holds checkpoints "
            f"({', '.join(p.name for p in complete_checkpoints(run_dir))}); use resume: auto to continue it, "
            "another name for a new run, or checkpoint.overwrite: true to replace it")
