"""RUN_DIR/HEARTBEAT: rank 0's pid, host, step and state, so `zerotune status` knows a dead run.

Rank 0 writes it when the attempt starts, every HEARTBEAT_EVERY_S seconds from a daemon thread
(one small atomic write: nothing per step or micro-batch), and once more at the end with the
outcome (finished, interrupted, preempted, bad_loss, failed). A run whose file still says
"running" is alive if its process exists (same host: a pid check, answered at once) or, seen
from another host, if the file is younger than STALE_AFTER_S. Torch-free: the launcher reads it.

Every rank also dies with its parent (`die_with_parent`): torchrun starts the ranks in their own
session, so a SIGKILL to the launcher's process group (or an OOM kill of the launcher) would leave
them training, orphaned, holding GPUs and writing RUN_DIR. A stop the launcher supervises
(SIGINT/SIGTERM/SIGUSR1) is forwarded and saves as before: the launcher outlives its ranks then.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

from zerotune.core.io import atomic_write
from zerotune.core.layout import HEARTBEAT_FILE
from zerotune.core.runlock import HEARTBEAT_EVERY_S

PARENT_WATCH_S = 1.0   # where prctl is missing: how often a rank looks for its parent
RUNNING = "running"


class Heartbeat:
    """Rank 0's heartbeat; `state` is the loop's dict (its "step" is reported)."""

    def __init__(self, run_dir: Path, state: dict, started: float | None = None, every: float = HEARTBEAT_EVERY_S):
        self.path, self.state, self.every = Path(run_dir) / HEARTBEAT_FILE, state, every
        self.started = started or time.time()
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._thread: threading.Thread | None = None

    def write(self, status: str, **extra) -> None:
        record = {"pid": os.getpid(), "host": socket.gethostname(), "started": self.started, "time": time.time(),
                  "step": self.state.get("step"), "state": status, **extra}
        with self._lock:
            try:
                atomic_write(self.path, json.dumps(record) + "\n")
            except OSError:
                pass  # a full disk must not stop the training; status then reads an older beat

    def start(self) -> "Heartbeat":
        self.write(RUNNING)
        self._thread = threading.Thread(target=self._beat, name="zerotune-heartbeat", daemon=True)
        self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._done.wait(self.every):
            self.write(RUNNING)

    def stop(self, status: str, **extra) -> None:
        """The last beat: the attempt's outcome."""
        self._done.set()
        self.write(status, **extra)


def read(run_dir: Path) -> dict | None:
    try:
        return json.loads((Path(run_dir) / HEARTBEAT_FILE).read_text())
    except (OSError, ValueError):
        return None


def die_with_parent() -> None:
    """SIGKILL this process when its parent (torchrun, i.e. the launcher's agent) dies: Linux's
    PR_SET_PDEATHSIG, else a daemon thread that checks the parent every PARENT_WATCH_S. A parent
    already gone before this ran (this process was reparented) stops it at once."""
    parent = os.getppid()
    if _pdeathsig(signal.SIGKILL):
        if os.getppid() != parent:
            _orphaned(parent)
        return

    def watch():
        while os.getppid() == parent:
            time.sleep(PARENT_WATCH_S)
        _orphaned(parent)
    threading.Thread(target=watch, name="zerotune-parent-watch", daemon=True).start()


def _pdeathsig(sig: int) -> bool:
    if not sys.platform.startswith("linux"):
        return False
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(1, int(sig), 0, 0, 0) == 0   # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return False


def _orphaned(parent: int) -> None:
    print(f"zerotune: rank {os.environ.get('RANK', '?')}: its launcher (pid {parent}) is gone; stopping",
          file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
