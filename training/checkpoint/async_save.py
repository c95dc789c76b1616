"""checkpoint.async_save: checkpoint saves that do not stall training.

A save has two halves. The snapshot: DeepSpeed gathers this rank's state (module, ZeRO
partitions, optimizer states) as it always does, and every tensor it hands to its checkpoint
engine is copied to CPU memory. Training waits only for that (a device-to-host copy, not a disk
write). The write: one background thread per rank writes the files from the copy, in order,
then what the save asked to run after them (training/checkpoint/save.py: this rank's `written-rank<r>`
file; on rank 0, once every rank's is there: zerotune_state.json, the manifest, COMPLETE last,
then pruning). A crash before COMPLETE leaves an incomplete checkpoint that resume skips, as a
synchronous save would.

A periodic save due while one is in flight on any rank waits for it without stopping training:
it is taken at the first step after the write (training/run/saves.py periodic_save; the step's
report tells every rank alike). A stop and the end of training wait for the save in flight
(`wait`). So at most one snapshot is held: a CPU copy of this rank's part of the checkpoint (the planner counts it as
host memory). On a GPU that copy is page-locked (`PinnedPool`: the copy runs at the bus's
speed, one wait per file instead of one per tensor) and kept for the next save. An error in the thread (a full disk) is raised in the training thread at the next
step (`raise_error`) or wait.

    writer = Writer(engine)                 # patches engine.checkpoint_engine.save
    engine.save_checkpoint(...)             # returns after the snapshot
    writer.then(fn)                         # fn runs in the thread after the files above
    writer.wait()                           # everything queued is on disk (or its error raised)
"""
from __future__ import annotations

import os
import queue
import threading
import time

import torch


def to_cpu(obj, pinned: "PinnedPool | None" = None):
    """A copy of a state dict whose tensors live in CPU memory and are not shared with training
    (tensors already on the CPU are copied too: the optimizer updates them in place). With a
    `pinned` pool, GPU tensors are copied into its page-locked buffers without waiting on each
    copy; the caller waits once, after the last (Writer.snapshot)."""
    if isinstance(obj, torch.Tensor):
        if pinned is not None and obj.is_cuda:
            return pinned.copy(obj)
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, to_cpu(v, pinned)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_cpu(v, pinned) for v in obj)
    return obj


class PinnedPool:
    """Page-locked host buffers for the GPU->CPU copy of one checkpoint file, kept from one save
    to the next (page-locking gigabytes takes seconds, and every save of a run writes the same
    tensors). A copy into pinned memory runs at the bus's full speed and is queued without a host
    sync; the snapshot waits once, for the last copy. The next save of the same file reuses the
    buffers: it starts after the writer has written the previous one (save.py waits for it)."""

    def __init__(self):
        self.buffers: list[torch.Tensor] = []
        self.next = 0
        self.pinning = True   # False once the host refused to page-lock more: plain copies from then on

    def copy(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        buf = self.buffers[self.next] if self.next < len(self.buffers) else None
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            if not self.pinning:
                return t.to("cpu", copy=True)
            try:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            except RuntimeError:   # no more page-locked memory: this and later copies are plain ones
                self.pinning = False
                return t.to("cpu", copy=True)
            self.buffers[self.next:self.next + 1] = [buf]
        self.next += 1
        return buf.copy_(t, non_blocking=True)


class Writer:
    """This rank's background checkpoint writer (module docstring)."""

    def __init__(self, engine):
        ce = engine.checkpoint_engine
        self.write_file = ce.save          # DeepSpeed's own torch.save, run in the thread
        ce.save = self.snapshot
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.blocked = 0.0                 # seconds the training thread spent snapshotting, this save
        self.waited = 0.0                  # seconds this save waited for the previous one's write (save.py)
        self.pinned: dict[str, PinnedPool] | None = {} if torch.cuda.is_available() else None  # file name -> pool
        threading.Thread(target=self._run, name="zerotune-checkpoint-writer", daemon=True).start()

    def snapshot(self, state_dict, path: str) -> None:
        t0 = time.perf_counter()
        pool = None
        if self.pinned is not None:
            pool = self.pinned.setdefault(os.path.basename(path), PinnedPool())
            pool.next = 0
        copy = to_cpu(state_dict, pool)
        if pool is not None and pool.next:
            torch.cuda.current_stream().synchronize()   # the copies are in host memory: one wait per file
        self.blocked += time.perf_counter() - t0
        self.jobs.put((lambda: self.write_file(copy, path), None))

    def then(self, fn, on_error=None) -> None:
        """Run fn after the files queued so far; if one of them failed, on_error(error) runs
        instead and returns the error to raise (a save cleans up and says what happened)."""
        self.jobs.put((fn, on_error))

    def _run(self) -> None:
        while True:
            fn, on_error = self.jobs.get()
            try:
                if self.error is None:
                    fn()
                elif on_error is not None:   # after a failure the rest of that save is skipped
                    self.error = on_error(self.error)
            except BaseException as e:     # raised in the training thread by raise_error / wait
                self.error = e
            finally:
                del fn, on_error
                self.jobs.task_done()

    def busy(self) -> bool:
        return self.jobs.unfinished_tasks > 0

    def raise_error(self) -> None:
        if self.error is not None:
            e, self.error = self.error, None
            raise e

    def wait(self) -> None:
        self.jobs.join()
        self.raise_error()

    def start_save(self) -> None:
        """A save begins (save.py): it waits for the write in flight, then counts its own snapshot."""
        t0 = time.perf_counter()
        self.wait()
        self.waited, self.blocked = time.perf_counter() - t0, 0.0

    def parts(self) -> dict:
        """Where the last save's blocking time went, for its checkpoint event: waiting for the previous
        write, and the device-to-host snapshot (the rest is DeepSpeed gathering its state)."""
        return {"wait_s": round(self.waited, 4), "snapshot_s": round(self.blocked, 4)}
