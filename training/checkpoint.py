"""Checkpoints that survive crashes, preemption and a change of GPU count.

    RUN_DIR/checkpoints/step-000500/
        zero_pp_rank_*_model_states.pt, *_optim_states.pt   DeepSpeed shards (every rank writes its own;
                                                             frozen base weights excluded for PEFT)
        rng-rank{r}.safetensors                             python / numpy / torch CPU+CUDA RNG of rank r
        zerotune_state.json                                 loop state, sampler state of every rank,
                                                             world size, eval loss, recipe hash
        MANIFEST.json                                       every file's size (crc32 of the small ones)
        COMPLETE                                            written last, after a barrier, atomically

A checkpoint without COMPLETE is ignored (with a warning) and removed when its step is saved
again; older complete checkpoints are deleted only after a newer one is complete. Resume
verifies the newest complete checkpoint against its manifest (training/manifest.py) and falls
back to the next older one that verifies, saying which file failed and why; the damaged one
loses COMPLETE and gets DAMAGED (the reason). A full disk during a save is one line naming the
folder and the bytes needed; the partial folder is removed and never counts.
Loading never unpickles arbitrary objects: DeepSpeed's files are read with
`torch.load(weights_only=True)` plus an allow-list of DeepSpeed's own plain types.
"""
from __future__ import annotations

import contextlib
import json
import random
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file

from zerotune.core.errors import CheckpointError
from zerotune.core.io import atomic_write, usual_mode
from zerotune.core.layout import (DAMAGED_MARKER, MARKER, STATE_FILE, checkpoints_dir, complete_checkpoints,
                                  latest_complete, partial_checkpoints, read_state, step_of, tag)

from . import manifest
from .disk_space import as_said, full_disk_said

__all__ = ["save", "load", "resolve_resume", "needs_universal", "latest_complete", "complete_checkpoints"]


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


def safe_load(path, map_location=None, mmap: bool = False):
    """torch.load(weights_only=True), allowing only DeepSpeed's plain checkpoint types: how every
    checkpoint file is read (DeepSpeed's engine here, training/reshard.py's conversion)."""
    with torch.serialization.safe_globals(deepspeed_safe_types()):
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)


def _safe_deepspeed_loads(engine) -> None:
    """Make DeepSpeed read its checkpoint files with safe_load."""
    engine.checkpoint_engine.load = safe_load


# ----------------------------------------------------------------------------- save
def save(engine, run_dir: Path, step: int, state: dict, sampler_state: dict, *, keep: int, rank: int, world: int,
         eval_loss: float | None, recipe_digest: str, frozen_params: bool, writer=None) -> Path:
    """Every rank calls. Returns the checkpoint folder: complete when this returns, or, with a
    background `writer` (training/async_save.py, checkpoint.async_save), once the writer has
    written every rank's files (the training goes on meanwhile)."""
    root = checkpoints_dir(run_dir)
    path = root / tag(step)
    with full_disk_said(run_dir, path, engine):
        if writer is not None:
            writer.wait()  # one save in flight at a time
        if rank == 0:
            if path.exists():  # a partial save of this step from a crashed run, or a stale one
                shutil.rmtree(path)
            root.mkdir(parents=True, exist_ok=True)
        samplers = [None] * world
        dist.all_gather_object(samplers, sampler_state)
        dist.barrier()
        write_shards(engine, path, step=step, rank=rank, frozen_params=frozen_params)
        meta = {"step": step, "loop": dict(state), "sampler": samplers, "world_size": world,
                "eval_loss": eval_loss, "recipe_digest": recipe_digest}
        if writer is not None:
            writer.then(lambda: complete_later(run_dir, path, meta, keep, rank, world, engine),
                        on_error=lambda e: as_said(e, run_dir, path, engine))
            return path
        dist.barrier()  # every rank has written its shards
        if rank == 0:
            complete(path, meta)
    if rank == 0:
        prune(run_dir, keep)
    dist.barrier()
    return path


def complete(path: Path, meta: dict) -> None:
    """Rank 0, once every rank's shards are on disk: the loop state, the manifest, COMPLETE last."""
    atomic_write(path / STATE_FILE, json.dumps(meta, indent=1))
    manifest.write(path)
    write_marker(path, step=meta["step"])


def complete_later(run_dir: Path, path: Path, meta: dict, keep: int, rank: int, world: int, engine,
                   timeout: float = 3600.0) -> None:
    """The end of an asynchronous save, in the writer thread after this rank's files: say so on
    the file system; rank 0 waits there for every rank's (not on a collective: the training's
    collectives run meanwhile), then completes the checkpoint and prunes."""
    with full_disk_said(run_dir, path, engine):
        atomic_write(path / f"written-rank{rank}", "")
        if rank != 0:
            return
        flags = [path / f"written-rank{r}" for r in range(world)]
        deadline = time.monotonic() + timeout
        while not all(f.is_file() for f in flags):
            if time.monotonic() > deadline:
                missing = [r for r, f in enumerate(flags) if not f.is_file()]
                raise CheckpointError(f"{path}: rank(s) {missing} did not finish writing their shards in {timeout:.0f}s")
            time.sleep(0.2)
        for f in flags:
            f.unlink()
        complete(path, meta)
        prune(run_dir, keep)


def write_shards(engine, path: Path, *, step: int, rank: int, frozen_params: bool) -> None:
    """This rank's DeepSpeed shards and RNG state into `path` (= checkpoints/step-N)."""
    engine.save_checkpoint(str(path.parent), tag=path.name, save_latest=False, exclude_frozen_parameters=frozen_params)
    tensors, meta = _rng_state()
    save_file(tensors, str(path / f"rng-rank{rank}.safetensors"), metadata=meta)
    usual_mode(path / f"rng-rank{rank}.safetensors")   # safetensors writes 0600


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
def resolve_resume(run_dir: Path, resume: str, rank: int = 0) -> Path | None:
    """The checkpoint to resume from: `auto` -> the newest complete one that verifies against
    its manifest (warning about partial and damaged ones), `never` -> None, else a path that
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


def load(engine, ckpt: Path, rank: int, world: int, frozen_params: bool, replicas: int | None = None) -> dict:
    """Restore model, optimizer, LR scheduler and RNG; return the saved zerotune state with
    `sampler` already translated for this rank and this run's data-parallel `replicas` (the world
    size unless sequence parallelism groups ranks; it may differ from the checkpoint's)."""
    _safe_deepspeed_loads(engine)
    state = read_state(ckpt)
    saved_world = state["world_size"]
    from .export import weights_only_loads
    from .reshard import place_step_counts, to_universal   # converted once into <ckpt>/universal/, by all ranks
    ckpt_to_load = to_universal(ckpt, rank, world) if needs_universal(ckpt, world) else ckpt
    # a universal load reads its files with torch.load directly, not through the checkpoint engine
    safe = weights_only_loads() if ckpt_to_load != ckpt else contextlib.nullcontext()
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
    samplers, replicas = state["sampler"], replicas or world
    saved_replicas = int(samplers[0].get("world_size", saved_world))
    if saved_replicas == replicas:
        state["sampler"] = samplers[rank] if saved_world == world else dict(samplers[0])
    else:
        # All replicas consume in lockstep: continue after the same number of samples of the epoch.
        consumed_global = samplers[0]["consumed"] * saved_replicas
        state["sampler"] = {"epoch": samplers[0]["epoch"], "consumed": consumed_global // replicas}
    return state
