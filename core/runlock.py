"""RUN_DIR/LOCK: one job per run folder. `zerotune train`, the agent of `zerotune launch`,
launch.sh and job.sbatch (node 0) take it before anything is written; rank 0 takes it when no
launcher of its own holds it (plain torchrun). It records who holds it (host, pid, start time,
Slurm job id) and is held with a real fcntl lock (flock) for the holder's lifetime where the file
system has locks; elsewhere the holder's liveness is judged like the heartbeat's (the same host:
its pid; another host: RUN_DIR/HEARTBEAT younger than STALE_AFTER_S).

Where there are locks, the flock decides: held by anyone means busy, whatever the record says
(it is empty while a holder is between its flock and its write, and while it releases), and a
stale lock is taken over only by the process that got its flock. A look before the work
(`check`) takes a shared lock on a read-only descriptor: NFSv4 emulates flock with POSIX locks,
where an exclusive lock needs a descriptor open for writing (EBADF otherwise). The holder reads
and writes the record through its own descriptor only: closing any other descriptor of LOCK
would drop a POSIX lock.

A second job on a live run folder is refused in one line naming the running job. A run whose
ranks outlived their launcher (HEARTBEAT still "running", its process alive) counts as live too.
A stale lock (its holder gone) is taken over with a one-line warning; the same Slurm job (a
requeue, or another node of the job) may always take over or share its own lock.
Torch-free: the launcher reads it on login nodes.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from .errors import UserError
from .io import process_exists
from .layout import HEARTBEAT_FILE, LOCK_FILE

HEARTBEAT_EVERY_S = 30.0
STALE_AFTER_S = 4 * HEARTBEAT_EVERY_S   # three missed beats and a margin
SETTLE_S = 1.0                          # a lock held that briefly is another's look, not a job
_held: dict[str, int] = {}              # run folder -> the open file whose flock this process holds


class RunBusyError(UserError, RuntimeError):
    """Another job trains into this run folder."""


def pid_alive(pid: int) -> bool:
    """A live process with that pid that is a zerotune process (not a reused pid)."""
    if not process_exists(pid):
        return False
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no /proc: trust kill(0)
    zombie = stat.rsplit(")", 1)[1].split()[0] == "Z"
    return not zombie and b"zerotune" in cmdline


def gone(beat: dict, now: float | None = None) -> str | None:
    """Why a "running" heartbeat's process is not running any more, or None while it is."""
    now = time.time() if now is None else now
    if beat.get("host") == socket.gethostname():
        if pid_alive(int(beat["pid"])):
            return None
        return f"its process ({beat['pid']} on {beat['host']}) is gone"
    if now - beat.get("time", 0) <= STALE_AFTER_S:
        return None
    return f"no heartbeat from {beat.get('host')} for {now - beat.get('time', 0):.0f}s"


def _read(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_fd(fd: int) -> dict | None:
    """The record through a descriptor this process already has open (see the module docstring)."""
    try:
        rec = json.loads(os.pread(fd, 1 << 16, 0))
    except (OSError, ValueError):
        return None
    return rec if isinstance(rec, dict) else None


def _job(rec: dict) -> str:
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(rec.get("started", 0)))
    slurm = f", Slurm job {rec['slurm_job_id']}" if rec.get("slurm_job_id") else ""
    return f"pid {rec.get('pid')} on {rec.get('host')}{slurm}, since {since}"


def _flock(fd: int, shared: bool = False) -> bool | None:
    """True: locked; False: another process holds it; None: this file system has no usable locks."""
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    except OSError as e:
        if e.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL, errno.EBADF):
            return None
        raise


def _flock_settled(fd: int, shared: bool = False) -> bool | None:
    """_flock, but a lock that is taken for less than SETTLE_S (another process's `check` or its
    release) does not count as held."""
    deadline = time.monotonic() + SETTLE_S
    while True:
        locked = _flock(fd, shared)
        if locked is not False or time.monotonic() >= deadline:
            return locked
        time.sleep(0.05)


