"""torchrun, supervised: one interrupt story for every entry point. `zerotune train` runs it in
its own process; RUN_DIR/launch.sh and each node of RUN_DIR/job.sbatch run

    python -m zerotune.launcher.agent --grace SECONDS TORCHRUN_ARGS... -m zerotune.training RUN_DIR

- SIGINT, SIGTERM and SIGUSR1 reach this process only (torchrun starts each worker in its own
  session, so a terminal's Ctrl-C never reaches the workers directly); it forwards the signal
  to every worker, which saves at the next step boundary and exits (training/run/signals.py).
  torchrun's own handlers for these three are kept out, so no worker gets a signal twice.
- A second SIGINT (Ctrl-C) stops at once: SIGKILL to the workers and everything they started.
  So does the grace running out: `--grace` comes from the planner's save-time estimate
  (launcher/submit.py: grace_seconds), and is also torchrun's --shutdown-timeout.
- RUN_DIR/LOCK (core/runlock.py) is taken first (node 0 of a manual multi-node start; every node of
  a Slurm job shares it), so a second job on a live run folder stops in one line; the workers
  die with this process if it is killed outright (training/run/heartbeat.py: die_with_parent).
- The exit code is the first failing worker's own (2 a user error, 3 bad loss, 4 out of GPU
  memory, 85 saved for a requeue, 130 saved after Ctrl-C), not torchrun's 1, and torchrun's
  failure box and traceback are not shown: the worker printed its one line (core/failure.py).
"""
from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

from zerotune.core.layout import (BAD_LOSS_EXIT_CODE, INTERRUPT_EXIT_CODE, OOM_EXIT_CODE, REQUEUE_EXIT_CODE,
                                  USER_ERROR_EXIT_CODE, latest_complete)
from zerotune.core import quiet, runlock
from zerotune.core.failure import ATTEMPT_ENV
from zerotune.core.layout import LAUNCHER_LOG, LOGS_DIR

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)
KILLED_EXIT_CODE = 128 + signal.SIGKILL
ZEROTUNE_EXIT_CODES = (USER_ERROR_EXIT_CODE, BAD_LOSS_EXIT_CODE, OOM_EXIT_CODE, REQUEUE_EXIT_CODE, INTERRUPT_EXIT_CODE)


