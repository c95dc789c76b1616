"""The whole data build: every source tokenized, eval held out, weights applied, rows packed,
statistics counted; cached so that a second run (or every other rank) only loads.

    data = build_data(recipe, tokenizer)       # on every rank; rank 0 tokenizes and caches
    data.train[i] -> {"input_ids", "labels"[, "position_ids"]}
    print(data.summary())

Under torch.distributed, rank 0 builds the cache while the others wait at a barrier, then
every rank memory-maps it; a DataError on rank 0 reaches every rank as the same line.
"""
from __future__ import annotations

import random
import sys
import time
from dataclasses import dataclass, field

from . import cache
from .chat_template import CHOICES, add_template_tokens, resolve_template
from .formats import DataError
from .loader import TokenDataset, pack
from .samples import tokenize_source
from .tokenize import IGNORE


@dataclass
class DataBundle:
    train: TokenDataset
    eval: TokenDataset | list
    stats: dict = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the training log."""
        s = self.stats
        line = (f"{s['train_samples']:,} train samples in {s['train_rows']:,} rows, {s['train_tokens']:,} tokens "
                f"({100 * s['trained_fraction']:.1f}% trained)")
        if s["packing"]:
            line += f", packing efficiency {100 * s['packing_efficiency']:.1f}%"
        dropped = {k: s[k] for k in ("truncated", "dropped_too_long", "dropped_no_target", "skipped_bad_rows") if s[k]}
        if dropped:
            line += ", " + ", ".join(f"{k.replace('_', ' ')} {v:,}" for k, v in dropped.items())
        if s.get("cache") == "hit":
            line += f"; cache hit ({s['load_seconds']:.2f} s, tokenizing took {s['tokenize_seconds']:.2f} s)"
        elif s.get("cache") == "miss":
            line += f"; tokenized in {s['tokenize_seconds']:.2f} s"
        return line


def prepare_tokenizer(recipe, tokenizer) -> tuple[str | None, list[str]]:
    """(template, added tokens): adds the special tokens a built-in template needs to the tokenizer.
    Template is None when every source is raw text."""
    sources = [*recipe.data.train, *recipe.data.eval]
    chats = [s for s in sources if s.format != "text"]
    if not chats:
        return None, []
    if recipe.model.chat_template is None and not getattr(tokenizer, "chat_template", None):
        raise DataError(f"model.chat_template: the tokenizer ({recipe.model.tokenizer or recipe.model.path}) has no "
                        f"chat_template and data source {chats[0].path} (format {chats[0].format}) needs one; "
                        f"set model.chat_template to {CHOICES}")
    added = add_template_tokens(tokenizer, recipe.model.chat_template)
    return resolve_template(tokenizer, recipe.model.chat_template), added


# ----------------------------------------------------------------------------- the whole build
def _apply_weight(samples: list, weight: float, rng: random.Random) -> list:
    """weight w: every sample floor(w) times plus a seeded random (w - floor(w)) share of them."""
    whole, frac = int(weight), weight - int(weight)
    out = samples * whole
    if frac > 0:
        out += [samples[i] for i in sorted(rng.sample(range(len(samples)), round(frac * len(samples))))]
    return out


def _histogram(lengths: list[int], max_len: int, bins: int = 8) -> list[tuple[int, int, int]]:
    width = -(-max_len // bins)
    counts = [0] * bins
    for n in lengths:
        counts[min((n - 1) // width, bins - 1)] += 1
    return [(b * width + 1, min((b + 1) * width, max_len), c) for b, c in enumerate(counts)]


def _to_dataset(samples: list, max_len: int, packing: bool) -> TokenDataset:
    if not packing:
        return TokenDataset.from_samples(samples)
    return TokenDataset.from_samples(samples, pack([len(s[0]) for s in samples], max_len))


def _hold_out(per_source: list, fraction: float, rng: random.Random) -> tuple[list, list]:
    """eval_split: a seeded share of all samples, held out before weighting (no upsampled copy of
    an eval sample trains)."""
    total = sum(len(s) for _, s in per_source)
    held = set(rng.sample(range(total), max(1, int(total * fraction))))
    k, split, evals = 0, [], []
    for src, samples in per_source:
        keep = []
        for s in samples:
            (evals if k in held else keep).append(s)
            k += 1
        split.append((src, keep))
    return split, evals


COUNTS = (("bad_rows", "skipped as bad"), ("dropped_too_long", "dropped as too long"),
          ("dropped_no_target", "with no trained token"), ("truncated", "truncated"))


def no_samples_error(sources: list[dict]) -> DataError:
    """One line: every training source, its rows and where they went, and the first bad row."""
    parts = []
    for st in sources:
        counts = [f"{st[k]:,} {label}" for k, label in COUNTS if st[k]]
        parts.append(f"{st['path']}: {st['rows']:,} rows" + (", " + ", ".join(counts) if counts else ""))
    msg = "data.train: no usable samples (" + "; ".join(parts) + ")"
    first = next((st["bad_examples"][0] for st in sources if st["bad_examples"]), None)
    return DataError(msg + (f"; first bad row: {first}" if first else ""))


def truncation_warnings(sources: list[dict], max_len: int) -> list[str]:
    """A source whose every sample data.max_len cuts (or drops) is almost surely a max_len mistake."""
    out = []
    for st in sources:
        if st["samples"] and st["truncated"] == st["samples"]:
            out.append(f"data.max_len {max_len} truncates every sample of {st['path']} ({st['truncated']:,} of "
                       f"{st['samples']:,}; the longest has {st['longest']:,} tokens)")
        elif st["dropped_too_long"] and not st["samples"]:
            out.append(f"data.max_len {max_len} drops every sample of {st['path']} as too long "
                       f"({st['dropped_too_long']:,}; the longest has {st['longest']:,} tokens)")
    return out


def _tokenize_all(recipe, tokenizer, template, tokenize) -> tuple[list, list, list[dict]]:
    """[(src, samples)] of the train sources, the eval samples, and every source's counts."""
    d = recipe.data
    per_source, evals, sources = [], [], []
    for src in d.train:
        samples, st = tokenize(src, tokenizer, template, d)
        per_source.append((src, samples))
        sources.append(st)
    for src in d.eval:
        samples, st = tokenize(src, tokenizer, template, d)
        evals += samples
        sources.append({**st, "eval": True})
    return per_source, evals, sources


