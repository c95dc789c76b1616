"""The whole data build: every source tokenized, eval held out, weights applied, rows packed,
statistics counted; cached so that a second run (or every other rank) only loads.

    data = build_data(recipe, tokenizer)       # on every rank; rank 0 tokenizes and caches
    data.train[i] -> {"input_ids", "labels"[, "position_ids"]}
    print(data.summary())

The build streams: each source is read and tokenized a chunk of rows at a time and written to
int32 shards on disk (dataset.py), so only per-sample index arrays (int64 offsets, sample numbers,
packed rows) grow with the data set; hold-out, weights and packing work on sample numbers.

Under torch.distributed, rank 0 builds the cache while the others wait on a gloo group of their
own with a long timeout (WAIT_SECONDS), never on the training group's NCCL timeout; then every
rank memory-maps it. A DataError on rank 0 reaches every rank as the same line. The launcher
normally fills the cache before torchrun (`zerotune data prepare`), so nobody waits.
"""
from __future__ import annotations

import random
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np

from . import cache
from .chat_template import CHOICES, add_template_tokens, resolve_template
from .dataset import ShardWriter, TokenDataset
from .formats import DataError
from .loader import pack_rows
from .samples import SerialTokenizer

WAIT_SECONDS = 24 * 3600   # how long ranks wait for rank 0 to tokenize: a large data set takes hours


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


def load_tokenizer(recipe):
    """The recipe's tokenizer (model.tokenizer, else the model's), with a pad token."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(recipe.model.tokenizer or recipe.model.path,
                                        trust_remote_code=recipe.model.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


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
# Samples are numbered in the order they were tokenized (source by source); the datasets are
# arrays of those numbers, so nothing here copies tokens.
def _apply_weight(samples: np.ndarray, weight: float, rng: random.Random) -> np.ndarray:
    """weight w: every sample floor(w) times plus a seeded random (w - floor(w)) share of them."""
    whole, frac = int(weight), weight - int(weight)
    out = [samples] * whole
    if frac > 0:
        out.append(samples[np.array(sorted(rng.sample(range(len(samples)), round(frac * len(samples)))), dtype=np.int64)])
    return np.concatenate(out) if out else samples[:0]


def _histogram(lengths: np.ndarray, max_len: int, bins: int = 8) -> list[tuple[int, int, int]]:
    width = -(-max_len // bins)
    counts = np.bincount(np.minimum((lengths - 1) // width, bins - 1), minlength=bins) if len(lengths) else [0] * bins
    return [(b * width + 1, min((b + 1) * width, max_len), int(c)) for b, c in enumerate(counts)]


def _to_dataset(store, samples: np.ndarray, max_len: int, packing: bool) -> TokenDataset:
    if not packing:
        return TokenDataset(store, samples)
    row_ptr, members = pack_rows(store.lengths(samples), max_len)
    return TokenDataset(store, samples[members], row_ptr)


def _hold_out(per_source: list, fraction: float, rng: random.Random) -> tuple[list, np.ndarray]:
    """eval_split: a seeded share of all samples, held out before weighting (no upsampled copy of
    an eval sample trains)."""
    total = sum(len(s) for _, s in per_source)
    held = np.zeros(total, dtype=bool)
    held[rng.sample(range(total), max(1, int(total * fraction)))] = True
    k, split, evals = 0, [], []
    for src, samples in per_source:
        mask = held[k: k + len(samples)]
        k += len(samples)
        split.append((src, samples[~mask]))
        evals.append(samples[mask])
    return split, np.concatenate(evals)


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
    """A source whose every sample data.max_len cuts (or drops) is almost surely a max_len mistake;
    else a sample whose prompt alone is longer than max_len loses the prompt's end: named."""
    out = []
    for st in sources:
        if st["samples"] and st["truncated"] == st["samples"]:
            out.append(f"data.max_len {max_len} truncates every sample of {st['path']} ({st['truncated']:,} of "
                       f"{st['samples']:,}; the longest has {st['longest']:,} tokens)")
        elif st["dropped_too_long"] and not st["samples"]:
            out.append(f"data.max_len {max_len} drops every sample of {st['path']} as too long "
                       f"({st['dropped_too_long']:,}; the longest has {st['longest']:,} tokens)")
        elif st.get("prompt_cut"):   # (a cache written before these were counted has none)
            out.append(f"data.max_len {max_len} is shorter than the prompt alone of {st['prompt_cut']:,} sample(s) of "
                       f"{st['path']} (first: {st['prompt_cut_first']}): truncation keeps the prompt's first "
                       f"{max_len - max_len // 4:,} tokens, loses its end and trains on the response's start; raise "
                       "data.max_len, shorten those rows or set data.truncation: drop")
    return out


