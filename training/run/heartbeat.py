"""RUN_DIR/HEARTBEAT: rank 0's pid, host, step and state, so `zerotune status` knows a dead run.

Rank 0 writes it when the attempt starts, every HEARTBEAT_EVERY_S seconds from a daemon thread
(one small atomic write: nothing per step or micro-batch), and once more at the end with the
outcome (finished, interrupted, preempted, bad_loss, failed). A run whose file still says
"running" is alive if its process exists (same host: a pid check, answered at once) or, seen
from another host, if the file is younger than STALE_AFTER_S. Torch-free: the launcher reads it.
"""
from __future__ import annotations

import json
import os
import socket
import threading
import time
from pathlib import Path

from zerotune.core.io import atomic_write, process_exists
from zerotune.core.layout import HEARTBEAT_FILE

HEARTBEAT_EVERY_S = 30.0
STALE_AFTER_S = 4 * HEARTBEAT_EVERY_S   # three missed beats and a margin
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


def pid_alive(pid: int) -> bool:
    """A live process with that pid that is a zerotune training (not a reused pid)."""
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
