"""What a run reports while it trains: every tracker of `logging.report_to` (TensorBoard, wandb,
MLflow), the console and RUN_DIR/metrics.jsonl. `Metrics` composes the parts:

    timing.py      PhaseTimer: seconds per phase of a step (data, fwd_bwd, optimizer, ...)
    throughput.py  Throughput: tokens/s, MFU (its formula), GPU memory
    console.py     Console (messages, progress, summaries), Watchdog (spike/throughput warnings)
    tracking.py    which trackers, their run ids across resumes, hparams and config texts
    trackers.py    the sinks: TensorBoard, wandb, MLflow
    samples.py     generations of train.eval_prompts

Every rank creates a `Metrics`; only rank 0 writes. The loop calls:

    clear_failure(run_dir)                     # rank 0, at start: the old RUN_DIR/FAILED is history
    log = Metrics(run_dir, rank, total_steps, start_step, recipe, world_size=world)
    with log.time("data"): ...                 # data wait (host time)
    with log.time("fwd_bwd"): ...              # forward + backward (CUDA events on GPU: no sync)
    with log.time("optimizer"): ...            # engine.step()
    log.step(step, seconds=dt, loss=..., lr=..., grad_norm=..., tokens=..., padded_tokens=..., ...)
    log.skipped(step, loss, in_a_row, limit, total)  # a non-finite loss: the step was skipped
    log.eval(step, loss)                       # eval/loss + eval/perplexity + a one-line summary
    log.samples(step, pairs)                   # [(prompt, completion)] from samples.eval_samples
    log.saved(step, path, seconds)             # a one-line summary
    log.close(finished=..., final_eval_loss=...)  # hparams with the final eval loss, flush

Tags (every tracker):
  train/loss train/lr train/grad_norm train/tokens_per_sec (real tokens, not padding)
  train/mfu (when core/flops.py knows the model and the GPU's peak is known; formula: config/mfu)
  train/gpu_mem_allocated_gib train/gpu_mem_reserved_gib train/gpu_mem_peak_gib (CUDA only; GiB. metrics.jsonl
  also keeps the old train/gpu_mem_*_gb keys, in 1e9-byte GB, until the next release)
  train/host_rss_peak_gib (this rank's peak resident host memory, pinned buffers included)
  train/samples_seen train/epoch  eval/loss eval/perplexity  eval/samples (text)
  train/skipped_steps (at each skipped step: the run's total so far)
  data/packing_efficiency  time/step_s time/data_wait_s time/fwd_bwd_s time/optimizer_s time/other_s
  text: config/recipe config/ds_config config/plan config/mfu config/time; hparams with
  hparam/final_eval_loss

metrics.jsonl holds one JSON object per line: the same scalars keyed by tag plus "step",
"time", and for train records "total_steps" and "eta_s"; events carry "event" (start,
checkpoint, skipped, samples, end). `zerotune status` reads it.
"""
from __future__ import annotations

import json
import math
import time
from contextlib import contextmanager
from pathlib import Path

from zerotune.core.layout import FAILED_FILE, METRICS_FILE

from zerotune.training.monitoring.console import Console, Watchdog, format_duration
from zerotune.training.monitoring.throughput import Throughput, with_old_memory_keys
from zerotune.training.monitoring.timing import PhaseTimer, time_scalars
from zerotune.training.monitoring.tracker_setup import check_trackers, config_texts, open_trackers, run_hparams


def clear_failure(run_dir: Path) -> None:
    """A new attempt starts: RUN_DIR/FAILED (why the last one stopped) is history. Rank 0 only."""
    (Path(run_dir) / FAILED_FILE).unlink(missing_ok=True)


class JsonLog:
    """RUN_DIR/metrics.jsonl, line-buffered: `zerotune status` reads it while the run goes on."""

    def __init__(self, path: Path):
        self.file = open(path, "a", buffering=1)

    def record(self, values: dict) -> None:
        self.file.write(json.dumps({"time": time.time(), **values}) + "\n")

    def close(self) -> None:
        self.file.close()


