"""Checkpoints that survive crashes, preemption and a change of GPU count.

    RUN_DIR/checkpoints/step-000500/
        zero_pp_rank_*_model_states.pt, *_optim_states.pt   DeepSpeed shards (every rank writes its own;
                                                             frozen base weights excluded for PEFT)
        rng-rank{r}.safetensors                             python / numpy / torch CPU+CUDA RNG of rank r
        zerotune_state.json                                 loop state, sampler state of every rank,
                                                             world size, eval loss, recipe hash
        COMPLETE                                            written last, after a barrier, atomically

A checkpoint without COMPLETE is ignored (with a warning) and removed when its step is saved
again; older complete checkpoints are deleted only after a newer one is complete.
Loading never unpickles arbitrary objects: DeepSpeed's files are read with
`torch.load(weights_only=True)` plus an allow-list of DeepSpeed's own plain types.
"""
from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from zerotune.core.errors import UserError
from zerotune.core.io import atomic_write
from zerotune.core.layout import (MARKER, STATE_FILE, checkpoints_dir, complete_checkpoints, latest_complete,
                                  partial_checkpoints, read_state, step_of, tag)

__all__ = ["save", "load", "resolve_resume", "needs_universal", "latest_complete", "complete_checkpoints"]


class CheckpointError(UserError, RuntimeError):
    """A checkpoint that cannot be used (missing, incomplete, from another run)."""


# ----------------------------------------------------------------------------- RNG
def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    np_state = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    meta = {"python": json.dumps(random.getstate()),
            "numpy": json.dumps([np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])])}
    return tensors, meta


