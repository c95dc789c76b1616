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
(`wait`). So at most one snapshot is held: a CPU copy of this rank's part of the checkpoint (the
planner counts it as host memory), kept for the next save (`HostPool`). An error in the thread (a
full disk) is raised in the training thread at the next step (`raise_error`) or wait.

Staged on the GPU: where the GPU has room for a second copy of this rank's GPU tensors beside
training's peak (`DeviceRoom`), the snapshot is a device-to-device copy (a 1B full fine-tune's
~17 GB in tens of milliseconds, against seconds over the bus). The writer thread then moves it to
host memory on its own CUDA stream while training goes on (`Bounce`: through two small page-locked
buffers into plain ones), and frees it before it writes. The training thread never waits for the
bus, and never for page-locking: page-locking gigabytes (cudaHostAlloc) holds the CUDA driver for
seconds, and every CUDA call of the process waits meanwhile (2026-12-07, one H100: a first save
that page-locked 13.8 GiB in the writer thread blocked training 2.65 s, and the step after it took
2.76 s against 0.22 s). Without room on the GPU the training thread copies over the bus itself,
into page-locked buffers (one wait per file; the first save page-locks them, later ones reuse them).

    writer = Writer(engine)                 # patches engine.checkpoint_engine.save
    engine.save_checkpoint(...)             # returns after the snapshot
    writer.then(fn)                         # fn runs in the thread after the files above
    writer.wait()                           # everything queued is on disk (or its error raised)
