"""What a run reports while it trains: TensorBoard, the console and RUN_DIR/metrics.jsonl.

Every rank creates a `Metrics`; only rank 0 writes. The loop calls:

    log = Metrics(run_dir, rank, total_steps, start_step, recipe, world_size=world)
    with log.time("data"): ...                 # data wait (host time)
    with log.time("fwd_bwd"): ...              # forward + backward (CUDA events on GPU: no sync)
    with log.time("optimizer"): ...            # engine.step()
    log.step(step, seconds=dt, loss=..., lr=..., grad_norm=..., tokens=..., padded_tokens=..., ...)
    log.skipped(step, loss, in_a_row, limit, total)  # a non-finite loss: the step was skipped
    log.eval(step, loss)                       # eval/loss + eval/perplexity + a one-line summary
    log.saved(step, path)                      # a one-line summary
    log.close(final_eval_loss)                 # hparams with the final eval loss, flush

TensorBoard tags (RUN_DIR/tensorboard):
  train/loss train/lr train/grad_norm train/tokens_per_sec (real tokens, not padding)
  train/mfu (when training/flops.py knows the model and the GPU's peak is known)
  train/gpu_mem_allocated_gb train/gpu_mem_reserved_gb train/gpu_mem_peak_gb (CUDA only)
  train/samples_seen train/epoch  eval/loss eval/perplexity
  train/skipped_steps (at each skipped step: the run's total so far)
  data/packing_efficiency  time/step_s time/data_wait_s time/fwd_bwd_s time/optimizer_s
  text: config/recipe config/ds_config config/plan; hparams with hparam/final_eval_loss

metrics.jsonl holds one JSON object per line: the same scalars keyed by tag plus "step",
"time", and for train records "total_steps" and "eta_s"; events carry "event" (start,
checkpoint, skipped, end). `zerotune status` reads it. torch is imported only where used, so
the launcher can import format_duration on a login node.
"""
from __future__ import annotations

import json
import math
import os
import statistics
import sys
import time
from collections import deque
from contextlib import contextmanager
from pathlib import Path

from zerotune.core.flops import flops_per_token
from zerotune.core.io import read_model_config
from zerotune.core.layout import DS_CONFIG_FILE, FAILED_FILE, METRICS_FILE, PLAN_FILE, TENSORBOARD_DIR
from zerotune.core.memory import PEAK_TFLOPS

GB = 1e9
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


def peak_flops(device_name: str) -> float | None:
    """Dense bf16 peak FLOP/s of one GPU, from the planner's table (None when unknown).
    ZEROTUNE_PEAK_TFLOPS overrides it (for GPUs the table lacks)."""
    if os.environ.get("ZEROTUNE_PEAK_TFLOPS"):
        return float(os.environ["ZEROTUNE_PEAK_TFLOPS"]) * 1e12
    name = device_name.lower()
    if "h100" in name and "pcie" in name:
        return 756e12
    for key, tflops in PEAK_TFLOPS.items():
        if key in name:
            return tflops * 1e12
    return None


def model_flops_per_token(recipe, seq_len: int) -> float | None:
    """Training FLOPs (forward + backward) of one token, or None when we cannot know them."""
    try:
        return float(flops_per_token(read_model_config(recipe.model.path), seq_len))
    except Exception:  # an unreadable config, an architecture flops.py does not cover
        return None


class _Phases:
    """Seconds per phase of one step. Host time for the data wait; CUDA events for the GPU work,
    read once per logged step after the loss sync, so timing never adds a synchronisation."""

    def __init__(self, cuda: bool):
        self.cuda = cuda
        self.host: dict[str, float] = {}
        self.events: dict[str, list] = {}

    @contextmanager
    def time(self, name: str):
        if self.cuda and name != "data":
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
        out = dict(self.host)
        for name, pairs in self.events.items():
            pairs[-1][1].synchronize()
            out[name] = out.get(name, 0.0) + sum(s.elapsed_time(e) for s, e in pairs) / 1000
        self.host, self.events = {}, {}
        return out