def build_datasets(recipe, tokenizer, template, tokenize=tokenize_source) -> tuple[TokenDataset, TokenDataset, dict]:
    """Tokenize every source and assemble the train and eval datasets (no cache). `tokenize`:
    tokenize_source, or prepare.py's parallel one (the same samples and counts)."""
    d = recipe.data
    t0 = time.perf_counter()
    per_source, evals, sources = _tokenize_all(recipe, tokenizer, template, tokenize)
    stats = {"sources": sources, "warnings": truncation_warnings(sources, d.max_len)}
    for w in stats["warnings"]:
        print(f"zerotune: warning: {w}", file=sys.stderr, flush=True)
    total = sum(len(s) for _, s in per_source)
    if total == 0:
        raise no_samples_error([st for st in sources if not st.get("eval")])
    rng = random.Random(recipe.train.seed)
    if not d.eval and d.eval_split > 0:
        per_source, evals = _hold_out(per_source, d.eval_split, rng)
    train = []
    for src, samples in per_source:
        train += _apply_weight(samples, src.weight, rng) if src.weight != 1 else samples
    if not train:
        raise DataError(f"data.train: no training samples left: data.eval_split {d.eval_split} holds out "
                        f"{len(evals):,} of {total:,}; lower it or add samples")
    for key in ("truncated", "dropped_too_long", "dropped_no_target", "bad_rows"):
        stats[key] = sum(s[key] for s in sources)
    stats["skipped_bad_rows"] = stats.pop("bad_rows")
    lengths = [len(s[0]) for s in train]
    train_ds = _to_dataset(train, d.max_len, d.packing)
    eval_ds = _to_dataset(evals, d.max_len, d.packing)
    n_tok = sum(lengths)
    stats.update(
        train_samples=len(train), train_rows=len(train_ds), eval_samples=len(evals), eval_rows=len(eval_ds),
        train_tokens=n_tok, train_target_tokens=int((train_ds.labels != IGNORE).sum()),
        max_len=d.max_len, packing=d.packing, train_on=d.train_on, train_on_reasoning=d.train_on_reasoning,
        train_on_prompt=d.train_on_prompt,
        packing_efficiency=(n_tok / (len(train_ds) * d.max_len)) if d.packing else None,
        padding_free_rows=d.packing,
        length_histogram=_histogram(lengths, d.max_len),
        tokenize_seconds=round(time.perf_counter() - t0, 3))
    stats["trained_fraction"] = stats["train_target_tokens"] / max(n_tok, 1)
    return train_ds, eval_ds, stats


# ----------------------------------------------------------------------------- build or load, on every rank
def make_bundle(train, evals, stats, **extra) -> DataBundle:
    return DataBundle(train, evals if len(evals) else [], {**stats, **extra})


def build_data(recipe, tokenizer, use_cache: bool = True) -> DataBundle:
    """Tokenize (or load from the cache) train and eval data. Call on every rank."""
    import torch.distributed as dist
    template, added = prepare_tokenizer(recipe, tokenizer)
    if not use_cache:
        return make_bundle(*build_datasets(recipe, tokenizer, template), cache="off", added_tokens=added)
    folder = cache.cache_root(recipe) / cache.cache_key(recipe, tokenizer, template)
    error_file = folder.with_name(folder.name + ".error")
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    built = None
    if rank == 0:
        error_file.unlink(missing_ok=True)   # a failure left by an earlier run
    if rank == 0 and not folder.is_dir():
        try:
            built = build_datasets(recipe, tokenizer, template)
            cache.save(folder, *built)
        except Exception as e:
            if distributed:   # let the waiting ranks fail with the same message instead of hanging
                folder.parent.mkdir(parents=True, exist_ok=True)
                error_file.write_text(str(e) if isinstance(e, DataError) else f"rank 0: {type(e).__name__}: {e}")
                dist.barrier()
            raise
    if distributed:
        dist.barrier()
        if error_file.is_file():
            raise DataError(error_file.read_text())
    if built is not None:
        bundle = make_bundle(*built, cache="miss", cache_path=str(folder))
    elif folder.is_dir():
        bundle = make_bundle(*cache.load(folder))
    else:  # a node that does not share rank 0's filesystem builds its own copy
        built = build_datasets(recipe, tokenizer, template)
        cache.save(folder, *built)
        bundle = make_bundle(*built, cache="miss", cache_path=str(folder))
    bundle.stats["added_tokens"] = added
    return bundle
