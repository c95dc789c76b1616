"""Fault injection for tests: real signals, NaN losses, CUDA OOM errors and SIGKILLs at chosen
points, switched on by environment variables and installed ONCE at process start
(`python -m zerotune.training` calls `install_from_env()`). With none of the variables set
nothing is patched and production code runs untouched: no function in the training path reads
these variables.

  ZEROTUNE_TEST_SIGNAL="<step>:<rank>[:<SIGNAME>]"  after optimizer step <step>, <rank> gets a
                                                    real signal (default SIGUSR1)
  ZEROTUNE_TEST_NAN_STEPS="3" or "3,5-7"            those optimizer steps get a NaN loss (and so
                                                    NaN gradients, as a diverging run does)
  ZEROTUNE_TEST_OOM_STEP="3"                        step 3 raises torch.OutOfMemoryError before
                                                    its forward
  ZEROTUNE_TEST_CRASH="<point>:<step>[:<rank>]"     SIGKILL inside the save of <step> (or the first
                                                    after it: a save due while the previous one is
                                                    still written is taken a step later), at point
                                                    start (before the shards), shards (after this
                                                    rank's shards), marker (before COMPLETE) or
                                                    swap (a save that replaces a complete
                                                    checkpoint: between its two renames)
  ZEROTUNE_TEST_STEP_SLEEP="0.5"                    every optimizer step takes that many seconds
                                                    longer (a slow run, so a test's signal lands
                                                    mid-run)
  ZEROTUNE_TEST_ENOSPC="<step>[:<rank>]"            the save of <step> (or the first after) fails with ENOSPC
                                                    after this rank's shards are written (a disk
                                                    that fills up mid-save)
  ZEROTUNE_TEST_SLOW_DISK="<seconds>[:<rank>]"      a background save's writing (checkpoint.async_save)
                                                    takes that many seconds longer on that rank (all
                                                    ranks if none): a disk slower than the saves
  ZEROTUNE_TEST_SAMPLES="<file>"                    every rank appends one JSON line per optimizer
                                                    step: {"attempt", "step", "rank", "samples"}
                                                    (the sample indices that step trained)
  ZEROTUNE_TEST_COUNT_SYNCS="<file>"                every rank appends one JSON line per step: its
                                                    collectives and host syncs, ours apart from
                                                    ZeRO's (training/run/sync_counter.py)

Steps are counted as DeepSpeed counts them (engine.global_steps: optimizer steps taken,
skipped ones included, restored on resume), which equals the loop's step counter.
"""
from __future__ import annotations

import errno
import functools
import os
import signal
import sys
import time

VARS = ("ZEROTUNE_TEST_SIGNAL", "ZEROTUNE_TEST_NAN_STEPS", "ZEROTUNE_TEST_OOM_STEP", "ZEROTUNE_TEST_CRASH",
        "ZEROTUNE_TEST_STEP_SLEEP", "ZEROTUNE_TEST_ENOSPC", "ZEROTUNE_TEST_SLOW_DISK", "ZEROTUNE_TEST_SAMPLES",
        "ZEROTUNE_TEST_COUNT_SYNCS")


def parse_steps(spec: str) -> set[int]:
    """"3" or "3,5-7" -> {3, 5, 6, 7}."""
    steps = set()
    for part in spec.replace(" ", "").split(","):
        if "-" in part:
            a, b = part.split("-")
            steps.update(range(int(a), int(b) + 1))
        elif part:
            steps.add(int(part))
    return steps


def _rank() -> int:
    return int(os.environ.get("RANK", "0"))


def _wrap(module, name: str, make):
    original = getattr(module, name)
    setattr(module, name, functools.wraps(original)(make(original)))


def _nan_and_oom(nan_steps: set[int], oom_step: int | None) -> None:
    from zerotune.training.run import step as steps

    def make(original):
        def forward_backward(engine, micro, n_target, world):
            now = engine.global_steps + 1   # the step being taken
            if oom_step == now:
                import torch
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB "
                                             f"(injected by ZEROTUNE_TEST_OOM_STEP={oom_step})")
            if now in nan_steps:
                real_micro_loss = steps.micro_loss
                steps.micro_loss = lambda *a: real_micro_loss(*a) * float("nan")
                try:
                    return original(engine, micro, n_target, world)
                finally:
                    steps.micro_loss = real_micro_loss
            return original(engine, micro, n_target, world)
        return forward_backward
    _wrap(steps, "forward_backward", make)


def _signal_after(step: int, rank: int, signame: str) -> None:
    from zerotune.training.run import diagnostics

    def make(original):
        def optimizer_step(engine, skip):
            applied = original(engine, skip)
            if engine.global_steps == step and _rank() == rank:
                os.kill(os.getpid(), getattr(signal, signame))
            return applied
        return optimizer_step
    _wrap(diagnostics, "optimizer_step", make)


