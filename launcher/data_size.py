"""How many tokens a run processes, from its recipe and local data files (the planner's time and
cost columns; launcher/plan.py)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

from zerotune.core.recipe import Recipe, RecipeError


def _count_local_rows(path: Path) -> Optional[tuple[int, int]]:
    """(rows, characters of text) of a local .json/.jsonl file, None for other sources."""
    files = sorted(path.glob("*.json*")) if path.is_dir() else [path]
    rows = chars = 0
    for f in files:
        if f.suffix not in (".json", ".jsonl") or not f.is_file():
            return None
        text = f.read_text(errors="replace")
        if f.suffix == ".jsonl":
            lines = [ln for ln in text.splitlines() if ln.strip()]
            rows += len(lines)
        else:
            try:
                data = json.loads(text)
            except json.JSONDecodeError:
                return None
            rows += len(data) if isinstance(data, list) else 1
        chars += len(text)
    return rows, chars


def estimate_train_tokens(recipe: Recipe, world: int) -> tuple[Optional[float], str]:
    """Tokens the run processes: steps x global batch x tokens per sample (about 3.6 chars a token)."""
    d, t = recipe.data, recipe.train
    rows = chars = 0
    for src in d.train:
        counted = _count_local_rows(Path(src.path).expanduser())
        if counted is None:
            rows = None
            break
        rows += counted[0]
        chars += counted[1]
    per_sample = min(d.max_len, chars / 3.6 / rows) if rows else d.max_len
    replicas = recipe.distributed.replicas(world)   # N GPUs share a sequence
    try:
        gas = t.accumulation(replicas)
    except RecipeError:
        gas = max(1, (t.global_batch_size or t.micro_batch_size) // (t.micro_batch_size * replicas))
    global_batch = t.micro_batch_size * gas * replicas
    if t.max_steps:
        tokens_per_step = global_batch * (d.max_len if d.packing else per_sample)
        return t.max_steps * tokens_per_step, f"{t.max_steps} steps x {global_batch} samples"
    if rows is None:
        return None, "data size unknown (not local JSON/JSONL): time not estimated"
    train_rows = rows * (1 - d.eval_split)
    tokens = t.epochs * train_rows * per_sample
    return tokens, f"{t.epochs:g} epoch(s) of ~{train_rows:,.0f} samples, ~{per_sample:,.0f} tokens each"