class Metrics:
    def __init__(self, run_dir: Path, rank: int, total_steps: int, start_step: int, recipe, world_size: int = 1):
        self.run_dir, self.rank, self.total, self.recipe = Path(run_dir), rank, total_steps, recipe
        self.world = world_size
        self.start_step = self.last_step = start_step
        self.writer = self.bar = self.log_file = None
        import torch
        self.cuda = torch.cuda.is_available()
        self.phases = _Phases(self.cuda)
        self.t_start = time.time()
        self.skipped_total = 0
        self.last_train: dict[str, float] = {}
        self.best_eval: float | None = None
        self._norms: deque = deque(maxlen=SPIKE_WINDOW)
        self._tps: deque = deque(maxlen=20)
        self._slow_run = 0
        self._last_spike_warning = -10**9
        self._flops: dict[int, float | None] = {}
        self._peak = peak_flops(torch.cuda.get_device_name() if self.cuda else "cpu")
        self._last_plain = 0.0
        if rank != 0:
            return
        (self.run_dir / FAILED_FILE).unlink(missing_ok=True)  # a new attempt: the old failure is history
        if recipe.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step: TensorBoard drops what an earlier attempt logged after the step we resume
            # from (a crash after the last checkpoint), so the curves have no duplicate steps.
            self.writer = SummaryWriter(str(self.run_dir / TENSORBOARD_DIR), purge_step=start_step + 1, flush_secs=10)
            self._config_text(start_step)
        self.log_file = open(self.run_dir / METRICS_FILE, "a", buffering=1)
        self._record({"step": start_step, "event": "start", "total_steps": total_steps, "world_size": world_size})
        if recipe.logging.progress and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)

    # ------------------------------------------------------------------ writing
    def _record(self, values: dict) -> None:
        if self.log_file:
            self.log_file.write(json.dumps({"time": time.time(), **values}) + "\n")

    def _config_text(self, step: int) -> None:
        self.writer.add_text("config/recipe", "```yaml\n" + self.recipe.to_yaml() + "\n```", step)
        for tag, name, lang in (("config/ds_config", DS_CONFIG_FILE, "json"), ("config/plan", PLAN_FILE, ""),
                                ("config/plan", "plan.md", ""), ("config/plan", "plan.json", "json")):
            path = self.run_dir / name
            if path.is_file():
                self.writer.add_text(tag, f"```{lang}\n{path.read_text()}\n```", step)

    def scalars(self, step: int, values: dict[str, float], **extra) -> None:
        """Write scalars (TensorBoard tag -> value) at `step`; `extra` goes to metrics.jsonl only."""
        if self.rank != 0:
            return
        if self.writer:
            for k, v in values.items():
                if v is not None:
                    self.writer.add_scalar(k, v, step)
        self._record({"step": step, **{k: v for k, v in values.items() if v is not None}, **extra})

    def text(self, tag: str, value: str, step: int = 0) -> None:
        if self.writer:
            self.writer.add_text(tag, value, step)

    def say(self, msg: str) -> None:
        if self.rank != 0:
            return
        if self.bar is not None:
            self.bar.write(msg)
        else:
            print(msg, flush=True)

    def warn(self, msg: str) -> None:
        self.say(f"WARNING: {msg}")

    @contextmanager
    def time(self, phase: str):
        """Time a phase of the step: "data", "fwd_bwd" or "optimizer" (any name works)."""
        with self.phases.time(phase):
            yield

    # ------------------------------------------------------------------ derived numbers
    def eta_seconds(self, step: int) -> float | None:
        """Wall time per step since this attempt started (evals and saves included) x steps left."""
        done = step - self.start_step
        if done <= 0:
            return None
        return (time.time() - self.t_start) / done * (self.total - step)

    def mfu(self, tokens_per_sec: float, seq_len: int) -> float | None:
        if self._peak is None:
            return None
        if seq_len not in self._flops:
            self._flops[seq_len] = model_flops_per_token(self.recipe, seq_len)
        fpt = self._flops[seq_len]
        return tokens_per_sec * fpt / (self.world * self._peak) if fpt else None

    def _gpu_memory(self) -> dict[str, float]:
        if not self.cuda:
            return {}
        import torch
        return {"train/gpu_mem_allocated_gb": torch.cuda.memory_allocated() / GB,
                "train/gpu_mem_reserved_gb": torch.cuda.memory_reserved() / GB,
                "train/gpu_mem_peak_gb": torch.cuda.max_memory_allocated() / GB}

    # ------------------------------------------------------------------ events of the loop
    def step(self, step: int, *, seconds: float, loss: float, lr: float, grad_norm: float | None,
             tokens: float, samples: int, epoch: float, padded_tokens: float | None = None,
             seq_len: int | None = None) -> None:
        """One optimizer step done. `tokens` are the real (non-padding) tokens of the global
        batch; `padded_tokens` what the batch held with padding; `seq_len` its sequence length."""
        if self.rank != 0:
            self.phases.clear()
            return
        self.last_step = step
        tps = tokens / seconds if seconds > 0 else 0.0
        phases = self.phases.take()
        self._watch(step, grad_norm, tps)
        values = {
            "train/loss": loss,
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            "train/tokens_per_sec": tps,
            "train/mfu": self.mfu(tps, seq_len or self.recipe.data.max_len),
            "train/samples_seen": samples,
            "train/epoch": epoch,
            "data/packing_efficiency": tokens / padded_tokens if padded_tokens else None,
            "time/step_s": seconds,
            "time/data_wait_s": phases.get("data"),
            "time/fwd_bwd_s": phases.get("fwd_bwd"),
            "time/optimizer_s": phases.get("optimizer"),
            **self._gpu_memory(),
        }
        self.last_train = {k: v for k, v in values.items() if v is not None}
        eta = self.eta_seconds(step)
        if step % self.recipe.logging.every == 0 or step == self.total:
            self.scalars(step, values, total_steps=self.total, eta_s=eta)
        self._progress(step, loss, tps, eta)

    def skipped(self, step: int, loss: float, in_a_row: int, limit: int, total: int) -> None:
        """The loss of `step` was NaN/inf on some rank: its update was discarded. `total` counts
        the skipped steps of the whole run (kept in checkpoints across resumes)."""
        self.skipped_total = total
        self.phases.clear()
        if self.rank != 0:
            return
        self.last_step = step
        self.warn(f"step {step}: loss is {loss}; update skipped ({in_a_row} in a row, the run stops at {limit}; "
                  f"{self.skipped_total} skipped in total)")
        if self.writer:
            self.writer.add_scalar("train/skipped_steps", self.skipped_total, step)
        self._record({"step": step, "event": "skipped", "loss": str(loss), "in_a_row": in_a_row,
                      "train/skipped_steps": self.skipped_total})

    def eval(self, step: int, loss: float) -> None:
        if self.rank != 0:
            return
        ppl = math.exp(min(loss, 50))
        self.best_eval = loss if self.best_eval is None else min(self.best_eval, loss)
        self.scalars(step, {"eval/loss": loss, "eval/perplexity": ppl})
        self.say(self._summary(step, f"eval loss {loss:.4f} (ppl {ppl:.2f}, best {self.best_eval:.4f})"))
        if self.writer:
            self.writer.flush()

    def saved(self, step: int, path: Path, seconds: float | None = None) -> None:
        if self.rank != 0:
            return
        took = f" in {seconds:.1f}s" if seconds is not None else ""
        self._record({"step": step, "event": "checkpoint", "path": str(path)})
        self.say(self._summary(step, f"saved {Path(path).name}{took}"))
        if self.writer:
            self.writer.flush()

    def _summary(self, step: int, what: str) -> str:
        parts = [f"step {step}/{self.total}", what]
        tr = self.last_train
        if "train/loss" in tr:
            parts.append(f"train loss {tr['train/loss']:.4f}")
        if "train/tokens_per_sec" in tr:
            parts.append(f"{tr['train/tokens_per_sec']:,.0f} tok/s")
        if "train/mfu" in tr:
            parts.append(f"MFU {100 * tr['train/mfu']:.1f}%")
        if "train/gpu_mem_peak_gb" in tr:
            parts.append(f"peak mem {tr['train/gpu_mem_peak_gb']:.1f} GB")
        if step < self.total:
            parts.append(f"ETA {format_duration(self.eta_seconds(step))}")
        return " | ".join(parts)

    # ------------------------------------------------------------------ warnings and progress
    def _watch(self, step: int, grad_norm: float | None, tps: float) -> None:
        """Warn on a grad-norm spike or a sharp throughput drop (after a few steps of history)."""
        if grad_norm is not None and math.isfinite(grad_norm):
            if len(self._norms) >= WARMUP_STEPS:
                median = statistics.median(self._norms)
                if median > 0 and grad_norm > SPIKE_FACTOR * median and step - self._last_spike_warning >= 10:
                    self._last_spike_warning = step
                    self.warn(f"step {step}: grad norm {grad_norm:.3g} is {grad_norm / median:.0f}x the median "
                              f"of the last {len(self._norms)} steps ({median:.3g})")
            self._norms.append(grad_norm)
        if step - self.start_step <= 2:
            return  # the first steps compile kernels and warm allocators
        if len(self._tps) >= WARMUP_STEPS:
            mean = sum(self._tps) / len(self._tps)
            if tps < SLOW_FACTOR * mean:
                self._slow_run += 1
                if self._slow_run == SLOW_STEPS:
                    self.warn(f"step {step}: throughput dropped to {tps:,.0f} tokens/s for {SLOW_STEPS} steps "
                              f"(recent average {mean:,.0f}): a slow node, thermal throttling, swapping or I/O?")
                return  # slow steps stay out of the average
            self._slow_run = 0
        self._tps.append(tps)

    def _progress(self, step: int, loss: float, tps: float, eta: float | None) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tps:,.0f}", refresh=False)
            self.bar.refresh()
        elif self.recipe.logging.progress:
            now = time.time()
            if now - self._last_plain >= PLAIN_PROGRESS_EVERY_S or step == self.total or step == self.start_step + 1:
                self._last_plain = now
                print(f"step {step}/{self.total} | loss {loss:.4f} | {tps:,.0f} tok/s | ETA {format_duration(eta)}",
                      flush=True)

    # ------------------------------------------------------------------ the end
    def hparams(self, final_eval_loss: float | None) -> None:
        """The recipe's main knobs with the final eval loss, for TensorBoard's HPARAMS tab."""
        if not self.writer:
            return
        from torch.utils.tensorboard.summary import hparams
        r = self.recipe
        hp = {"model": str(r.model.path), "method": r.method.kind, "dtype": r.model.dtype, "lr": r.train.lr,
              "scheduler": r.train.scheduler, "micro_batch_size": r.train.micro_batch_size,
              "grad_accum": r.train.accumulation(self.world), "world_size": self.world,
              "global_batch": r.train.micro_batch_size * r.train.accumulation(self.world) * self.world,
              "max_len": r.data.max_len, "packing": r.data.packing, "zero": str(r.distributed.zero),
              "total_steps": self.total, "seed": r.train.seed}
        metric = {"hparam/final_eval_loss": final_eval_loss if final_eval_loss is not None else float("nan")}
        exp, ssi, sei = hparams(hp, metric)
        fw = self.writer._get_file_writer()  # the same event file, so a resumed run has one hparams entry
        for summary in (exp, ssi, sei):
            fw.add_summary(summary, self.last_step)
        self.writer.add_scalar("hparam/final_eval_loss", metric["hparam/final_eval_loss"], self.last_step)

    def close(self, final_eval_loss: float | None = None, finished: bool = True) -> None:
        if self.rank == 0:
            if finished:
                self.hparams(final_eval_loss)
                self._record({"step": self.last_step, "event": "end", "eval/loss": final_eval_loss,
                              "train/skipped_steps": self.skipped_total})
                took = format_duration(time.time() - self.t_start)
                self.say(f"done: {self.last_step} steps ({self.last_step - self.start_step} in this attempt, {took})"
                         + (f", final eval loss {final_eval_loss:.4f}" if final_eval_loss is not None else "")
                         + (f", {self.skipped_total} skipped steps" if self.skipped_total else ""))
        if self.bar is not None:
            self.bar.close()
        if self.writer:
            self.writer.flush()
            self.writer.close()
        if self.log_file:
            self.log_file.close()
        self.writer = self.bar = self.log_file = None