def _tokenize_all(recipe, tokenize, writer: ShardWriter) -> tuple[list, np.ndarray, list[dict]]:
    """[(src, sample numbers)] of the train sources, the eval sample numbers, every source's counts."""
    d = recipe.data
    per_source, evals, sources = [], [], []
    for src in d.train:
        first = writer.num_samples
        sources.append(tokenize(src, writer))
        per_source.append((src, np.arange(first, writer.num_samples, dtype=np.int64)))
    for src in d.eval:
        first = writer.num_samples
        sources.append({**tokenize(src, writer), "eval": True})
        evals.append(np.arange(first, writer.num_samples, dtype=np.int64))
    return per_source, (np.concatenate(evals) if evals else np.zeros(0, np.int64)), sources


def _train_samples(recipe, per_source: list, evals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train sample numbers after hold-out and weights, eval sample numbers)."""
    d = recipe.data
    total = sum(len(s) for _, s in per_source)
    rng = random.Random(recipe.train.seed)
    if not d.eval and d.eval_split > 0:
        per_source, evals = _hold_out(per_source, d.eval_split, rng)
    train = np.concatenate([_apply_weight(s, src.weight, rng) if src.weight != 1 else s for src, s in per_source])
    if not len(train):
        raise DataError(f"data.train: no training samples left: data.eval_split {d.eval_split} holds out "
                        f"{len(evals):,} of {total:,}; lower it or add samples")
    return train, evals


def build_datasets(recipe, tokenizer, template, folder=None, tokenize=None) -> tuple[TokenDataset, TokenDataset, dict]:
    """Tokenize every source and assemble the train and eval datasets. The shards go to
    folder/tokens (a cache being staged), or stay in memory when folder is None. `tokenize`:
    samples.SerialTokenizer by default, or prepare.py's parallel one (the same samples and counts)."""
    d = recipe.data
    t0 = time.perf_counter()
    tokenize = tokenize or SerialTokenizer(tokenizer, template, d)
    writer = ShardWriter(folder / "tokens" if folder is not None else None)
    per_source, evals, sources = _tokenize_all(recipe, tokenize, writer)
    store = writer.close()
    stats = {"sources": sources, "warnings": truncation_warnings(sources, d.max_len)}
    for w in stats["warnings"]:
        print(f"zerotune: warning: {w}", file=sys.stderr, flush=True)
    if sum(len(s) for _, s in per_source) == 0:
        raise no_samples_error([st for st in sources if not st.get("eval")])
    train, evals = _train_samples(recipe, per_source, evals)
    for key in ("truncated", "dropped_too_long", "dropped_no_target", "bad_rows"):
        stats[key] = sum(s[key] for s in sources)
    stats["skipped_bad_rows"] = stats.pop("bad_rows")
    n_tok, histogram = int(store.lengths(train).sum()), _histogram(store.lengths(train), d.max_len)
    train_ds = _to_dataset(store, train, d.max_len, d.packing)
    eval_ds = _to_dataset(store, evals, d.max_len, d.packing)
    stats.update(
        train_samples=len(train), train_rows=len(train_ds), eval_samples=len(evals), eval_rows=len(eval_ds),
        train_tokens=n_tok, train_target_tokens=train_ds.target_tokens(),
        max_len=d.max_len, packing=d.packing, train_on=d.train_on, train_on_reasoning=d.train_on_reasoning,
        train_on_prompt=d.train_on_prompt,
        packing_efficiency=(n_tok / (len(train_ds) * d.max_len)) if d.packing else None,
        padding_free_rows=d.packing,
        length_histogram=histogram,
        tokenize_seconds=round(time.perf_counter() - t0, 3))
    stats["trained_fraction"] = stats["train_target_tokens"] / max(n_tok, 1)
    return train_ds, eval_ds, stats


