"""How many tokens a run processes, from its recipe and local data files (the planner's time and
cost columns; launcher/plan.py), and how long its micro-batches can be, from the tokenized cache
`zerotune train` writes before it plans (DataLengths: the planner's sequence length).

A micro-batch is padded to its longest row (training/data/loader.py: no length grouping), so the
most tokens one can hold is micro_batch_size x the longest row the loader batches: the longest
sample, or with data.packing the longest packed row (<= data.max_len). The planner is handed
that (planning_recipe: data.max_len set to the longest row), not micro_batch_size x data.max_len:
short chat rows at a large max_len no longer plan for memory no batch ever needs.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Optional

from zerotune.core.recipe import Recipe, RecipeError
from zerotune.core.recipe_load import validate_recipe

PADDING_WORTH_PACKING = 0.10   # the plan line suggests data.packing: true above this padding fraction


def _count_local_rows(path: Path) -> Optional[tuple[int, int]]:
    """(rows, characters of text) of a local .json/.jsonl file or folder of them, None for other
    sources. Each file is read once per process while it stays unchanged (`zerotune plan` asks
    for the table and again for the auto line)."""
    files = sorted(path.glob("*.json*")) if path.is_dir() else [path]
    rows = chars = 0
    for f in files:
        if f.suffix not in (".json", ".jsonl") or not f.is_file():
            return None
        st = f.stat()
        counted = _count_file(str(f.absolute()), st.st_size, st.st_mtime_ns)
        if counted is None:
            return None
        rows += counted[0]
        chars += counted[1]
    return rows, chars


@lru_cache(maxsize=256)
def _count_file(path: str, size: int, mtime_ns: int) -> Optional[tuple[int, int]]:
    """(rows, characters) of one file; size and mtime are the cache key (a changed file is read again)."""
    text = Path(path).read_text(errors="replace")
    if path.endswith(".jsonl"):
        return sum(1 for ln in text.splitlines() if ln.strip()), len(text)
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        return None
    return (len(data) if isinstance(data, list) else 1), len(text)


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


# ----------------------------------------------------------------------------- lengths from the cache
def padding_fraction(lengths: Any, micro_batch_size: int, seed: int = 0) -> float:
    """Padding share of micro-batches of `micro_batch_size` rows drawn in a random order (seeded,
    as the sampler shuffles), each padded to its longest row."""
    import numpy as np
    lengths = np.asarray(lengths, dtype=np.int64)
    n = len(lengths) - len(lengths) % micro_batch_size or len(lengths)
    if n == 0:
        return 0.0
    order = np.random.default_rng(seed).permutation(len(lengths))[:n]
    groups = lengths[order]
    if n % micro_batch_size == 0:
        groups = groups.reshape(-1, micro_batch_size)
        padded = float(groups.max(axis=1).sum() * micro_batch_size)
    else:   # fewer rows than one micro-batch
        padded = float(groups.max() * n)
    return 1.0 - float(groups.sum()) / padded if padded else 0.0


@dataclass(frozen=True)
class DataLengths:
    """The tokenized training data's lengths: `samples` (tokens of each sample, weights repeat
    them) and `rows` (tokens of each row the loader batches: the samples, or the packed rows)."""
    samples: Any
    rows: Any
    packed: bool
    seed: int = 0

    @classmethod
    def of(cls, bundle, recipe: Recipe) -> "DataLengths":
        """From build_data / prepare_data's DataBundle (training/data)."""
        train = bundle.train
        return cls(train.sample_lengths(), train.lengths(), train.packed, recipe.train.seed)

    @property
    def longest(self) -> int:
        return int(self.rows.max()) if len(self.rows) else 0

    def one_sample_rows(self, recipe: Recipe) -> bool:
        """Whether every row the loader batches holds one sample and no micro-batch pads a row
        (micro-batches of 1, or rows all of one length): the position ids of each row then count
        0..n-1 once, and transformers masks it causally with no packed-row mask (the mask
        core/long_context.py counts for packed rows under sdpa: 3 n^2 bytes, 48 GiB at 131,072)."""
        n = len(self.rows)
        return n > 0 and n == len(self.samples) and (
            recipe.train.micro_batch_size == 1 or int(self.rows.min()) == int(self.rows.max()))

    def planning_recipe(self, recipe: Recipe) -> Recipe:
        """`recipe` as the planner sees it: data.max_len the longest row the loader can batch (its
        micro-batch x that = the most tokens a micro-batch holds), and data.packing off where
        packing put one sample in each row (one_sample_rows: no packed-row mask to count).
        `as_written` turns a recipe planned from it back into the recipe's own data settings."""
        seq = max(9, min(recipe.data.max_len, self.longest))   # the schema's data.max_len > 8
        return with_data(recipe, seq, packing=recipe.data.packing and not self.one_sample_rows(recipe))

    def lines(self, recipe: Recipe) -> list[str]:
        """What the plan was made for and what packing does here (printed by `zerotune train`)."""
        d, mbs = recipe.data, recipe.train.micro_batch_size
        n = len(self.samples)
        mean = float(self.samples.mean()) if n else 0.0
        unpacked = padding_fraction(self.samples, mbs, self.seed)
        first = (f"data: {n:,} samples, mean {mean:,.0f} tokens, longest {int(self.samples.max()) if n else 0:,} "
                 f"(data.max_len {d.max_len:,}): planned for micro-batches of {mbs} x {self.longest:,} tokens at most")
        if self.packed:
            second = (f"packing on (data.packing: true): {n:,} samples in {len(self.rows):,} rows, "
                      f"{100 * padding_fraction(self.rows, mbs, self.seed):.0f}% padding (unpacked, micro-batches of "
                      f"{mbs} would be {100 * unpacked:.0f}% padding)")
        elif unpacked >= PADDING_WORTH_PACKING:
            per_row = d.max_len / mean if mean else 1.0
            second = (f"packing off (data.packing: false): micro-batches of {mbs} would be {100 * unpacked:.0f}% "
                      f"padding; data.packing: true would avoid it (a row of up to {d.max_len:,} tokens then holds "
                      f"~{per_row:.1f} samples: fewer optimizer steps per epoch at the same global_batch_size)")
        else:
            second = f"packing off (data.packing: false): micro-batches of {mbs} would be {100 * unpacked:.0f}% padding"
        return [first, second]


