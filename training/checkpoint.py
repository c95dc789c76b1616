"""Checkpoints: RUN_DIR/checkpoints/step-000500/ (DeepSpeed shards + our state), complete
only once COMPLETE exists; RUN_DIR/final/ in Hugging Face format.

    save(engine, run_dir, step, state)      # every rank calls
    path = latest_complete(run_dir)         # None when there is none
    state = load(engine, path)              # every rank calls
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
import torch.distributed as dist

MARKER = "COMPLETE"


def checkpoints_dir(run_dir: Path) -> Path:
    return Path(run_dir) / "checkpoints"


def tag(step: int) -> str:
    return f"step-{step:06d}"


def _atomic_write(path: Path, text: str) -> None:
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


def complete_checkpoints(run_dir: Path) -> list[Path]:
    d = checkpoints_dir(run_dir)
    if not d.is_dir():
        return []
    return sorted(p for p in d.glob("step-*") if (p / MARKER).is_file())


def latest_complete(run_dir: Path) -> Path | None:
    found = complete_checkpoints(run_dir)
    return found[-1] if found else None


def save(engine, run_dir: Path, step: int, state: dict, keep: int, rank: int) -> Path:
    """Every rank writes its shards; rank 0 writes the marker after a barrier, then prunes."""
    root = checkpoints_dir(run_dir)
    engine.save_checkpoint(str(root), tag=tag(step), save_latest=False)
    dist.barrier()
    path = root / tag(step)
    if rank == 0:
        _atomic_write(path / "zerotune_state.json", json.dumps(state, indent=1))
        _atomic_write(path / MARKER, json.dumps({"step": step}))
        for old in complete_checkpoints(run_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    dist.barrier()
    return path


def load(engine, path: Path) -> dict:
    """Restore engine (model, optimizer, scheduler) and return our loop/sampler state."""
    engine.load_checkpoint(str(path.parent), tag=path.name)
    return json.loads((path / "zerotune_state.json").read_text())


def export_final(engine, model, tokenizer, out: Path, rank: int) -> None:
    """Gather full weights (16-bit for ZeRO-3) and write a Hugging Face folder on rank 0."""
    if engine.zero_optimization_partition_weights():
        sd = engine._zero3_consolidated_16bit_state_dict()
    else:
        sd = {k: v.detach().cpu() for k, v in engine.module.state_dict().items()}
    if rank == 0:
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, state_dict=sd, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    dist.barrier()
