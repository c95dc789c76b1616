"""checkpoint.async_save: checkpoint saves that do not stall training.

A save has two halves. The snapshot: DeepSpeed gathers this rank's state (module, ZeRO
partitions, optimizer states) as it always does, and every tensor it hands to its checkpoint
engine is copied to CPU memory. Training waits only for that (a device-to-host copy, not a disk
write). The write: one background thread per rank writes the files from the copy, in order,
then what the save asked to run after them (training/checkpoint/save.py: this rank's `written-rank<r>`
file; on rank 0, once every rank's is there: zerotune_state.json, the manifest, COMPLETE last,
then pruning). A crash before COMPLETE leaves an incomplete checkpoint that resume skips, as a
synchronous save would.

The next save, a stop and the end of training wait for the save in flight (`wait`), so at most
one snapshot is held: a CPU copy of this rank's part of the checkpoint (the planner counts it as
host memory). An error in the thread (a full disk) is raised in the training thread at the next
step (`raise_error`) or wait.

    writer = Writer(engine)                 # patches engine.checkpoint_engine.save
    engine.save_checkpoint(...)             # returns after the snapshot
    writer.then(fn)                         # fn runs in the thread after the files above
    writer.wait()                           # everything queued is on disk (or its error raised)
"""
from __future__ import annotations

import queue
import threading
import time

import torch


def to_cpu(obj):
    """A copy of a state dict whose tensors live in CPU memory and are not shared with training
    (tensors already on the CPU are copied too: the optimizer updates them in place)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().to("cpu", copy=True)
    if isinstance(obj, dict):
        return type(obj)((k, to_cpu(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(to_cpu(v) for v in obj)
    return obj


class Writer:
    """This rank's background checkpoint writer (module docstring)."""

    def __init__(self, engine):
        ce = engine.checkpoint_engine
        self.write_file = ce.save          # DeepSpeed's own torch.save, run in the thread
        ce.save = self.snapshot
        self.jobs: queue.Queue = queue.Queue()
        self.error: BaseException | None = None
        self.blocked = 0.0                 # seconds the training thread spent snapshotting, last save
        threading.Thread(target=self._run, name="zerotune-checkpoint-writer", daemon=True).start()

    def snapshot(self, state_dict, path: str) -> None:
        t0 = time.perf_counter()
        copy = to_cpu(state_dict)
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
