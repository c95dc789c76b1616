"""benchmarks/bench.py's processes: the machine's GPUs, running one command (its output to a
log) until it exits, times out or has measured enough, killing its whole process tree, and the
lines of a failed run's log that say what went wrong.
"""
from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import time
from pathlib import Path

from bench_setup import REPO


# ----------------------------------------------------------------------------- the machine
def detect_gpus() -> tuple[str, int]:
    """(GPU name, count) from nvidia-smi, without importing torch here (a CUDA context in this
    process would take GPU memory from every run); ("cpu", 0) without one."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True,
                             text=True, timeout=60).stdout
    except (OSError, subprocess.TimeoutExpired):
        return "cpu", 0
    names = [ln.strip() for ln in out.splitlines() if ln.strip()]
    return (names[0], len(names)) if names else ("cpu", 0)


# ----------------------------------------------------------------------------- running one command
def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        kids.setdefault(ppid, []).append(int(d))
    return kids


def kill_tree(pid: int) -> None:
    """SIGKILL `pid` and every process below it (torchrun starts its workers in new sessions,
    so a process group does not reach them). Everything is stopped first so that no parent can
    react (torchrun would SIGTERM the workers, which zerotune answers with a checkpoint)."""
    kids, tree, todo = _children(), [], [pid]
    while todo:
        p = todo.pop(0)
        tree.append(p)
        todo += kids.get(p, [])
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for p in tree:
            try:
                os.kill(p, sig)
            except ProcessLookupError:
                pass


def run_command(cmd: list[str], log: Path, env: dict, timeout: float, done=None) -> dict:
    """Run `cmd` (output to `log`) until it exits, `timeout` passes, or done() says the
    measurement is complete (then the rest, e.g. zerotune's final checkpoint save, is killed)."""
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.time()
    with open(log, "w") as out:
        out.write("$ " + shlex.join(cmd) + "\n")
        out.flush()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO, start_new_session=True)
        state = "exited"
        while True:
            try:
                proc.wait(timeout=1.0)
                break
            except subprocess.TimeoutExpired:
                pass
            if time.time() - t0 > timeout:
                state = "timeout"
            elif done is not None and done():
                time.sleep(0.5)
                state = "stopped-after-last-step"
            else:
                continue
            kill_tree(proc.pid)
            proc.wait()
            break
    return {"rc": proc.returncode, "state": state, "wall_s": round(time.time() - t0, 1)}


NOISE = re.compile(r"warn|deprecat|futurewarning|^\s*$|^\[rank\d+\]:\s*$", re.I)


def error_tail(log: Path, n: int = 12, limit: int = 2500) -> str:
    """The last lines of a failed run that say something (warnings dropped), the traceback's
    last line first when there is one."""
    try:
        lines = log.read_text(errors="replace").splitlines()
    except OSError:
        return ""
    keep = [ln for ln in lines if not NOISE.search(ln)]
    tail = "\n".join(keep[-n:])
    return tail[-limit:]


def is_oom(text: str) -> bool:
    return bool(re.search(r"out of memory|OutOfMemoryError|CUDA error: out of memory", text, re.I))
