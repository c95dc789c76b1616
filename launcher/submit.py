"""Runs a job on this machine (torchrun) or submits it to Slurm; reads job state."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def visible_gpus() -> int:
    import torch
    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def torchrun_argv(run_dir: Path, nproc: int) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            "-m", "training", str(run_dir)]


def run_local(run_dir: Path, nproc: int) -> int:
    """torchrun on this machine; returns its exit code (the training's save-and-exit code passes through)."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    return subprocess.call(torchrun_argv(run_dir, nproc), env=env)
