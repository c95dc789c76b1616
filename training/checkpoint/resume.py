"""Resume: which checkpoint (the newest complete one that verifies), and loading it into the
engine on this run's GPU count (a ZeRO checkpoint of another count is converted once by
reshard.py), with the RNG and the data position of every rank.
"""
from __future__ import annotations

import contextlib
import json
import random
import sys
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file

from zerotune.core.errors import CheckpointError
from zerotune.core.io import atomic_write
from zerotune.core.layout import (DAMAGED_MARKER, MARKER, checkpoints_dir, complete_checkpoints, partial_checkpoints,
                                  read_state, step_of)

from zerotune.training.checkpoint import manifest
from zerotune.training.checkpoint.reshard import place_step_counts, to_universal
from zerotune.training.checkpoint.safe_load import UNIVERSAL_LOAD, safe_loads_in, use_safe_loads
from zerotune.training.checkpoint.save import finish_swaps


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



def resolve_resume(run_dir: Path, resume: str, rank: int = 0) -> Path | None:
    """The checkpoint to resume from: `auto` -> the newest complete one that verifies against
    its manifest (warning about partial and damaged ones; step-N.new / .old folders, a replacement
    being written, are not checkpoints: save.finish_swaps), `never` -> None, else a path that
    must be a complete checkpoint that verifies. Rank 0 decides, warns and sets damaged
    checkpoints aside; every rank gets the same answer."""
    if resume == "never":
        return None
    decision = [None, None]  # [checkpoint path, error]
    if rank == 0:
        try:
            decision = [_choose(Path(run_dir), resume), None]
        except CheckpointError as e:
            decision = [None, str(e)]
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.broadcast_object_list(decision, src=0)
    if decision[1]:
        raise CheckpointError(decision[1])
    return Path(decision[0]) if decision[0] else None


def _warn(msg: str) -> None:
    print(f"zerotune: warning: {msg}", file=sys.stderr, flush=True)


def _choose(run_dir: Path, resume: str) -> str | None:
    for ckpt in finish_swaps(run_dir):   # a crash between the two renames of a save that replaced a checkpoint
        _warn(f"{ckpt.name} was being replaced when the run stopped: its complete copy is back in place")
    if resume != "auto":
        p = Path(resume)
        if not (p / MARKER).is_file():
            raise CheckpointError(f"checkpoint.resume: {resume!r} is not a complete checkpoint (no {MARKER} file)")
        problem = manifest.verify(p)
        if problem:
            raise CheckpointError(f"checkpoint.resume: {resume!r} is damaged: {problem}")
        return str(p)
    complete = complete_checkpoints(run_dir)
    newest = complete[-1] if complete else None
    newer_partial = [p for p in partial_checkpoints(run_dir) if (newest is None or step_of(p) > step_of(newest))
                     and not (p / DAMAGED_MARKER).is_file()]
    damaged = []
    for ckpt in reversed(complete):
        problem = manifest.verify(ckpt)
        if problem is None:
            break
        damaged.append((ckpt, problem))
    else:
        ckpt = None
    if damaged and ckpt is None:
        raise CheckpointError(f"no checkpoint in {checkpoints_dir(run_dir)} can be resumed: " +
                              "; ".join(f"{c.name}: {why}" for c, why in damaged) +
                              "; set checkpoint.resume: never with checkpoint.overwrite: true to start over")
    if newer_partial:
        _warn(f"ignoring incomplete checkpoint(s) {', '.join(p.name for p in newer_partial)} "
              f"(a save was interrupted); resuming from {ckpt.name if ckpt else 'scratch'}")
    for bad, why in damaged:
        _warn(f"checkpoint {bad.name} is damaged: {why}; resuming from {ckpt.name}")
        set_aside(bad, why)
    return str(ckpt) if ckpt else None


def set_aside(ckpt: Path, why: str) -> None:
    """A damaged checkpoint stops counting (DAMAGED says why; COMPLETE goes); its files stay for
    a look until its step is saved again or retention removes it."""
    atomic_write(ckpt / DAMAGED_MARKER, why + "\n")
    (ckpt / MARKER).unlink(missing_ok=True)


def needs_universal(ckpt: Path, world: int) -> bool:
    """Another world size's ZeRO 1-3 checkpoint (ZeRO-0's holds everything whole: it loads as it is)."""
    return read_state(ckpt)["world_size"] != world and any(Path(ckpt).glob("*_optim_states.pt"))


def load(engine, ckpt: Path, rank: int, world: int, frozen_params: bool) -> dict:
    """Restore model, optimizer, LR scheduler and RNG; return the saved zerotune state (its
    `sampler`: every saved rank's sampler state; ResumableSampler.resume turns it into this
    rank's data position on this run's replica count)."""
    use_safe_loads(engine)
    state = read_state(ckpt)
    saved_world = state["world_size"]
    ckpt_to_load = to_universal(ckpt, rank, world) if needs_universal(ckpt, world) else ckpt
    # a universal load reads its files with torch.load directly, not through the checkpoint engine
    safe = safe_loads_in(UNIVERSAL_LOAD) if ckpt_to_load != ckpt else contextlib.nullcontext()
    try:
        with safe:
            loaded, _ = engine.load_checkpoint(str(ckpt_to_load.parent), tag=ckpt_to_load.name,
                                               load_module_strict=not frozen_params)
    except (OSError, RuntimeError, KeyError, ValueError) as e:
        raise CheckpointError(f"cannot load {ckpt} ({type(e).__name__}: {(str(e).strip() or '-').splitlines()[0][:200]}); "
                              "resume from an older checkpoint with checkpoint.resume: <its path>") from e
    if loaded is None:  # DeepSpeed warns and returns None when it finds no files to load
        raise CheckpointError(f"cannot load {ckpt}: DeepSpeed found no checkpoint files in it; "
                              "resume from an older checkpoint with checkpoint.resume: <its path>")
    if ckpt_to_load != ckpt:
        place_step_counts(engine.optimizer)
    rng = ckpt / f"rng-rank{rank}.safetensors"
    if saved_world == world and rng.is_file():
        _set_rng_state(rng)
    return state