class Metrics:
    def __init__(self, run_dir: Path, rank: int, total_steps: int, start_step: int, recipe, world_size: int = 1):
        import torch
        check_trackers(recipe)  # on every rank: a missing package stops them all alike
        self.run_dir, self.rank, self.total, self.recipe = Path(run_dir), rank, total_steps, recipe
        self.world, self.start_step, self.last_step = world_size, start_step, start_step
        cuda = torch.cuda.is_available()
        self.timer = PhaseTimer(cuda)
        self.throughput = Throughput(recipe, world_size, cuda)
        self.console = Console(rank, total_steps, start_step, recipe.logging.progress)
        self.watchdog = Watchdog(start_step, self.console.warn)
        self.skipped_total = 0
        self.last_train: dict[str, float] = {}
        self.best_eval: float | None = None
        self.trackers: list = []
        self.jsonl: JsonLog | None = None
        if rank != 0:
            return
        self.trackers = open_trackers(self.run_dir, recipe, start_step, self.console.say)
        texts = config_texts(self.run_dir, recipe, self.throughput)
        for t in self.trackers:
            t.start(run_hparams(recipe, world_size, total_steps), texts, start_step)
        self.jsonl = JsonLog(self.run_dir / METRICS_FILE)
        self._record({"step": start_step, "event": "start", "total_steps": total_steps, "world_size": world_size})

    # ------------------------------------------------------------------ writing
    def _record(self, values: dict) -> None:
        if self.jsonl:
            self.jsonl.record(values)

    def scalars(self, step: int, values: dict[str, float | None], **extra) -> None:
        """Write scalars (tag -> value; None is left out) at `step` to every tracker; `extra`
        goes to metrics.jsonl only."""
        if self.rank != 0:
            return
        values = {k: v for k, v in values.items() if v is not None}
        for t in self.trackers:
            t.scalars(step, values)
        self._record({"step": step, **with_old_memory_keys(values), **extra})

    def text(self, tag: str, value: str, step: int = 0) -> None:
        for t in self.trackers:
            t.text(tag, value, step)

    def profiled(self, summary: str | None, step: int) -> None:
        """The profile window's summary (training/monitoring/profile.py), when it just ended: printed and
        logged as text to every tracker."""
        if summary and self.rank == 0:
            self.say(summary)
            self.text("profile", f"```\n{summary}\n```", step)

    def say(self, msg: str) -> None:
        self.console.say(msg)

    def warn(self, msg: str) -> None:
        self.console.warn(msg)

    def _flush(self) -> None:
        for t in self.trackers:
            t.flush()

    @contextmanager
    def time(self, phase: str):
        """Time a phase of the step: "data", "fwd_bwd" or "optimizer" (any name works: time/<name>_s)."""
        with self.timer.time(phase):
            yield

    # ------------------------------------------------------------------ derived numbers
    def eta_seconds(self, step: int) -> float | None:
        return self.console.eta_seconds(step)

    def mfu(self, tokens_per_sec: float, seq_len: int) -> float | None:
        return self.throughput.mfu(tokens_per_sec, seq_len)

    # ------------------------------------------------------------------ events of the loop
    def step(self, step: int, *, seconds: float, loss: float, lr: float, grad_norm: float | None,
             tokens: float, samples: int, epoch: float, padded_tokens: float | None = None,
             seq_len: int | None = None, router_aux: float | None = None) -> None:
        """One optimizer step done. `tokens` are the real (non-padding) tokens of the global
        batch; `padded_tokens` what the batch held with padding; `seq_len` its sequence length."""
        if self.rank != 0:
            self.timer.clear()
            return
        self.last_step = step
        rates = self.throughput.rates(tokens, seconds, padded_tokens, seq_len or self.recipe.data.max_len)
        tps = rates["train/tokens_per_sec"]
        self.watchdog.check(step, grad_norm, tps)
        values = {
            "train/loss": loss,
            "train/router_aux_loss": router_aux,   # a mixture of experts: coef x load balancing (model/moe.py)
            "train/lr": lr,
            "train/grad_norm": grad_norm,
            **rates,
            "train/samples_seen": samples,
            "train/epoch": epoch,
            **time_scalars(self.timer.take(), seconds),
            **self.throughput.gpu_memory(),
            **self.throughput.host_memory(),
        }
        self.last_train = {k: v for k, v in values.items() if v is not None}
        eta = self.console.eta_seconds(step)
        if step % self.recipe.logging.every == 0 or step == self.total:
            self.scalars(step, values, total_steps=self.total, eta_s=eta)
        self.console.step(step, loss, tps, eta)

    def skipped(self, step: int, loss: float, in_a_row: int, limit: int, total: int) -> None:
        """The loss of `step` was NaN/inf on some rank: its update was discarded. `total` counts
        the skipped steps of the whole run (kept in checkpoints across resumes)."""
        self.skipped_total = total
        self.timer.clear()
        if self.rank != 0:
            return
        self.last_step = step
        self.warn(f"step {step}: loss is {loss}; update skipped ({in_a_row} in a row, the run stops at {limit}; "
                  f"{self.skipped_total} skipped in total)")
        for t in self.trackers:
            t.scalars(step, {"train/skipped_steps": self.skipped_total})
        self._record({"step": step, "event": "skipped", "loss": str(loss), "in_a_row": in_a_row,
                      "train/skipped_steps": self.skipped_total})

    def eval(self, step: int, loss: float) -> None:
        if self.rank != 0:
            return
        ppl = math.exp(min(loss, 50))
        self.best_eval = loss if self.best_eval is None else min(self.best_eval, loss)
        self.scalars(step, {"eval/loss": loss, "eval/perplexity": ppl})
        self.say(self.console.summary(step, f"eval loss {loss:.4f} (ppl {ppl:.2f}, best {self.best_eval:.4f})",
                                      self.last_train))
        self._flush()

    def samples(self, step: int, pairs: list[tuple[str, str]]) -> None:
        """Generations of the eval prompts: text in every tracker, an event in metrics.jsonl, and
        one line each on the console."""
        if self.rank != 0 or not pairs:
            return
        for t in self.trackers:
            t.samples(step, pairs)
        self._record({"step": step, "event": "samples",
                      "samples": [{"prompt": p, "completion": c} for p, c in pairs]})
        for p, c in pairs:
            self.say(f"step {step} | sample | {p[:60]!r} -> {c[:200]!r}")

    def saved(self, step: int, path: Path, seconds: float | None = None, background: bool = False,
              due: int | None = None, parts: dict | None = None) -> None:
        """A checkpoint saved (`due`: the step it was due at, when it waited for the previous write;
        `parts`: where a background save's blocked seconds went, async_save.Writer.parts)."""
        if self.rank != 0:
            return
        took = (f" in {seconds:.1f}s" if seconds is not None else "") + (" (written in the background)" if background else "")
        if due is not None:
            took += f" (due at step {due}, after the previous save was written)"
        self._record({"step": step, "event": "checkpoint", "path": str(path), "blocked_s": seconds,
                      "background": background, **({"due_step": due} if due is not None else {}), **(parts or {})})
        self.say(self.console.summary(step, f"saved {Path(path).name}{took}", self.last_train))
        self._flush()

    # ------------------------------------------------------------------ the end
    def close(self, final_eval_loss: float | None = None, finished: bool = True) -> None:
        if self.rank == 0 and finished:
            self._record({"step": self.last_step, "event": "end", "eval/loss": final_eval_loss,
                          "train/skipped_steps": self.skipped_total})
            took = format_duration(time.time() - self.console.t_start)
            self.say(f"done: {self.last_step} steps ({self.last_step - self.start_step} in this attempt, {took})"
                     + (f", final eval loss {final_eval_loss:.4f}" if final_eval_loss is not None else "")
                     + (f", {self.skipped_total} skipped steps" if self.skipped_total else ""))
        for t in self.trackers:
            t.finish({"hparam/final_eval_loss": final_eval_loss}, self.last_step, finished)
        self.console.close()
        if self.jsonl:
            self.jsonl.close()
        self.trackers, self.jsonl = [], None
