"""Stop requests, on every rank: SIGINT (Ctrl-C), SIGTERM (preemption) and SIGUSR1 (Slurm's
warning before the time limit) ask the loop to save at the next step boundary and exit.

  SIGINT            saved, exit INTERRUPT_EXIT_CODE (130): the user stopped it; not requeued
  SIGTERM, SIGUSR1  saved, RUN_DIR/PREEMPTED, exit REQUEUE_EXIT_CODE (85): the job script requeues
  a second SIGINT   KeyboardInterrupt at once (the supervisor, launcher/agent.py, also SIGKILLs)

`python -m zerotune.training` installs the handlers first thing, before the heavy imports, so a
signal that comes while the model loads is remembered, not fatal. All ranks agree through the
step's report all-reduce (training/run/step.py: step_report, read once after the step) on `vote()`: 0 (no request), 1 (SIGTERM or
SIGUSR1) or world + 1 (SIGINT), summed over ranks; more than `world` means someone pressed
Ctrl-C, which wins (a user's stop is not requeued). A signal to any one rank stops them all."""
from __future__ import annotations

import signal

from zerotune.core.layout import INTERRUPT_EXIT_CODE, REQUEUE_EXIT_CODE

INTERRUPTED, PREEMPTED = "interrupted", "preempted"


class StopRequest:
    """Remembers the first stop signal this process received; `install()` takes the handlers."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)

    def __init__(self):
        self.signal: str | None = None

    def install(self) -> "StopRequest":
        for s in self.SIGNALS:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if name == "SIGINT" and self.signal == "SIGINT":
            raise KeyboardInterrupt  # a second Ctrl-C: stop at once (the last complete checkpoint stays)
        if self.signal != "SIGINT":  # SIGINT outranks the others: the user asked, not the scheduler
            self.signal = name

    def vote(self, world: int) -> float:
        """This rank's share of the stop all-reduce."""
        if self.signal is None:
            return 0.0
        return float(world + 1) if self.signal == "SIGINT" else 1.0


def agreed(total: float, world: int) -> str | None:
    """What the summed votes of all ranks ask for: None, INTERRUPTED or PREEMPTED."""
    if total <= 0:
        return None
    return INTERRUPTED if total > world else PREEMPTED


def exit_code(kind: str) -> int:
    return INTERRUPT_EXIT_CODE if kind == INTERRUPTED else REQUEUE_EXIT_CODE
