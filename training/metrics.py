"""Rank-0 metrics: TensorBoard scalars, a progress bar, a JSON-lines log that `zerotune status` reads."""
from __future__ import annotations

import json
import time
from pathlib import Path


class Metrics:
    def __init__(self, run_dir: Path, rank: int, total_steps: int, start_step: int, recipe):
        self.rank, self.total = rank, total_steps
        self.writer = self.bar = None
        self.log_file = None
        if rank != 0:
            return
        if recipe.logging.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events a crashed run logged after the checkpoint we resume from
            self.writer = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1 if start_step else None)
            if not start_step:
                self.writer.add_text("recipe", "```yaml\n" + recipe.to_yaml() + "\n```", 0)
        self.log_file = open(run_dir / "metrics.jsonl", "a", buffering=1)
        if recipe.logging.progress:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True)
        self._last_flush = time.time()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        if self.rank != 0:
            return
        if self.writer:
            for k, v in values.items():
                self.writer.add_scalar(k, v, step)
            if time.time() - self._last_flush > 10:
                self.writer.flush()
                self._last_flush = time.time()
        self.log_file.write(json.dumps({"step": step, "time": time.time(), **values}) + "\n")

    def progress(self, step: int, loss: float, tokens_per_sec: float) -> None:
        if self.bar is not None:
            self.bar.n = step
            self.bar.set_postfix(loss=f"{loss:.4f}", tok_s=f"{tokens_per_sec:,.0f}", refresh=False)
            self.bar.refresh()

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

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer:
            self.writer.flush()
            self.writer.close()
        if self.log_file:
            self.log_file.close()
