"""A profile of a few training steps (logging.profile_start, logging.profile_steps): where the
time of a step goes, so that a run slower than it should be says why.

Every rank runs torch.profiler over the window (all ranks take part in the same collectives, so
profiling one rank alone would distort the others). Rank 0 writes RUN_DIR/profile/trace-rank0.json
(open it in Perfetto or chrome://tracing) and RUN_DIR/profile/summary.txt: the window's time by
category, from each op's or kernel's self time (GPU kernels on CUDA, CPU ops otherwise), with the
GPU's idle time (the window's wall time minus kernel time) and the ten largest entries. The
summary is also printed and logged as text to the trackers.

    window = Window(recipe.logging, run_dir, rank, total_steps)
    window.before(step)              # the step about to run (1-based)
    summary = window.after(step)     # the step just taken: the summary text when the window ends
"""
from __future__ import annotations

import time
from pathlib import Path

import torch

# first match wins: collectives before matmuls (NCCL kernels are not matmuls), attention before
# matmuls (flash kernels), the loss before the rest
CATEGORIES = (
    ("communication", ("nccl", "all_reduce", "allreduce", "all_gather", "allgather", "reduce_scatter",
                       "reducescatter", "broadcast", "gloo", "c10d", "all_to_all", "alltoall")),
    ("attention", ("flash", "fmha", "attention", "sdpa", "scaled_dot_product", "cudnn_attn")),
    ("loss", ("cross_entropy", "log_softmax", "nll_loss", "logsumexp", "chunked_loss")),
    ("optimizer", ("adam", "multi_tensor", "optimizer", "fused_adam", "cpu_adam")),
    ("matmul", ("gemm", "matmul", "addmm", "aten::mm", "aten::bmm", "aten::linear", "cutlass", "xmma", "nvjet")),
)


def category(name: str) -> str:
    low = name.lower()
    for cat, keys in CATEGORIES:
        if any(k in low for k in keys):
            return cat
    return "other"


class Window:
    def __init__(self, logging, run_dir: Path, rank: int, total_steps: int):
        self.start, self.steps, self.total = logging.profile_start, logging.profile_steps, total_steps
        self.folder, self.rank = Path(run_dir) / "profile", rank
        self.prof, self.t0 = None, 0.0

    def before(self, step: int) -> None:
        if self.start is None or step != self.start:
            return
        activities = [torch.profiler.ProfilerActivity.CPU]
        if torch.cuda.is_available():
            activities.append(torch.profiler.ProfilerActivity.CUDA)
            torch.cuda.synchronize()
        self.prof = torch.profiler.profile(activities=activities)
        self.prof.__enter__()
        self.t0 = time.perf_counter()

    def after(self, step: int) -> str | None:
        if self.prof is None or step not in (self.start + self.steps - 1, self.total):   # the run may end first
            return None
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        wall = time.perf_counter() - self.t0
        prof, self.prof = self.prof, None
        prof.__exit__(None, None, None)
        if self.rank != 0:
            return None
        self.folder.mkdir(parents=True, exist_ok=True)
        prof.export_chrome_trace(str(self.folder / "trace-rank0.json"))
        text = summarize(prof.key_averages(), wall, self.start, step, cuda=torch.cuda.is_available())
        (self.folder / "summary.txt").write_text(text + "\n")
        return text


def summarize(events, wall: float, first: int, last: int, cuda: bool) -> str:
    """The window's time by category and its ten largest entries (module docstring)."""
    def self_us(e) -> float:
        return float(e.self_device_time_total if cuda else e.self_cpu_time_total)
    timed = [(e.key, self_us(e)) for e in events if self_us(e) > 0]
    by_cat: dict[str, float] = {}
    for name, us in timed:
        by_cat[category(name)] = by_cat.get(category(name), 0.0) + us
    busy = sum(by_cat.values())
    if cuda:
        by_cat["idle"] = max(0.0, wall * 1e6 - busy)
    total = sum(by_cat.values()) or 1.0
    where = "GPU kernel" if cuda else "CPU op"
    lines = [f"profile: steps {first}-{last}, {wall:.2f} s wall, by {where} self time "
             f"(RUN_DIR/profile/trace-rank0.json):"]
    for cat, us in sorted(by_cat.items(), key=lambda kv: -kv[1]):
        lines.append(f"  {cat:<14} {us / 1e3:10.1f} ms  {100 * us / total:5.1f}%")
    lines.append("  largest:")
    for name, us in sorted(timed, key=lambda kv: -kv[1])[:10]:
        lines.append(f"    {us / 1e3:9.1f} ms  {category(name):<13} {name[:90]}")
    return "\n".join(lines)