def cached_lengths(recipe: Recipe) -> tuple[Optional[DataLengths], str]:
    """`zerotune plan`: the training data's real lengths when its tokenized cache is already there
    (`zerotune data prepare` or an earlier `zerotune train` wrote it; nothing is tokenized here), so
    that the plan is the one train makes; else None and why not."""
    tokenizer_path = Path(recipe.model.tokenizer or recipe.model.path)
    if not tokenizer_path.is_dir() or not all(Path(s.path).exists() for s in [*recipe.data.train, *recipe.data.eval]):
        return None, "the tokenizer or the data are not local files here"
    from zerotune.training.data.build import load_tokenizer
    from zerotune.training.data.prepare import cached_data
    try:
        bundle = cached_data(recipe, load_tokenizer(recipe))
    except Exception as e:   # a bad file or tokenizer: train says it in its own words; the plan falls back
        return None, f"the tokenized cache could not be looked up ({type(e).__name__}: {str(e)[:200]})"
    if bundle is None:
        return None, "no tokenized cache yet (`zerotune data prepare RECIPE` writes it, as `zerotune train` does)"
    return DataLengths.of(bundle, recipe), ""


def with_data(recipe: Recipe, max_len: int, packing: bool) -> Recipe:
    """`recipe` with data.max_len and data.packing set."""
    if recipe.data.max_len == max_len and recipe.data.packing == packing:
        return recipe
    data = recipe.model_dump(mode="json")
    data["data"]["max_len"], data["data"]["packing"] = max_len, packing
    return validate_recipe(data, source="resolved recipe")


def as_written(planned: Recipe, written: Recipe) -> Recipe:
    """A recipe resolved from DataLengths.planning_recipe(written), with written's data.max_len and data.packing."""
    return with_data(planned, written.data.max_len, written.data.packing)
