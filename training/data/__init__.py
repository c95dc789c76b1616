"""Data layer: sources -> conversations -> tokens + loss mask -> batches.

    data = build_data(recipe, tokenizer)       # same on every rank
    data.train[i] -> {"input_ids": [...], "labels": [...]}
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from .formats import FORMATS, DataError
from .loader import ResumableSampler, batches, collate, target_tokens
from .tokenize import IGNORE, resolve_template, tokenize_conversation

__all__ = ["build_data", "DataBundle", "DataError", "ResumableSampler", "batches", "collate", "target_tokens", "IGNORE"]


@dataclass
class DataBundle:
    train: list[dict]
    eval: list[dict]
    stats: dict = field(default_factory=dict)


def _read_rows(path: Path) -> list[dict]:
    if not path.is_file():
        raise DataError(f"{path}: data file not found")
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        return rows
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    return rows


def _load_source(src, tokenizer, template, recipe, stats) -> list[dict]:
    path = Path(src.path)
    rows = _read_rows(path)
    if not rows:
        raise DataError(f"{path}: no rows")
    fmt = FORMATS.get(src.format)
    if fmt is None:
        raise DataError(f"{path}: format {src.format!r} is not supported yet")
    out = []
    for n, row in enumerate(rows, 1):
        where = f"{path} row {n}"
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected an object, got {type(row).__name__}")
        ids, labels = tokenize_conversation(tokenizer, template, fmt(row, where, src.columns), recipe.data.train_on_prompt)
        if len(ids) > recipe.data.max_len:
            if recipe.data.truncation == "drop":
                stats["dropped_too_long"] += 1
                continue
            ids, labels = ids[: recipe.data.max_len], labels[: recipe.data.max_len]
            stats["truncated"] += 1
        if all(l == IGNORE for l in labels[1:]):
            stats["dropped_no_target"] += 1
            continue
        out.append({"input_ids": ids, "labels": labels})
    return out


def build_data(recipe, tokenizer) -> DataBundle:
    template = resolve_template(tokenizer, recipe.model.chat_template)
    stats = {"truncated": 0, "dropped_too_long": 0, "dropped_no_target": 0}
    train = [s for src in recipe.data.train for s in _load_source(src, tokenizer, template, recipe, stats)]
    evals = [s for src in recipe.data.eval for s in _load_source(src, tokenizer, template, recipe, stats)]
    if not evals and recipe.data.eval_split > 0:
        order = list(range(len(train)))
        random.Random(recipe.train.seed).shuffle(order)
        k = max(1, int(len(train) * recipe.data.eval_split))
        held = set(order[:k])
        evals = [train[i] for i in sorted(held)]
        train = [s for i, s in enumerate(train) if i not in held]
    if not train:
        raise DataError("data.train: no usable samples after filtering " + json.dumps(stats))
    stats.update(train_samples=len(train), eval_samples=len(evals),
                 train_tokens=sum(len(s["input_ids"]) for s in train))
    return DataBundle(train, evals, stats)
