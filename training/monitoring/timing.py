"""Where the time of a step goes: the loop wraps each phase in `with timer.time(name)`.

    data       the wait for the next micro-batches, the token-count all-reduce, the copy to
               the device (host time)
    fwd_bwd    forward + backward of every micro-batch; under ZeRO-3 this includes the parameter
               all-gathers and gradient reduce-scatters, which DeepSpeed overlaps with compute
               (not separable without a profiler)
    optimizer  engine.step(): the last gradient reduction, clipping, the optimizer update (on the
               CPU with offload) and, under ZeRO-3, the parameter re-partitioning
    any other  a phase the loop adds (e.g. "comm" around the loss all-reduce) -> time/<name>_s

On CUDA, fwd_bwd, optimizer and other non-data phases are timed with CUDA events, read once
per logged step after the loss sync, so timing never adds a synchronisation. time/other_s is
what the step's wall time (time/step_s) holds beyond the timed phases: the loss all-reduce,
logging, the host waiting on the GPU.
"""
from __future__ import annotations

import time
from contextlib import contextmanager

# phase name -> TensorBoard tag (the names the loop uses; other phases get time/<name>_s)
PHASE_TAGS = {"data": "time/data_wait_s", "fwd_bwd": "time/fwd_bwd_s", "optimizer": "time/optimizer_s"}
HOST_PHASES = ("data",)   # host work: timed on the host clock even on CUDA


def phase_tag(name: str) -> str:
    return PHASE_TAGS.get(name, f"time/{name}_s")


class PhaseTimer:
    """Seconds per phase of one step: host clock for the data wait, CUDA events for GPU work."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.host: dict[str, float] = {}
        self.events: dict[str, list] = {}

    @contextmanager
    def time(self, name: str):
        if self.cuda and name not in HOST_PHASES:
            import torch
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self.events.setdefault(name, []).append((start, end))
        else:
            t0 = time.perf_counter()
            try:
                yield
            finally:
                self.host[name] = self.host.get(name, 0.0) + time.perf_counter() - t0

    def clear(self) -> None:
        self.host, self.events = {}, {}

    def take(self) -> dict[str, float]:
        """Seconds per phase since the last take/clear (waits for the last CUDA event)."""
        out = dict(self.host)
        for name, pairs in self.events.items():
            pairs[-1][1].synchronize()
            out[name] = out.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs) / 1000
        self.clear()
        return out


def time_scalars(phases: dict[str, float], step_seconds: float) -> dict[str, float]:
    """time/step_s, one time/<phase>_s per phase, and time/other_s (the rest of the step)."""
    out = {"time/step_s": step_seconds}
    for name in (*PHASE_TAGS, *sorted(set(phases) - set(PHASE_TAGS))):
        if name in phases:
            out[phase_tag(name)] = phases[name]
    if phases:
        out["time/other_s"] = max(0.0, step_seconds - sum(phases.values()))
    return out


def time_text() -> str:
    """The time split, as TensorBoard's text tab shows it (config/time)."""
    lines = ["| tag | what |", "|---|---|", "| time/step_s | wall time of the whole step (host clock) |"]
    lines += [f"| {phase_tag(n)} | {what} |" for n, what in (
        ("data", "data wait + token-count all-reduce + copy to the device"),
        ("fwd_bwd", "forward + backward of every micro-batch (ZeRO-3: parameter all-gathers and gradient "
                    "reduce-scatters overlap with it)"),
        ("optimizer", "engine.step(): last gradient reduction, clipping, update (CPU with offload)"))]
    lines.append("| time/other_s | the rest: loss all-reduce, logging, host waiting on the GPU |")
    return "\n".join(lines) + "\n\nGPU phases are timed with CUDA events (GPU time), the data wait on the host clock."
