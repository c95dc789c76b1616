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
  ZEROTUNE_TEST_CRASH="<point>:<step>[:<rank>]"     SIGKILL inside the save of <step>, at point
                                                    start (before the shards), shards (after this
                                                    rank's shards), marker (before COMPLETE) or
                                                    swap (a save that replaces a complete
                                                    checkpoint: between its two renames)
  ZEROTUNE_TEST_STEP_SLEEP="0.5"                    every optimizer step takes that many seconds
                                                    longer (a slow run, so a test's signal lands
                                                    mid-run)
  ZEROTUNE_TEST_ENOSPC="<step>[:<rank>]"            the save of <step> fails with OSError ENOSPC
                                                    after this rank's shards are written (a disk
                                                    that fills up mid-save)
  ZEROTUNE_TEST_SLOW_DISK="<seconds>[:<rank>]"      a background save's writing (checkpoint.async_save)
                                                    takes that many seconds longer on that rank (all
                                                    ranks if none): a disk slower than the saves
  ZEROTUNE_TEST_SAMPLES="<file>"                    every rank appends one JSON line per optimizer
                                                    step: {"attempt", "step", "rank", "samples"}
                                                    (the sample indices that step trained)
  ZEROTUNE_TEST_COUNT_SYNCS="<file>"                every rank appends one JSON line per step: the
                                                    collectives (kind, calls, bytes) and host syncs
                                                    (.item(), .tolist(), .cpu(), bool(t), ...) of
                                                    that step, ours apart from ZeRO's (those inside
                                                    DeepSpeed's engine forward/backward/step), and
                                                    the Python time outside them
                                                    (benchmarks/step_syncs.py reads it)

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

    def make(original):
        def write_shards(engine, path, *, step: int, **kwargs):
            out = original(engine, path, step=step, **kwargs)
            if step == at_step and (rank is None or _rank() == rank):
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
            if when == "before" and step == at_step:
                kill()
            out = original(*args, step=step, **kwargs)
            if when == "after" and step == at_step:
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


COLLECTIVES = ("all_reduce", "all_reduce_coalesced", "all_gather", "all_gather_into_tensor", "_all_gather_base",
               "all_gather_object", "reduce_scatter", "reduce_scatter_tensor", "_reduce_scatter_base", "broadcast",
               "broadcast_object_list", "reduce", "all_to_all", "all_to_all_single", "barrier", "gather", "scatter",
               "send", "recv", "isend", "irecv", "batch_isend_irecv")
HOST_SYNCS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__")


def _sent_bytes(kind: str, args: tuple, kwargs: dict) -> int:
    """Bytes this rank puts into a collective: its input tensor(s)."""
    import torch
    names = {"all_gather_into_tensor": "input_tensor", "_all_gather_base": "input_tensor",
             "reduce_scatter_tensor": "input", "_reduce_scatter_base": "input", "all_to_all_single": "input",
             "all_gather": "tensor"}
    if kind in names:
        x = kwargs.get(names[kind], args[1] if len(args) > 1 else None)
    else:
        x = next(iter(args), None) if args else next(iter(kwargs.values()), None)
    xs = x if isinstance(x, (list, tuple)) else [x]
    return sum(t.numel() * t.element_size() for t in xs if isinstance(t, torch.Tensor))