def holder_alive(run_dir: Path, rec: dict | None, locked: bool | None) -> dict | None:
    """The live job that holds this run folder (its lock record or heartbeat), or None. A flock held
    by another process is a live job, whatever the record says ({} where it names no one)."""
    if locked is False:
        return rec or {}
    if rec and locked is None:   # no locks here: the holder's pid on this host; from another, its age
        if rec.get("host") == socket.gethostname():    # (then the heartbeat's, below, once training runs)
            if pid_alive(int(rec.get("pid", 0))):
                return rec
        elif time.time() - rec.get("started", 0) <= STALE_AFTER_S:
            return rec
    beat = _read(Path(run_dir) / HEARTBEAT_FILE)   # ranks that outlived their launcher
    if beat and beat.get("state") == "running" and beat.get("host") and gone(beat) is None:
        return {**beat, "pid": f"{beat['pid']} (rank 0)"}
    return None


def check(run_dir: Path) -> None:
    """Raise RunBusyError when a live job holds the run folder; writes nothing (the checks before
    anything is written: acquire takes the lock once they passed)."""
    path = Path(run_dir) / LOCK_FILE
    if str(Path(run_dir).resolve()) in _held:
        return
    locked, rec = None, None
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            locked, rec = _flock_settled(fd, shared=True), _read_fd(fd)
        finally:
            os.close(fd)   # closing drops a lock this look took
    job = os.environ.get("SLURM_JOB_ID")
    if job and rec and rec.get("slurm_job_id") == job:
        return
    live = holder_alive(run_dir, rec, locked)
    if live is not None:
        raise RunBusyError(_busy(run_dir, live))


def _busy(run_dir: Path, live: dict) -> str:
    if not live.get("pid"):
        who = f"its {LOCK_FILE} is locked but names no job yet: one is starting or ending"
    else:
        who = _job(live)
    return f"{run_dir} is in use by another job ({who}); wait for it to end, stop it, or give this run another name"


def acquire(run_dir: Path, launcher: int | None = None) -> None:
    """Take RUN_DIR/LOCK for this process (held until it exits), or raise RunBusyError naming the
    running job. `launcher`: a pid whose lock this process may share (rank 0's own launcher)."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        return
    path = run_dir / LOCK_FILE
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    locked, rec = _flock(fd), _read_fd(fd)
    job = os.environ.get("SLURM_JOB_ID")
    if rec and rec.get("host") == socket.gethostname() and launcher is not None and rec.get("pid") == launcher:
        os.close(fd)   # rank 0 under its own launcher, which holds the lock
        return
    same_job = bool(job) and rec is not None and rec.get("slurm_job_id") == job
    if same_job and locked is False:
        os.close(fd)   # another node of this job holds it
        return
    if locked is False:
        locked = _flock_settled(fd)
        rec = _read_fd(fd)
    live = None if same_job else holder_alive(run_dir, rec, locked)
    if live is not None:
        os.close(fd)
        raise RunBusyError(_busy(run_dir, live))
    if rec and not same_job and (rec.get("host"), rec.get("pid")) != (socket.gethostname(), os.getpid()):
        print(f"zerotune: warning: taking over the stale lock of {run_dir} (held by {_job(rec)}, which is gone)",
              file=sys.stderr, flush=True)
    mine = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(), "slurm_job_id": job}
    data = (json.dumps(mine) + "\n").encode()
    os.pwrite(fd, data, 0)   # in place: the flock is on this file, a rename would drop it
    os.ftruncate(fd, len(data))   # after the write: the record is never empty while held
    _held[key] = fd


def release(run_dir: Path) -> None:
    """A job that ends (or hands the run folder to its Slurm job) empties the record: the next
    job starts without a stale-lock warning. A killed holder leaves its record, and that warning."""
    fd = _held.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.ftruncate(fd, 0)
        os.close(fd)