def _set_rng_state(path: Path) -> None:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(path))
    version, internal, gauss = json.loads(meta["python"])
    random.setstate((version, tuple(internal), gauss))
    name, pos, has_gauss, cached = json.loads(meta["numpy"])
    np.random.set_state((name, tensors["numpy_keys"].numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(tensors["torch_cpu"])
    if "torch_cuda" in tensors and torch.cuda.is_available():
        torch.cuda.set_rng_state(tensors["torch_cuda"])


# ----------------------------------------------------------------------------- safe loading
def deepspeed_safe_types() -> list:
    """The only classes a DeepSpeed checkpoint file may hold besides tensors and builtins: the
    allow-list for torch.load(weights_only=True), here and in export."""
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.runtime.fp16.loss_scaler import LossScaler, DynamicLossScaler
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def _safe_deepspeed_loads(engine) -> None:
    """Make DeepSpeed read its checkpoint files with torch.load(weights_only=True)."""
    allowed = deepspeed_safe_types()
    ce = engine.checkpoint_engine

    def load(path, map_location=None):
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)
    ce.load = load


# ----------------------------------------------------------------------------- save
def save(engine, run_dir: Path, step: int, state: dict, sampler_state: dict, *, keep: int,
         rank: int, world: int, eval_loss: float | None, recipe_digest: str, frozen_params: bool) -> Path:
    """Every rank calls. Returns the checkpoint folder, complete when this returns."""
    root = checkpoints_dir(run_dir)
    path = root / tag(step)
    if rank == 0:
        if path.exists():  # a partial save of this step from a crashed run, or a stale one
            shutil.rmtree(path)
        root.mkdir(parents=True, exist_ok=True)
    samplers = [None] * world
    dist.all_gather_object(samplers, sampler_state)
    dist.barrier()
    write_shards(engine, path, step=step, rank=rank, frozen_params=frozen_params)
    dist.barrier()  # every rank has written its shards
    if rank == 0:
        atomic_write(path / STATE_FILE, json.dumps({
            "step": step, "loop": state, "sampler": samplers, "world_size": world,
            "eval_loss": eval_loss, "recipe_digest": recipe_digest}, indent=1))
        write_marker(path, step=step)
        prune(run_dir, keep)
    dist.barrier()
    return path


def write_shards(engine, path: Path, *, step: int, rank: int, frozen_params: bool) -> None:
    """This rank's DeepSpeed shards and RNG state into `path` (= checkpoints/step-N)."""
    engine.save_checkpoint(str(path.parent), tag=path.name, save_latest=False, exclude_frozen_parameters=frozen_params)
    tensors, meta = _rng_state()
    save_file(tensors, str(path / f"rng-rank{rank}.safetensors"), metadata=meta)


def write_marker(path: Path, *, step: int) -> None:
    """COMPLETE, written last and atomically: from now on the checkpoint counts."""
    atomic_write(path / MARKER, json.dumps({"step": step}) + "\n")


def prune(run_dir: Path, keep: int) -> list[Path]:
    """Keep the newest `keep` complete checkpoints and the best by eval loss; delete the rest
    (older complete ones and partial ones older than the newest complete)."""
    complete = complete_checkpoints(run_dir)
    if not complete:
        return []
    keepers = set(complete[-keep:])
    scored = [(read_state(p).get("eval_loss"), p) for p in complete]
    scored = [(l, p) for l, p in scored if l is not None]
    if scored:
        keepers.add(min(scored, key=lambda lp: (lp[0], -step_of(lp[1])))[1])
    newest = step_of(complete[-1])
    doomed = [p for p in complete if p not in keepers] + [p for p in partial_checkpoints(run_dir) if step_of(p) < newest]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


# ----------------------------------------------------------------------------- resume
def resolve_resume(run_dir: Path, resume: str) -> Path | None:
    """The checkpoint to resume from: `auto` -> newest complete (warning about partial ones),
    `never` -> None, else a path that must be a complete checkpoint."""
    if resume == "never":
        return None
    if resume == "auto":
        found = latest_complete(run_dir)
        newer_partial = [p for p in partial_checkpoints(run_dir) if found is None or step_of(p) > step_of(found)]
        if newer_partial:
            print(f"zerotune: warning: ignoring incomplete checkpoint(s) {', '.join(p.name for p in newer_partial)} "
                  f"(a save was interrupted); resuming from {found.name if found else 'scratch'}", file=sys.stderr)
        return found
    p = Path(resume)
    if not (p / MARKER).is_file():
        raise CheckpointError(f"checkpoint.resume: {resume!r} is not a complete checkpoint (no {MARKER} file)")
    return p


def needs_universal(ckpt: Path, world: int) -> bool:
    return read_state(ckpt)["world_size"] != world


def to_universal(ckpt: Path, rank: int) -> Path:
    """Convert a ZeRO checkpoint to DeepSpeed's universal format (world-size independent).
    Rank 0 converts once into `<ckpt>/universal/`; the other ranks wait."""
    out_root = ckpt / "universal"
    done = out_root / MARKER
    if rank == 0 and not done.is_file():
        shutil.rmtree(out_root, ignore_errors=True)
        out_root.mkdir()
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder", str(ckpt),
               "--output_folder", str(out_root / ckpt.name), "--num_extract_workers", "1", "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CheckpointError(f"converting {ckpt} for a new world size failed:\n{proc.stderr[-2000:]}")
        shutil.copy(ckpt / STATE_FILE, out_root / ckpt.name / STATE_FILE)
        atomic_write(done, "{}\n")
    dist.barrier()
    return out_root / ckpt.name


def load(engine, ckpt: Path, rank: int, world: int, frozen_params: bool) -> dict:
    """Restore model, optimizer, LR scheduler and RNG; return the saved zerotune state with
    `sampler` already translated for this rank (and this world size)."""
    _safe_deepspeed_loads(engine)
    state = read_state(ckpt)
    saved_world = state["world_size"]
    ckpt_to_load = to_universal(ckpt, rank) if saved_world != world else ckpt
    engine.load_checkpoint(str(ckpt_to_load.parent), tag=ckpt_to_load.name,
                           load_module_strict=not frozen_params)
    rng = ckpt / f"rng-rank{rank}.safetensors"
    if saved_world == world and rng.is_file():
        _set_rng_state(rng)
    samplers = state["sampler"]
    if saved_world == world:
        state["sampler"] = samplers[rank]
    else:
        # All ranks consume in lockstep: continue after the same number of samples of the epoch.
        consumed_global = samplers[0]["consumed"] * saved_world
        state["sampler"] = {"epoch": samplers[0]["epoch"], "consumed": consumed_global // world}
    return state