def children(pid: int) -> dict[int, list[int]]:
    """ppid -> pids of every process (from /proc)."""
    tree: dict[int, list[int]] = {}
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                ppid = int((d / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            tree.setdefault(ppid, []).append(int(d.name))
    return tree


def descendants(pid: int) -> list[int]:
    tree, out, todo = children(pid), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


class Supervisor:
    """Forwards stop signals to the workers (this process's children) and enforces the grace."""

    def __init__(self, grace: float, run_dir: Path | None):
        self.grace, self.run_dir = grace, run_dir
        self.first: str | None = None
        self.killed_because: str | None = None
        self.sent: set[int] = set()   # the workers the first signal reached: never twice (a second SIGINT kills)
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._before: dict = {}

    def install(self) -> None:
        for s in STOP_SIGNALS:
            self._before[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self.first is None:
            self.first = name
            again = " (Ctrl-C again stops at once)" if name == "SIGINT" else ""
            print(f"zerotune: {name}: saving at the next step boundary, then stopping{again}", file=sys.stderr, flush=True)
            self.forward(signum)
            threading.Thread(target=self._watch, args=(signum,), name="zerotune-grace", daemon=True).start()
        elif name == "SIGINT":
            self.kill("a second Ctrl-C" if self.first == "SIGINT" else f"Ctrl-C after {self.first}")
        # a repeated SIGTERM/SIGUSR1 asks for what is already under way

    def forward(self, signum: int) -> None:
        """`signum` to the workers (this process's children) it has not reached yet."""
        me = os.getpid()
        with self._lock:
            for pid in children(me).get(me, []):
                if pid not in self.sent:
                    self.sent.add(pid)
                    try:
                        os.kill(pid, signum)
                    except ProcessLookupError:
                        pass

    def _watch(self, signum: int) -> None:
        """Workers that start after the signal get it too; past the grace, SIGKILL."""
        deadline = time.monotonic() + self.grace
        while not self._done.wait(0.5):
            self.forward(signum)
            if time.monotonic() > deadline:
                self.kill(f"no stop within the {self.grace:.0f}s grace")
                return

    def kill(self, why: str) -> None:
        if self.killed_because:
            return
        self.killed_because = why
        newest = latest_complete(self.run_dir) if self.run_dir else None
        print(f"zerotune: {why}: stopping at once; a resume starts from {newest.name if newest else 'scratch'}",
              file=sys.stderr, flush=True)
        for pid in descendants(os.getpid()):  # the workers and whatever they started
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        self._done.set()
        for s, handler in self._before.items():
            signal.signal(s, handler)


def _keep_out(supervisor: Supervisor):
    """signal.signal that refuses to replace the supervisor's handlers (torchrun sets its own)."""
    real = signal.signal

    def guarded(signum, handler):
        if signum in STOP_SIGNALS and handler != supervisor._handle:
            return signal.getsignal(signum)
        return real(signum, handler)
    return real, guarded


def quiet_torchrun() -> list[str]:
    """Silence torchrun's own log lines (they repeat what the workers say); returns the options it
    understands, for the --shutdown-timeout check."""
    import torch.distributed.run as torchrun
    for name in list(logging.root.manager.loggerDict):
        if name.startswith(("torch.distributed.elastic", "torch.distributed.launcher", "torch.distributed.run")):
            logging.getLogger(name).setLevel(logging.CRITICAL)
    return [s for a in torchrun.get_args_parser()._actions for s in a.option_strings]


def exit_code(error, supervisor: Supervisor) -> int:
    """The first failing worker's exit code (a signal's death as 128 + the signal)."""
    if supervisor.killed_because:
        return INTERRUPT_EXIT_CODE if supervisor.first == "SIGINT" else KILLED_EXIT_CODE

    def rank_of(rf):  # a rank's own reason first, then an exit code, then a death by signal (often torchrun's)
        code = rf[1].exitcode
        return (0 if code in ZEROTUNE_EXIT_CODES else 1 if code > 0 else 2, rf[1].timestamp, rf[0])
    rank, failure = min(error.failures.items(), key=rank_of)
    code = failure.exitcode
    if code < 0:
        name = signal.Signals(-code).name if -code in signal.valid_signals() else f"signal {-code}"
        print(f"zerotune: rank {rank} (pid {failure.pid}) died of {name}", file=sys.stderr, flush=True)
        return 128 - code
    return code


def run_torchrun(args: list[str], grace: float) -> int:
    """torchrun ARGS in this process, supervised; returns the exit code (see the module docstring)."""
    run_dir = Path(args[-1]) if len(args) >= 3 and args[-3:-1] == ["-m", "zerotune.training"] else None
    if run_dir is not None and first_node(args):
        runlock.acquire(run_dir)   # one job per run folder (a no-op under `zerotune train`, which holds it)
    os.environ[ATTEMPT_ENV] = repr(time.time())
    supervisor = Supervisor(grace, run_dir)
    supervisor.install()
    options = quiet_torchrun()
    if "--shutdown-timeout" in options:
        args = [f"--shutdown-timeout={int(grace)}", *args]
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import main as torchrun_main
    real, signal.signal = _keep_out(supervisor)
    try:
        torchrun_main(args)
        return KILLED_EXIT_CODE if supervisor.killed_because else 0
    except ChildFailedError as e:
        return exit_code(e, supervisor)
    except SignalException as e:  # SIGHUP / SIGQUIT: torchrun stopped the workers
        return 128 + int(e.sigval)
    finally:
        signal.signal = real   # first: close() puts the handlers from before back
        supervisor.close()
        if run_dir is not None:
            runlock.release(run_dir)


def first_node(args: list[str]) -> bool:
    """Node 0 of a manual multi-node start (--node-rank) takes the lock; each node of a Slurm job
    takes or shares it (the same job id)."""
    for i, a in enumerate(args):
        for flag in ("--node-rank", "--node_rank"):
            if a == flag and i + 1 < len(args):
                return args[i + 1] == "0"
            if a.startswith(flag + "="):
                return a.split("=", 1)[1] == "0"
    return True


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    grace = 300.0
    if argv[:1] == ["--grace"] and len(argv) > 1:
        grace, argv = float(argv[1]), argv[2:]
    if not argv:
        print("usage: python -m zerotune.launcher.agent [--grace SECONDS] TORCHRUN_ARGS... -m zerotune.training RUN_DIR",
              file=sys.stderr)
        return 2
    run_dir = Path(argv[-1])   # torchrun's own lines -> RUN_DIR/logs/launcher.log (core/quiet.py)
    with quiet.route(run_dir / LOGS_DIR / LAUNCHER_LOG if run_dir.is_dir() else None, name="agent",
                     verbose=quiet.run_verbose(run_dir)):
        return run_torchrun(argv, grace)


if __name__ == "__main__":
    sys.exit(main())