class _SyncCounter:
    """Per step (from one `step_counts` call of the loop to the next): collectives by kind (calls,
    bytes) and host syncs by call site, ours apart from ZeRO's (issued while DeepSpeed's engine
    forward/backward/step runs), and the wall time outside those engine calls. Installed before
    deepspeed.init_distributed, so DeepSpeed's comm layer captures the wrapped functions. On a
    CPU every .item() syncs nothing, so a call from zerotune/training/data/ (host batches, CPU
    tensors on a GPU run too) is not counted."""

    def __init__(self, path: str):
        self.path = path
        self.here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))   # .../training
        self.data_dir = os.path.join(self.here, "data") + os.sep
        self.engine, self.coll, self.engine_s, self.t0, self.step = 0, 0, 0.0, None, 0
        self.cur: dict = {}

    def install(self) -> None:
        import atexit
        import torch
        import torch.distributed as dist
        import torch.distributed.distributed_c10d as c10d
        from deepspeed.runtime.engine import DeepSpeedEngine
        from zerotune.training.run import step as steps
        for name in COLLECTIVES:
            for module in (dist, c10d):
                if hasattr(module, name):
                    self.wrap_collective(module, name)
        for name in HOST_SYNCS:
            self.wrap_sync(torch.Tensor, name)
        if torch.cuda.is_available():
            self.wrap_sync(torch.cuda.Event, "synchronize")
        for name in ("forward", "backward", "step"):
            self.wrap_engine(DeepSpeedEngine, name)

        def make(original):
            def step_counts(*args, **kwargs):   # the first thing of every step
                self.flush()
                self.cur.clear()
                self.cur.update(ours={}, zero={}, host_syncs={}, zero_host_syncs=0, zero_sync_sites={})
                self.step += 1
                self.t0, self.engine_s = time.perf_counter(), 0.0
                return original(*args, **kwargs)
            return step_counts
        _wrap(steps, "step_counts", make)
        atexit.register(lambda: self.flush(last=True))

    def flush(self, last: bool = False) -> None:
        import json
        if self.t0 is None:
            return
        wall, cur = time.perf_counter() - self.t0, self.cur
        line = {"rank": _rank(), "world": int(os.environ.get("WORLD_SIZE", "1")), "step": self.step, "last": last,
                "ours": cur["ours"], "zero": cur["zero"], "host_syncs": cur["host_syncs"],
                "zero_host_syncs": cur["zero_host_syncs"], "zero_sync_sites": cur["zero_sync_sites"],
                "wall_s": wall, "python_s": wall - self.engine_s}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")

    def wrap_collective(self, module, name: str) -> None:
        original = getattr(module, name)

        @functools.wraps(original)
        def collective(*args, **kwargs):
            if self.coll or not self.cur:   # one built of others (all_gather_object): counted once; set-up: not
                return original(*args, **kwargs)
            c = self.cur["zero" if self.engine else "ours"].setdefault(name, {"calls": 0, "bytes": 0})
            c["calls"] += 1
            c["bytes"] += _sent_bytes(name, args, kwargs)
            self.coll += 1
            try:
                return original(*args, **kwargs)
            finally:
                self.coll -= 1
        setattr(module, name, collective)

    def wrap_sync(self, cls, name: str) -> None:
        original = getattr(cls, name)

        def sync(tensor, *args, **kwargs):
            if not self.coll and self.cur:
                f = sys._getframe(1)
                file = f.f_code.co_filename
                if self.engine:
                    self.cur["zero_host_syncs"] += 1
                    site, table = f"{file.split('site-packages/')[-1]}:{f.f_lineno} {name}", "zero_sync_sites"
                elif not file.startswith(self.data_dir):
                    site, table = f"{os.path.relpath(file, os.path.dirname(self.here))}:{f.f_lineno} {name}", "host_syncs"
                else:
                    table = None
                if table:
                    self.cur[table][site] = self.cur[table].get(site, 0) + 1
            return original(tensor, *args, **kwargs)
        setattr(cls, name, sync)

    def wrap_engine(self, cls, name: str) -> None:
        original = getattr(cls, name)

        @functools.wraps(original)
        def method(engine, *args, **kwargs):
            outer, t0 = self.engine == 0, time.perf_counter()
            self.engine += 1
            try:
                return original(engine, *args, **kwargs)
            finally:
                self.engine -= 1
                if outer:
                    self.engine_s += time.perf_counter() - t0
        setattr(cls, name, method)


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
        _SyncCounter(env["ZEROTUNE_TEST_COUNT_SYNCS"]).install()
    if env.get("ZEROTUNE_TEST_CRASH"):
        parts = env["ZEROTUNE_TEST_CRASH"].split(":")
        _crash_in_save(parts[0], int(parts[1]), int(parts[2]) if len(parts) > 2 else None)
    return True
