"""What rank 0 prints: messages, a progress bar (a terminal) or a progress line every 30 s (a
Slurm log), one-line summaries at evals and saves, and warnings when grad norm spikes or
throughput drops. No torch import: the launcher imports format_duration on login nodes."""
from __future__ import annotations

import math
import statistics
import sys
import time
from collections import deque

from zerotune.core import quiet

SPIKE_FACTOR = 5.0          # grad norm above 5x the median of the recent steps is a spike
SPIKE_WINDOW = 50
SLOW_FACTOR = 0.5           # tokens/s below half the recent average is a throughput drop
SLOW_STEPS = 3              # ... for this many logged steps in a row
WARMUP_STEPS = 10           # steps before spike and throughput warnings start
PLAIN_PROGRESS_EVERY_S = 30  # without a terminal (Slurm logs): one progress line this often


def format_duration(seconds: float | None) -> str:
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = int(round(seconds))
    d, rest = divmod(seconds, 86400)
    h, rest = divmod(rest, 3600)
    m, s = divmod(rest, 60)
    if d:
        return f"{d}d{h:02d}h"
    if h:
        return f"{h}h{m:02d}m"
    return f"{m}m{s:02d}s" if m else f"{s}s"


class Console:
    """Messages and progress of rank 0 (every other rank prints nothing)."""

    def __init__(self, rank: int, total_steps: int, start_step: int, progress: bool):
        self.rank, self.total, self.start_step, self.progress = rank, total_steps, start_step, progress
        self.t_start = time.time()
        self.bar = None
        self._last_plain = 0.0
        if rank == 0 and progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                            file=quiet.console())   # tqdm writes from its own module: not routed to the log

    def say(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(msg, file=quiet.console())
        else:
            print(msg, flush=True)

    def warn(self, msg: str) -> None:
        self.say(f"WARNING: {msg}")

    def eta_seconds(self, step: int) -> float | None:
        """Wall time per step since this attempt started (evals and saves included) x steps left."""
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.time() - self.t_start) / done * (self.total - step)

    def step(self, step: int, loss: float, tps: float, eta: float | None) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
            self.bar.refresh()
        elif self.progress and self.rank == 0:
            now = time.time()
            if now - self._last_plain >= PLAIN_PROGRESS_EVERY_S or step == self.total or step == self.start_step + 1:
                self._last_plain = now
                print(f"step {step}/{self.total} | loss {loss:.4f} | {tps:,.0f} tok/s | ETA {format_duration(eta)}",
                      flush=True)

    def summary(self, step: int, what: str, last_train: dict[str, float]) -> str:
        """'step 19/40 | eval loss ... | train loss ... | tok/s | MFU | peak mem | ETA'."""
        parts = [f"step {step}/{self.total}", what]
        tr = last_train
        if "train/loss" in tr:
            parts.append(f"train loss {tr['train/loss']:.4f}")
        if "train/tokens_per_sec" in tr:
            parts.append(f"{tr['train/tokens_per_sec']:,.0f} tok/s")
        if "train/mfu" in tr:
            parts.append(f"MFU {100 * tr['train/mfu']:.1f}%")
        if "train/gpu_mem_peak_gib" in tr:
            parts.append(f"peak mem {tr['train/gpu_mem_peak_gib']:.1f} GiB")
        if step < self.total:
            parts.append(f"ETA {format_duration(self.eta_seconds(step))}")
        return " | ".join(parts)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class Watchdog:
    """Warns on a grad-norm spike or a sharp throughput drop (after a few steps of history)."""

    def __init__(self, start_step: int, warn):
        self.start_step, self.warn = start_step, warn
        self.norms: deque = deque(maxlen=SPIKE_WINDOW)
        self.tps: deque = deque(maxlen=20)
        self.slow_run = 0
        self.last_spike_warning = -10**9

    def check(self, step: int, grad_norm: float | None, tps: float) -> None:
        if grad_norm is not None and math.isfinite(grad_norm):
            self._spike(step, grad_norm)
        if step - self.start_step <= 2:
            return  # the first steps compile kernels and warm allocators
        if len(self.tps) >= WARMUP_STEPS:
            mean = sum(self.tps) / len(self.tps)
            if tps < SLOW_FACTOR * mean:
                self.slow_run += 1
                if self.slow_run == SLOW_STEPS:
                    self.warn(f"step {step}: throughput dropped to {tps:,.0f} tokens/s for {SLOW_STEPS} steps "
                              f"(recent average {mean:,.0f}): a slow node, thermal throttling, swapping or I/O?")
                return  # slow steps stay out of the average
            self.slow_run = 0
        self.tps.append(tps)

    def _spike(self, step: int, grad_norm: float) -> None:
        if len(self.norms) >= WARMUP_STEPS:
            median = statistics.median(self.norms)
            if median > 0 and grad_norm > SPIKE_FACTOR * median and step - self.last_spike_warning >= 10:
                self.last_spike_warning = step
                self.warn(f"step {step}: grad norm {grad_norm:.3g} is {grad_norm / median:.0f}x the median "
                          f"of the last {len(self.norms)} steps ({median:.3g})")
        self.norms.append(grad_norm)