def _slow_steps(seconds: float) -> None:
    from zerotune.training.run import diagnostics

    def make(original):
        def optimizer_step(engine, skip):
            time.sleep(seconds)
            return original(engine, skip)
        return optimizer_step
    _wrap(diagnostics, "optimizer_step", make)


def _disk_full_in_save(at_step: int, rank: int | None) -> None:
    from zerotune.training.checkpoint import save as checkpoint

    fired = []

    def make(original):
        def write_shards(engine, path, *, step: int, **kwargs):
            out = original(engine, path, step=step, **kwargs)
            if step >= at_step and not fired and (rank is None or _rank() == rank):
                fired.append(step)
                raise OSError(errno.ENOSPC, "No space left on device (injected by ZEROTUNE_TEST_ENOSPC)", str(path))
            return out
        return write_shards
    _wrap(checkpoint, "write_shards", make)


def _slow_disk(seconds: float, rank: int | None) -> None:
    from zerotune.training.checkpoint import save as checkpoint

    def make(original):
        def complete_later(*args, **kwargs):   # in the writer thread, after this rank's files
            if rank is None or _rank() == rank:
                time.sleep(seconds)
            return original(*args, **kwargs)
        return complete_later
    _wrap(checkpoint, "complete_later", make)


def _crash_in_save(point: str, at_step: int, rank: int | None) -> None:
    """Wrap the checkpoint layer's save phases: SIGKILL before/after the chosen one."""
    from zerotune.training.checkpoint import save as checkpoint

    def kill():
        if rank is None or _rank() == rank:
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    phase, when = {"start": ("write_shards", "before"), "shards": ("write_shards", "after"),
                   "marker": ("write_marker", "before"), "swap": ("retire", "after")}[point]

    def make(original):
        def phase_fn(*args, step: int, **kwargs):   # the save phases take step= by keyword
            if when == "before" and step >= at_step:
                kill()
            out = original(*args, step=step, **kwargs)
            if when == "after" and step >= at_step:
                kill()
            return out
        return phase_fn
    _wrap(checkpoint, phase, make)


def _record_samples(path: str) -> None:
    """The sampler's indices, drawn since the last optimizer step, written when the step is taken
    (a step a stop vote abandons is not trained and not written)."""
    import json
    from zerotune.core.failure import ATTEMPT_ENV
    from zerotune.training.data import loader
    from zerotune.training.run import diagnostics
    drawn: list[int] = []

    def make_iter(original):
        def sampler_iter(self):
            for i in original(self):
                drawn.append(i)
                yield i
        return sampler_iter

    def make_step(original):
        def optimizer_step(engine, skip):
            applied = original(engine, skip)
            line = {"attempt": os.environ.get(ATTEMPT_ENV), "step": engine.global_steps, "rank": _rank(),
                    "samples": list(drawn)}
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")
            drawn.clear()
            return applied
        return optimizer_step
    _wrap(loader.ResumableSampler, "__iter__", make_iter)
    _wrap(diagnostics, "optimizer_step", make_step)


def install_from_env(env=os.environ) -> bool:
    """Patch in the faults the environment asks for; False (and nothing patched) when none."""
    if not any(env.get(v) for v in VARS):
        return False
    nan = parse_steps(env.get("ZEROTUNE_TEST_NAN_STEPS", ""))
    oom = int(env["ZEROTUNE_TEST_OOM_STEP"]) if env.get("ZEROTUNE_TEST_OOM_STEP") else None
    if nan or oom is not None:
        _nan_and_oom(nan, oom)
    if env.get("ZEROTUNE_TEST_SIGNAL"):
        parts = env["ZEROTUNE_TEST_SIGNAL"].split(":")
        _signal_after(int(parts[0]), int(parts[1]), parts[2] if len(parts) > 2 else "SIGUSR1")
    if env.get("ZEROTUNE_TEST_STEP_SLEEP"):
        _slow_steps(float(env["ZEROTUNE_TEST_STEP_SLEEP"]))
    if env.get("ZEROTUNE_TEST_ENOSPC"):
        parts = env["ZEROTUNE_TEST_ENOSPC"].split(":")
        _disk_full_in_save(int(parts[0]), int(parts[1]) if len(parts) > 1 else None)
    if env.get("ZEROTUNE_TEST_SLOW_DISK"):
        parts = env["ZEROTUNE_TEST_SLOW_DISK"].split(":")
        _slow_disk(float(parts[0]), int(parts[1]) if len(parts) > 1 else None)
    if env.get("ZEROTUNE_TEST_SAMPLES"):
        _record_samples(env["ZEROTUNE_TEST_SAMPLES"])
    if env.get("ZEROTUNE_TEST_COUNT_SYNCS"):
        from zerotune.training.run.sync_counter import SyncCounter
        SyncCounter(env["ZEROTUNE_TEST_COUNT_SYNCS"]).install()
    if env.get("ZEROTUNE_TEST_CRASH"):
        parts = env["ZEROTUNE_TEST_CRASH"].split(":")
        _crash_in_save(parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else None)
    return True
