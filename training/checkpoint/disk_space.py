"""A checkpoint save that fills the disk: recognised however it surfaced, said in one line (what a
checkpoint needs, what is free), and its partial files removed so the space comes back.

    with full_disk_said(run_dir, path, engine):   # around a save's writes
        ...
    writer.then(..., on_error=lambda e: as_said(e, run_dir, path, engine))   # a background save's
"""
from __future__ import annotations

import contextlib
import errno
import shutil
from pathlib import Path

from zerotune.core.errors import CheckpointError
from zerotune.core.layout import checkpoints_dir, latest_complete

from zerotune.core import failure
from zerotune.training.checkpoint import manifest


@contextlib.contextmanager
def full_disk_said(run_dir: Path, path: Path, engine):
    """Errors inside pass as they are, except a full disk: out_of_space()'s one line instead."""
    try:
        yield
    except Exception as e:
        err = as_said(e, run_dir, path, engine)
        if err is e:
            raise
        raise err from e


def as_said(e: BaseException, run_dir: Path, path: Path, engine) -> BaseException:
    """The error a failed save of `path` ends with: out_of_space()'s when the disk is full, else `e`
    (also the background writer's error hook)."""
    cut_short_for_room = short_write(e) and _free(path.parent) < needed_bytes(run_dir, engine) - _bytes_in(path)
    if disk_full(e, path.parent) or cut_short_for_room:
        return out_of_space(run_dir, path, engine)
    return e


def out_of_space(run_dir: Path, path: Path, engine) -> CheckpointError:
    """A save that filled the disk gives its space back (the partial save never counted); one
    line says what a checkpoint needs. The line is said (and RUN_DIR/FAILED claimed) before the
    partial save is removed: the other ranks' writes into it fail then, and their errors are not
    what the user needs to read."""
    root = checkpoints_dir(run_dir)
    free = shutil.disk_usage(root).free + _bytes_in(path)   # once the partial save is gone
    err = CheckpointError(f"no space left on the device of {root}: a checkpoint needs ~{_size(needed_bytes(run_dir, engine))} "
                          f"there, {_size(free)} is free; free some space (or lower checkpoint.keep) and run the "
                          "same command to resume")
    failure.say_first(run_dir, str(err), failure.attempt_started(0.0))
    err.said = True
    shutil.rmtree(path, ignore_errors=True)
    return err


def disk_full(e: BaseException, folder: Path) -> bool:
    """ENOSPC, however it surfaced: an OSError, or torch's zip writer / safetensors wrapping it in
    a RuntimeError ("unexpected pos", "file write failed") on a device with no room left."""
    if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    text = str(e)
    if "No space left" in text or "os error 28" in text or "Disk quota exceeded" in text:
        return True
    return _free(folder) < (1 << 20)


SHORT_WRITE = ("unexpected pos", "file write failed", "PytorchStreamWriter failed writing")


def short_write(e: BaseException) -> bool:
    """torch's zip writer found its file shorter than what it wrote: a write failed and its errno
    never reached Python. On the GPU machine (2026-12-06) a 1B ZeRO-3 save onto a disk that earlier
    runs' 17 GB checkpoints had filled ended so ("unexpected pos 2816 vs 2708"), passed on as it
    was; as_said counts it as a full disk when less is free than the checkpoint still needs."""
    return isinstance(e, RuntimeError) and any(s in str(e) for s in SHORT_WRITE)


def _free(folder: Path) -> float:
    try:
        return shutil.disk_usage(folder).free
    except OSError:
        return float("inf")


def needed_bytes(run_dir: Path, engine) -> float:
    """A checkpoint's size: the newest complete one's, else the trainable parameters' bytes plus
    fp32 master weights and two Adam moments (12 bytes each)."""
    newest = latest_complete(run_dir)
    known = manifest.total_bytes(newest) if newest else None
    if known:
        return known
    params = [p for p in engine.module.parameters() if p.requires_grad]
    return sum(getattr(p, "ds_numel", p.numel()) * (p.element_size() + 12) for p in params)


def _bytes_in(folder: Path) -> int:
    """The bytes of the files under `folder` (other ranks may be writing or removing them)."""
    total = 0
    for f in folder.rglob("*"):
        with contextlib.suppress(OSError):
            total += f.stat().st_size if f.is_file() else 0
    return total


def _size(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{int(n)} bytes"