"""
from __future__ import annotations

import contextlib
import os
import queue
import threading
import time

import torch


def to_cpu(obj, pool: "HostPool | None" = None):
    """A copy of a state dict whose tensors live in CPU memory and are not shared with training
    (tensors already on the CPU are copied too: the optimizer updates them in place). With a
    `pool`, GPU tensors are copied into its kept buffers without waiting on each copy; the caller
    waits once, after the last (Writer.snapshot)."""
    return _tree(obj, lambda t: pool.buffer(t).copy_(t.detach(), non_blocking=True) if pool is not None and t.is_cuda
                 else t.detach().to("cpu", copy=True))


def staged_copy(obj):
    """A private, contiguous copy of a state dict where its tensors are (GPU tensors stay on their GPU)."""
    return _tree(obj, lambda t: t.detach().clone(memory_format=torch.contiguous_format))


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


class HostPool:
    """Host buffers for the copy of one checkpoint file, kept from one save to the next (every
    save of a run writes the same tensors: allocating and touching gigabytes again at each would
    cost seconds). Page-locked (`pinned`) for the training thread's own copies over the bus: they
    run at the bus's full speed and are queued without a host sync. Plain for the writer's
    (`Bounce`). The next save of the same file reuses the buffers: it starts after the writer has
    written the previous one (save.py waits for it)."""

    def __init__(self, pinned: bool):
        self.buffers: list[torch.Tensor] = []
        self.next = 0
        self.pinned = pinned   # False once the host refused to page-lock more: plain buffers from then on

    def buffer(self, t: torch.Tensor) -> torch.Tensor:
        """The next buffer, of t's shape and dtype (the one this file's last save used there, if it fits)."""
        buf = self.buffers[self.next] if self.next < len(self.buffers) else None
        if buf is None or buf.shape != t.shape or buf.dtype != t.dtype:
            try:
                buf = torch.empty(t.shape, dtype=t.dtype, pin_memory=self.pinned)
            except RuntimeError:   # no more page-locked memory
                self.pinned = False
                buf = torch.empty(t.shape, dtype=t.dtype)
            self.buffers[self.next:self.next + 1] = [buf]
        self.next += 1
        return buf


class Bounce:
    """GPU tensors to plain host buffers through two page-locked buffers of CHUNK bytes, in turn,
    on the current stream: the bus copies one chunk while this thread copies the one before it out
    of its page-locked buffer. Only these 2 x CHUNK are ever page-locked, once, when the Writer is
    made (before training: page-locking even these during a save held the training thread ~60 ms,
    call E), so a save never holds the driver (module docstring); the plain buffers' first touch is
    page faults, which hold nothing. The price is a host memcpy of each file, in the writer thread,
    while training goes on."""

    CHUNK = 64 * 2 ** 20

    def __init__(self):
        self.slots = [torch.empty(self.CHUNK, dtype=torch.uint8, pin_memory=True) for _ in range(2)]
        self.events = [torch.cuda.Event(), torch.cuda.Event()]

    def copy(self, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """dst <- src for each (src: contiguous, on the GPU; dst: contiguous, on the host) pair."""
        pending: list[tuple[int, torch.Tensor]] = []   # (slot, where its bytes go), oldest first
        i = 0
        for src, dst in pairs:
            s, d = _bytes(src), _bytes(dst)
            for off in range(0, s.numel(), self.CHUNK):
                if len(pending) == 2:
                    self._out(*pending.pop(0))         # the slot about to be reused, emptied first
                k, n = i % 2, min(self.CHUNK, s.numel() - off)
                self.slots[k][:n].copy_(s[off:off + n], non_blocking=True)
                self.events[k].record()
                pending.append((k, d[off:off + n]))
                i += 1
        for k, d in pending:
            self._out(k, d)

    def _out(self, k: int, d: torch.Tensor) -> None:
        self.events[k].synchronize()
        d.copy_(self.slots[k][:d.numel()])


def _bytes(t: torch.Tensor) -> torch.Tensor:
    """A contiguous tensor's memory as a flat uint8 tensor (a view)."""
    return t.reshape(-1).view(torch.uint8)


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
        self.shards_s = 0.0                # seconds this save spent writing its shards (`shards`)
        gpu = torch.cuda.is_available()
        self.pools: dict[str, HostPool] | None = {} if gpu else None  # file name -> its kept host buffers
        self.room = DeviceRoom() if gpu else None
        self.stream = torch.cuda.Stream() if gpu else None   # the writer's device-to-host copies
        self.bounce = Bounce() if gpu else None
        self.staged = 0                    # bytes this save staged on the GPU (freed by the writer)
        threading.Thread(target=self._run, name="zerotune-checkpoint-writer", daemon=True).start()

    def snapshot(self, state_dict, path: str) -> None:
        t0 = time.perf_counter()
        name = os.path.basename(path)
        need = cuda_bytes(state_dict) if self.pools is not None else 0
        if need and self.room.fits(name, need, pending=self.staged):
            staged = [staged_copy(state_dict)]   # a device copy; the writer offloads it (below)
            ready = torch.cuda.Event()
            ready.record()
            self.staged += need
            pool = self.pools.setdefault(name, HostPool(pinned=False))
            job = lambda: self.write_file(self.unstage(staged, ready, pool), path)
        else:
            pool = self.pools.setdefault(name, HostPool(pinned=True)) if self.pools is not None else None
            if pool is not None:
                pool.next = 0
            copy = to_cpu(state_dict, pool)
            if pool is not None and pool.next:
                torch.cuda.current_stream().synchronize()   # the copies are in host memory: one wait per file
            job = lambda: self.write_file(copy, path)
        self.blocked += time.perf_counter() - t0
        self.jobs.put((job, None))

    def unstage(self, staged: list, ready, pool: HostPool):
        """In the writer thread: the staged device copy into the pool's host buffers on the writer's
        own stream (after the copy that made it), then the device copy is freed. `staged` is a
        one-item list so that the device memory goes back here, not when the job is dropped."""
        device = staged.pop()
        pool.next = 0
        pairs = []

        def host(t: torch.Tensor) -> torch.Tensor:   # CPU tensors of the staged copy are private already
            if t.is_cuda:
                pairs.append((t, pool.buffer(t)))
                return pairs[-1][1]
            return t

        copy = _tree(device, host)
        # this thread's current GPU is 0 until set: the rank's own, or every rank would make a context on GPU 0
        with torch.cuda.device(self.stream.device), torch.cuda.stream(self.stream):
            self.stream.wait_event(ready)
            self.bounce.copy(pairs)
        self.stream.synchronize()   # the copies are done: only now may the allocator reuse `device`'s memory
        del device, pairs
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

    @contextlib.contextmanager
    def shards(self):
        """save.py writes this rank's shards inside: their seconds go to the save's `shards_s`."""
        t0 = time.perf_counter()
        yield
        self.shards_s = time.perf_counter() - t0

    def parts(self) -> dict:
        """Where the last save's blocking time went, for its checkpoint event: waiting for the previous
        write; writing the shards (DeepSpeed's save_checkpoint: gathering its state, the snapshot of
        each file, and the RNG file); of that, the snapshot itself. The rest of blocked_s is save.py's
        folders and its collectives."""
        return {"wait_s": round(self.waited, 4), "shards_s": round(self.shards_s, 4), "snapshot_s": round(self.blocked, 4),
                **({"staged_gib": round(self.staged / 2 ** 30, 3)} if self.room is not None else {})}
