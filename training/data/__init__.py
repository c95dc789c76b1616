"""Data layer: sources -> conversations -> tokens + loss mask -> (packed) rows -> batches.

    data = build_data(recipe, tokenizer)       # on every rank; rank 0 tokenizes and caches
    data.train[i] -> {"input_ids", "labels"[, "position_ids"]}   (numpy int32 views)
    for batch in batches(data.train, ResumableSampler(len(data.train), rank, world, seed), mbs, pad_id): ...

Tokenized data is cached under data.cache_dir (default RUN_DIR/../.zerotune-cache), keyed by
everything that changes the tokens: the sources' content, formats, columns and weights, the
tokenizer, the chat template, max_len, packing, truncation, train_on_prompt, the seed. Under
torch.distributed, rank 0 builds the cache while the others wait at a barrier, then every
rank memory-maps it.
"""
from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from .formats import DataError, check_columns, to_conversation
from .loader import ResumableSampler, TokenDataset, batches, collate, pack, real_tokens, target_tokens
from .sources import content_hash, read_rows
from .tokenize import IGNORE, add_template_tokens, assistant_spans, label_tokens, resolve_template, tokenize_text, truncate

__all__ = ["build_data", "DataBundle", "DataError", "ResumableSampler", "TokenDataset", "batches", "collate",
           "target_tokens", "real_tokens", "IGNORE", "pack", "prepare_tokenizer", "tokenize_source"]

CACHE_VERSION = 1
CHUNK = 256  # rows tokenized per tokenizer call


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
    if all(s.format == "text" for s in sources):
        return None, []
    added = add_template_tokens(tokenizer, recipe.model.chat_template)
    return resolve_template(tokenizer, recipe.model.chat_template), added


# ----------------------------------------------------------------------------- tokenize one source
def _new_source_stats(src) -> dict:
    return {"path": src.path, "format": src.format, "rows": 0, "samples": 0, "bad_rows": 0, "bad_examples": [],
            "truncated": 0, "dropped_too_long": 0, "dropped_no_target": 0}


def tokenize_source(src, tokenizer, template, data_cfg, limit: int | None = None) -> tuple[list, dict]:
    """[(ids, labels)] of one source, and its counts. Bad rows raise, or are skipped and counted."""
    st = _new_source_stats(src)
    check_columns(src.format, src.columns, f"data source {src.path}")
    skip = data_cfg.on_bad_rows == "skip"
    out: list[tuple[list[int], list[int]]] = []
    pending: list[tuple[str, str, list]] = []   # (where, text, spans) awaiting one batched tokenizer call

    def bad(err: DataError) -> None:
        if not skip:
            raise err
        st["bad_rows"] += 1
        if len(st["bad_examples"]) < 3:
            st["bad_examples"].append(str(err))

    def add(ids, labels) -> None:
        if len(ids) > data_cfg.max_len:
            if data_cfg.truncation == "drop":
                st["dropped_too_long"] += 1
                return
            ids, labels = truncate(ids, labels, data_cfg.max_len)
            st["truncated"] += 1
        if all(l == IGNORE for l in labels):
            st["dropped_no_target"] += 1
            return
        out.append((list(ids), list(labels)))

    def flush() -> None:
        if not pending:
            return
        enc = tokenizer([p[1] for p in pending], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        for (_, _, spans), ids, offs in zip(pending, enc["input_ids"], enc["offset_mapping"]):
            add(ids, label_tokens(ids, offs, spans, data_cfg.train_on_prompt))
        pending.clear()

    for where, row in read_rows(src):
        st["rows"] += 1
        try:
            if isinstance(row, DataError):
                raise row
            conv = to_conversation(src.format, row, where, src.columns, data_cfg.system_prompt)
            if src.format == "text":
                add(*tokenize_text(tokenizer, conv["text"]))
            else:
                text, spans = assistant_spans(tokenizer, template, conv, where)
                pending.append((where, text, spans))
        except DataError as e:
            bad(e)
        if len(pending) >= CHUNK:
            flush()
        if limit and st["rows"] >= limit:
            break
    flush()
    if st["rows"] == 0:
        raise DataError(f"{src.path}: no rows")
    st["samples"] = len(out)
    return out, st


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


def _build(recipe, tokenizer, template) -> tuple[TokenDataset, TokenDataset, dict]:
    d = recipe.data
    t0 = time.perf_counter()
    per_source, stats = [], {"sources": []}
    for src in d.train:
        samples, st = tokenize_source(src, tokenizer, template, d)
        per_source.append((src, samples))
        stats["sources"].append(st)
    evals = []
    for src in d.eval:
        samples, st = tokenize_source(src, tokenizer, template, d)
        st["eval"] = True
        evals += samples
        stats["sources"].append(st)
    rng = random.Random(recipe.train.seed)
    if not d.eval and d.eval_split > 0:   # hold out before weighting, so no duplicate leaks into eval
        total = sum(len(s) for _, s in per_source)
        held = set(rng.sample(range(total), max(1, int(total * d.eval_split))))
        k, split = 0, []
        for src, samples in per_source:
            keep = []
            for s in samples:
                (evals if k in held else keep).append(s)
                k += 1
            split.append((src, keep))
        per_source = split
    train = []
    for src, samples in per_source:
        train += _apply_weight(samples, src.weight, rng) if src.weight != 1 else samples
    for key in ("truncated", "dropped_too_long", "dropped_no_target", "bad_rows"):
        stats[key] = sum(s[key] for s in stats["sources"])
    stats["skipped_bad_rows"] = stats.pop("bad_rows")
    if not train:
        raise DataError("data.train: no usable samples (" + ", ".join(
            f"{k}: {stats[k]}" for k in ("skipped_bad_rows", "truncated", "dropped_too_long", "dropped_no_target")) + ")")
    lengths = [len(s[0]) for s in train]
    train_ds = _to_dataset(train, d.max_len, d.packing)
    eval_ds = _to_dataset(evals, d.max_len, d.packing)
    n_tok = sum(lengths)
    stats.update(
        train_samples=len(train), train_rows=len(train_ds), eval_samples=len(evals), eval_rows=len(eval_ds),
        train_tokens=n_tok, train_target_tokens=int((train_ds.labels != IGNORE).sum()),
        max_len=d.max_len, packing=d.packing,
        packing_efficiency=(n_tok / (len(train_ds) * d.max_len)) if d.packing else None,
        padding_free_rows=d.packing,
        length_histogram=_histogram(lengths, d.max_len),
        tokenize_seconds=round(time.perf_counter() - t0, 3))
    stats["trained_fraction"] = stats["train_target_tokens"] / max(n_tok, 1)
    return train_ds, eval_ds, stats


# ----------------------------------------------------------------------------- the cache
def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token,
                         tokenizer.pad_token, len(tokenizer)]).encode())
    return h.hexdigest()[:20]


