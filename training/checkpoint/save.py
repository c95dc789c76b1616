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
again; older complete checkpoints are deleted only after a newer one is complete. A complete
checkpoint of the step being saved (a run resumed from an older one it named, training past it
again) is kept until its replacement is complete: the save writes aside, into step-N.new, then
swaps (step-N -> step-N.old, step-N.new -> step-N, step-N.old removed). Names with a suffix are
not checkpoints to resume or retention; rank 0 finishes a swap a crash cut short (finish_swaps:
at resume and before every save), so a crash at any point leaves a complete step-N. Resume
verifies the newest complete checkpoint against its manifest (training/checkpoint/manifest.py) and falls
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
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from zerotune.core.errors import CheckpointError
from zerotune.core.io import atomic_write, usual_mode
from zerotune.core.layout import MARKER, STATE_FILE, checkpoints_dir, complete_checkpoints, partial_checkpoints, read_state, step_of, tag

from zerotune.training.checkpoint import manifest
from zerotune.training.checkpoint.disk_space import as_said, full_disk_said

ASIDE, RETIRED = ".new", ".old"   # step-N.new: the replacement being written; step-N.old: the one it replaces


# ----------------------------------------------------------------------------- RNG
def _rng_state() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    np_state = np.random.get_state()
    tensors = {"torch_cpu": torch.get_rng_state(), "numpy_keys": torch.from_numpy(np_state[1].astype(np.int64))}
    if torch.cuda.is_available():
        tensors["torch_cuda"] = torch.cuda.get_rng_state()
    meta = {"python": json.dumps(random.getstate()),
            "numpy": json.dumps([np_state[0], int(np_state[2]), int(np_state[3]), float(np_state[4])])}
    return tensors, meta


# ----------------------------------------------------------------------------- save
def save(engine, run_dir: Path, step: int, state: dict, sampler_state: dict, *, keep: int, rank: int, world: int,
         eval_loss: float | None, recipe_digest: str, frozen_params: bool, writer=None) -> Path:
    """Every rank calls. Returns the checkpoint folder: complete when this returns, or, with a
    background `writer` (training/checkpoint/async_save.py, checkpoint.async_save), once the writer has
    written every rank's files (the training goes on meanwhile)."""
    root = checkpoints_dir(run_dir)
    final = root / tag(step)
    if writer is not None:
        writer.start_save()  # one save in flight at a time
    where = [None]
    if rank == 0:
        finish_swaps(run_dir)
        where = [str(final.with_name(final.name + ASIDE) if (final / MARKER).is_file() else final)]
    dist.broadcast_object_list(where, src=0)   # every rank writes where rank 0 looked
    path = Path(where[0])
    with full_disk_said(run_dir, path, engine):
        if rank == 0:
            if path.exists():  # a partial save of this step from a crashed run, or a stale one
                shutil.rmtree(path)
            root.mkdir(parents=True, exist_ok=True)
        samplers = [None] * world
        dist.all_gather_object(samplers, sampler_state)
        dist.barrier()
        with writer.shards() if writer is not None else contextlib.nullcontext():
            write_shards(engine, path, step=step, rank=rank, frozen_params=frozen_params)
        meta = {"step": step, "loop": dict(state), "sampler": samplers, "world_size": world,
                "eval_loss": eval_loss, "recipe_digest": recipe_digest}
        if writer is not None:
            writer.then(lambda: complete_later(run_dir, path, meta, keep, rank, world, engine),
                        on_error=lambda e: as_said(e, run_dir, path, engine))
            return final
        dist.barrier()  # every rank has written its shards
        if rank == 0:
            complete(path, meta)
            publish(path, final, step=step)
    if rank == 0:
        prune(run_dir, keep)
    dist.barrier()
    return final


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
        publish(path, path.with_name(tag(meta["step"])), step=meta["step"])
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


# ----------------------------------------------------------------------------- replacing a complete checkpoint
def publish(path: Path, final: Path, *, step: int) -> None:
    """Rank 0, `path` complete: a replacement written aside takes the place of `final`."""
    if path == final:
        return
    retired = final.with_name(final.name + RETIRED)
    shutil.rmtree(retired, ignore_errors=True)
    retire(final, step=step)
    promote(path, final, step=step)
    shutil.rmtree(retired, ignore_errors=True)


def retire(final: Path, *, step: int) -> None:
    """step-N -> step-N.old (from here until promote, step-N is missing: finish_swaps restores it)."""
    final.rename(final.with_name(final.name + RETIRED))


def promote(path: Path, final: Path, *, step: int) -> None:
    """step-N.new -> step-N."""
    path.rename(final)


def finish_swaps(run_dir: Path) -> list[Path]:
    """Rank 0, with no save in flight: a step-N that a crash left missing mid-swap comes back (its
    complete replacement, else the complete one it replaced); then every step-N.new / step-N.old
    left beside a complete step-N (or incomplete, with nothing to restore) is removed. Returns the
    checkpoints put back."""
    root = checkpoints_dir(run_dir)
    if not root.is_dir():
        return []
    restored = []
    for suffix in (ASIDE, RETIRED):   # the replacement first: its save completed
        for p in sorted(root.glob(f"step-*{suffix}")):
            final = p.with_name(p.name[:-len(suffix)])
            if not final.exists() and (p / MARKER).is_file():
                p.rename(final)
                restored.append(final)
    for suffix in (ASIDE, RETIRED):
        for p in root.glob(f"step-*{suffix}"):
            shutil.rmtree(p, ignore_errors=True)
    return restored


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
