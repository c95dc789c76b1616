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

Staged on the GPU: where the GPU has room for a second copy of this rank's GPU tensors beside
training's peak (`DeviceRoom`), the snapshot is a device-to-device copy (a 1B full fine-tune's
~17 GB in tens of milliseconds, against seconds over the bus, and the first save's page-locking
too). The writer thread then copies it to the pinned buffers on its own CUDA stream while
training goes on, and frees it before it writes. The training thread never waits for the bus.

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


def to_cpu(obj, pinned: "PinnedPool | None" = None, copy_cpu: bool = True):
    """A copy of a state dict whose tensors live in CPU memory and are not shared with training
    (tensors already on the CPU are copied too: the optimizer updates them in place; not with
    `copy_cpu` False, for a staged copy that is already private). With a `pinned` pool, GPU
    tensors are copied into its page-locked buffers without waiting on each copy; the caller
    waits once, after the last (Writer.snapshot, Writer.unstage)."""
    return _tree(obj, lambda t: pinned.copy(t) if pinned is not None and t.is_cuda
                 else t.detach().to("cpu", copy=copy_cpu or t.is_cuda))


def staged_copy(obj):
    """A private copy of a state dict where its tensors are (GPU tensors stay on their GPU)."""
    return _tree(obj, lambda t: t.detach().clone())


def cuda_bytes(obj) -> int:
    """Bytes of the state dict's GPU tensors."""
    sizes = []
    _tree(obj, lambda t: sizes.append(t.numel() * t.element_size() if t.is_cuda else 0))
    return sum(sizes)


def _tree(obj, fn):
    """The state dict with fn applied to each tensor (dicts, lists and tuples rebuilt)."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if isinstance(obj, dict):
        return type(obj)((k, _tree(v, fn)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)) and not hasattr(obj, "_fields"):
        return type(obj)(_tree(v, fn) for v in obj)
    return obj


class DeviceRoom:
    """Whether a staged copy of `need` bytes fits on this GPU beside training: training's peak
    so far (the loop resets the peak once the model is loaded), the copies already staged for
    this save, and a margin for the allocator's fragmentation (5% of the GPU, at least 2 GiB).
    Decided once per checkpoint file, at its first save, so that a staged copy's own bytes in
    the peak do not turn staging off at the next: every save of a run writes the same tensors."""

    MARGIN_FRACTION, MARGIN_MIN = 0.05, 2 * 2 ** 30

    def __init__(self):
        self.decided: dict[str, bool] = {}

    def fits(self, name: str, need: int, pending: int) -> bool:
        if name not in self.decided:
            free, total = torch.cuda.mem_get_info()
            ours = free + torch.cuda.memory_reserved()            # the GPU less other processes' memory
            margin = max(self.MARGIN_MIN, self.MARGIN_FRACTION * total)
            self.decided[name] = torch.cuda.max_memory_allocated() + pending + need + margin <= ours
        return self.decided[name]


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
        self.shards_s = 0.0                # seconds this save spent in save.py write_shards (set there)
        gpu = torch.cuda.is_available()
        self.pinned: dict[str, PinnedPool] | None = {} if gpu else None  # file name -> pool
        self.room = DeviceRoom() if gpu else None
        self.stream = torch.cuda.Stream() if gpu else None   # the writer's device-to-host copies
        self.staged = 0                    # bytes this save staged on the GPU (freed by the writer)
        threading.Thread(target=self._run, name="zerotune-checkpoint-writer", daemon=True).start()

    def snapshot(self, state_dict, path: str) -> None:
        t0 = time.perf_counter()
        name = os.path.basename(path)
        pool = self.pinned.setdefault(name, PinnedPool()) if self.pinned is not None else None
        need = cuda_bytes(state_dict) if pool is not None else 0
        if need and self.room.fits(name, need, pending=self.staged):
            staged = [staged_copy(state_dict)]   # a device copy; the writer offloads it (below)
            ready = torch.cuda.Event()
            ready.record()
            self.staged += need
            job = lambda: self.write_file(self.unstage(staged, ready, pool), path)
        else:
            if pool is not None:
                pool.next = 0
            copy = to_cpu(state_dict, pool)
            if pool is not None and pool.next:
                torch.cuda.current_stream().synchronize()   # the copies are in host memory: one wait per file
            job = lambda: self.write_file(copy, path)
        self.blocked += time.perf_counter() - t0
        self.jobs.put((job, None))

    def unstage(self, staged: list, ready, pool: "PinnedPool"):
        """In the writer thread: the staged device copy into the pinned buffers on the writer's
        own stream (after the copy that made it), then the device copy is freed. `staged` is a
        one-item list so that the device memory goes back here, not when the job is dropped."""
        device = staged.pop()
        # this thread's current GPU is 0 until set: the rank's own, or every rank would make a context on GPU 0
        with torch.cuda.device(self.stream.device), torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            pool.next = 0
            copy = to_cpu(device, pool, copy_cpu=False)
        self.stream.synchronize()   # the copies are done: only now may the allocator reuse `device`'s memory
        del device
        return copy

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
        self.waited, self.blocked, self.staged, self.shards_s = time.perf_counter() - t0, 0.0, 0, 0.0

    def parts(self) -> dict:
        """Where the last save's blocking time went, for its checkpoint event: waiting for the previous
        write; writing the shards (DeepSpeed's save_checkpoint: gathering its state, the snapshot of
        each file, and the RNG file); of that, the snapshot itself. The rest of blocked_s is save.py's
        folders and its collectives."""
        return {"wait_s": round(self.waited, 4), "shards_s": round(self.shards_s, 4), "snapshot_s": round(self.blocked, 4),
                **({"staged_gib": round(self.staged / 2 ** 30, 3)} if self.room is not None else {})}
