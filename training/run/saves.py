"""Checkpoints the loop takes: every checkpoint.every steps (periodic_save), at the end, on a stop
signal or after too many NaN losses (save_checkpoint). The save itself (shards, manifest, the
COMPLETE marker, keeping the newest few) is training/checkpoint/save.py; `run` is loop.Run."""
from __future__ import annotations

import time

from zerotune.training.checkpoint import save as checkpoint
from zerotune.training.run.heartbeat import RUNNING


def periodic_save(run, step: int, writing: bool) -> None:
    """A save that checkpoint.every asks for. A background save still being written on some rank
    (the step's report says so, alike on every rank) does not stop training: this save waits, a
    step at a time, for the first step after the writing is done. Checkpoints then come as often
    as the disk writes them, and the first wait says so once. checkpoint.async_save: false saves
    on schedule, training waiting for each write."""
    if writing and run.writer is not None and step < run.total_steps:
        if run.save_due is None:
            run.save_due = step
            if not run.warned_save_wait:
                run.warned_save_wait = True
                run.log.warn(f"step {step}: the checkpoint due now waits until the previous one (step "
                             f"{run.last_saved}) is written, training goes on meanwhile: checkpoint.every "
                             f"{run.recipe.checkpoint.every} steps is shorter than a save's write; raise it, or set "
                             "checkpoint.async_save: false to save on schedule with training waiting for the disk")
        return
    due, run.save_due = run.save_due, None
    save_checkpoint(run, step, due=due)


def save_checkpoint(run, step: int, due: int | None = None) -> None:
    """Save step `step` (once: a stop or a bad loss right after a periodic save does not repeat it)."""
    if run.last_saved == step:
        return
    t0 = time.perf_counter()
    path = checkpoint.save(run.engine, run.run_dir, step, run.state, run.sampler.state_dict(),
                           keep=run.recipe.checkpoint.keep, rank=run.rank, world=run.world, eval_loss=run.last_eval,
                           recipe_digest=run.recipe.digest(), frozen_params=run.frozen, writer=run.writer)
    run.last_saved = step
    run.log.saved(step, path, time.perf_counter() - t0, background=run.writer is not None, due=due,
                  parts=run.writer.parts() if run.writer is not None else None)
    if run.beat:
        run.beat.write(RUNNING)  # status sees the step of the newest checkpoint without waiting for a beat