def cache_key(recipe, tokenizer, template) -> str:
    d = recipe.data
    desc = {
        "version": CACHE_VERSION,
        "train": [{**s.model_dump(mode="json"), "hash": content_hash(s)} for s in d.train],
        "eval": [{**s.model_dump(mode="json"), "hash": content_hash(s)} for s in d.eval],
        "data": d.model_dump(mode="json", exclude={"train", "eval", "cache_dir"}),
        "tokenizer": tokenizer_fingerprint(tokenizer), "template": template, "seed": recipe.train.seed,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]


def cache_root(recipe) -> Path:
    return Path(recipe.data.cache_dir) if recipe.data.cache_dir else recipe.run_dir.parent / ".zerotune-cache"


def _save(folder: Path, train: TokenDataset, evals: TokenDataset, stats: dict) -> None:
    tmp = folder.with_name(f"{folder.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    train.save(tmp / "train")
    evals.save(tmp / "eval")
    (tmp / "stats.json").write_text(json.dumps(stats, indent=1))
    try:
        tmp.rename(folder)            # atomic: a reader sees a complete cache or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)   # another process won the race: theirs is identical


def _load(folder: Path) -> DataBundle:
    t0 = time.perf_counter()
    stats = json.loads((folder / "stats.json").read_text())
    train, evals = TokenDataset.load(folder / "train"), TokenDataset.load(folder / "eval")
    stats.update(cache="hit", cache_path=str(folder), load_seconds=round(time.perf_counter() - t0, 3))
    return DataBundle(train, evals if len(evals) else [], stats)


def build_data(recipe, tokenizer, use_cache: bool = True) -> DataBundle:
    """Tokenize (or load from the cache) train and eval data. Call on every rank."""
    import torch.distributed as dist
    template, added = prepare_tokenizer(recipe, tokenizer)
    if not use_cache:
        train, evals, stats = _build(recipe, tokenizer, template)
        return DataBundle(train, evals if len(evals) else [], {**stats, "cache": "off", "added_tokens": added})
    folder = cache_root(recipe) / cache_key(recipe, tokenizer, template)
    error_file = folder.with_name(folder.name + ".error")
    distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank = dist.get_rank() if distributed else 0
    built = None
    if rank == 0:
        error_file.unlink(missing_ok=True)   # a failure left by an earlier run
    if rank == 0 and not folder.is_dir():
        try:
            built = _build(recipe, tokenizer, template)
            _save(folder, *built)
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
        train, evals, stats = built
        stats = {**stats, "cache": "miss", "cache_path": str(folder)}
        bundle = DataBundle(train, evals if len(evals) else [], stats)
    elif folder.is_dir():
        bundle = _load(folder)
    else:  # a node that does not share rank 0's filesystem builds its own copy
        train, evals, stats = _build(recipe, tokenizer, template)
        _save(folder, train, evals, stats)
        bundle = DataBundle(train, evals if len(evals) else [], {**stats, "cache": "miss", "cache_path": str(folder)})
    bundle.stats["added_tokens"] = added
    return bundle