def build_cached(recipe, tokenizer, template, folder, tokenize=None) -> tuple[TokenDataset, TokenDataset, dict]:
    """build_datasets straight into a staging folder beside `folder`, renamed to it when complete."""
    tmp = cache.staging(folder)
    try:
        built = build_datasets(recipe, tokenizer, template, tmp, tokenize)
        cache.save(tmp, *built)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    cache.commit(tmp, folder)
    return built


# ----------------------------------------------------------------------------- build or load, on every rank
def make_bundle(train, evals, stats, **extra) -> DataBundle:
    return DataBundle(train, evals if len(evals) else [], {**stats, **extra})


def _wait_group():
    """A gloo group of every rank with its own long timeout, or None when not distributed: the
    ranks wait for rank 0's tokenizing on it, not on the training (NCCL) group's timeout."""
    import torch.distributed as dist
    if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
        return None
    return dist.new_group(backend="gloo", timeout=timedelta(seconds=WAIT_SECONDS))


def _outcome(group, error: str | None, folder) -> str | None:
    """Rank 0's outcome (None, or its error line) on every rank; the others wait here."""
    import torch.distributed as dist
    box = [error]
    try:
        dist.broadcast_object_list(box, src=0, group=group)
    except RuntimeError as e:
        raise DataError(f"rank {dist.get_rank()}: gave up waiting for rank 0 to build the tokenized data cache "
                        f"{folder} (waited up to {WAIT_SECONDS} s: {str(e).splitlines()[0]}); run `zerotune data "
                        "prepare RECIPE` before the job to fill it") from None
    finally:
        dist.destroy_process_group(group)
    return box[0]


def build_data(recipe, tokenizer, use_cache: bool = True) -> DataBundle:
    """Tokenize (or load from the cache) train and eval data. Call on every rank."""
    template, added = prepare_tokenizer(recipe, tokenizer)
    if not use_cache:
        return make_bundle(*build_datasets(recipe, tokenizer, template), cache="off", added_tokens=added)
    folder = cache.cache_root(recipe) / cache.cache_key(recipe, tokenizer, template)
    group = _wait_group()
    rank = 0
    if group is not None:
        import torch.distributed as dist
        rank = dist.get_rank()
    built, error = None, None
    if rank == 0 and not folder.is_dir():
        try:
            built = build_cached(recipe, tokenizer, template, folder)
        except Exception as e:
            if group is None:
                raise
            error = str(e) if isinstance(e, DataError) else f"rank 0: {type(e).__name__}: {e}"
            try:
                _outcome(group, error, folder)   # the waiting ranks fail with the same line instead of hanging
            except DataError:
                pass                             # they gave up already; rank 0's own error says more
            raise
    if group is not None and (error := _outcome(group, None, folder)):
        raise DataError(error)
    if built is not None:
        bundle = make_bundle(*built, cache="miss", cache_path=str(folder))
    elif folder.is_dir():
        bundle = make_bundle(*cache.load(folder))
    else:  # a node that does not share rank 0's filesystem builds its own copy
        bundle = make_bundle(*build_cached(recipe, tokenizer, template, folder), cache="miss", cache_path=str(folder))
    bundle.stats["added_tokens"] = added
    return bundle
