"""Stop requests: SIGUSR1 (Slurm's warning before the time limit) or SIGTERM (preemption) ask the
loop to save at the next step boundary and exit; all ranks agree through the per-step
all-reduce (training/step.py: step_counts), so a signal to any one rank stops them all."""
from __future__ import annotations

import signal


class StopRequest:
    """Remembers the first stop signal this process received; `install()` takes the handlers."""

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self):
        self.signal: str | None = None

    def install(self) -> "StopRequest":
        for s in self.SIGNALS:
            signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = self.signal or signal.Signals(signum).name

    @property
    def requested(self) -> bool:
        return self.signal is not None
