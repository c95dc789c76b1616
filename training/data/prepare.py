"""`zerotune data prepare RECIPE`: tokenize on every core into the cache the job reads, so that a
job whose cache is ready never tokenizes.

    bundle = prepare_data(recipe, tokenizer, workers=16)

The rows of each source are read here and handed out in chunks of CHUNK_ROWS to a pool of
worker processes, each of which tokenizes its chunk exactly as training does
(samples.tokenize_chunk) and sends back flat int32 arrays; the chunks are written to the cache's
shards in order, so the samples, the counts and the cache key are those of the one-process
build, and a bad row fails with the same line. At most WINDOW chunks per worker are in flight,
so memory stays flat however large the source (Pool.imap would read the whole source ahead).
"""
from __future__ import annotations

import multiprocessing as mp
import os
from collections import deque
from pathlib import Path

from . import cache
from .build import DataBundle, build_cached, make_bundle, prepare_tokenizer
from .formats import check_columns
from .samples import row_chunks, tokenize_chunk, write_source

CHUNK_ROWS = 1024
WINDOW = 4           # chunks in flight per worker: enough to keep every worker busy
_WORKER: dict = {}   # set in each worker process: tokenizer, template, data_cfg


def _init_worker(tokenizer, template, data_cfg) -> None:
    _WORKER.update(tokenizer=tokenizer, template=template, data_cfg=data_cfg)


def _tokenize_chunk(task):
    src, rows = task
    w = _WORKER
    return tokenize_chunk(rows, src, w["tokenizer"], w["template"], w["data_cfg"])


class ParallelTokenizer:
    """samples.SerialTokenizer's drop-in (same arguments, same result) that spreads chunks over a pool."""

    def __init__(self, tokenizer, template, data_cfg, workers: int):
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")   # the pool is the parallelism
        ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
        self.pool = ctx.Pool(workers, _init_worker, (tokenizer, template, data_cfg))
        self.window = WINDOW * workers

    def __call__(self, src, writer) -> dict:
        check_columns(src.format, src.columns, f"data source {src.path}")
        return write_source(writer, src, self._in_order((src, rows) for rows in row_chunks(src, CHUNK_ROWS)))

    def _in_order(self, tasks):
        """The results of _tokenize_chunk on `tasks`, in order, with at most `window` in flight."""
        pending = deque()
        for task in tasks:
            pending.append(self.pool.apply_async(_tokenize_chunk, (task,)))
            if len(pending) >= self.window:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.pool.terminate()   # a DataError from a worker may leave chunks in flight
        self.pool.join()


def default_workers() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def cache_folder(recipe, tokenizer) -> tuple[Path, str | None, list[str]]:
    """(the folder of `recipe`'s tokenized cache, the chat template, the tokens it added)."""
    template, added = prepare_tokenizer(recipe, tokenizer)
    return cache.cache_root(recipe) / cache.cache_key(recipe, tokenizer, template), template, added


def cached_data(recipe, tokenizer) -> DataBundle | None:
    """The tokenized cache of `recipe` when it is already there (nothing is tokenized), else None."""
    folder, _, added = cache_folder(recipe, tokenizer)
    return make_bundle(*cache.load(folder), added_tokens=added) if folder.is_dir() else None


def prepare_data(recipe, tokenizer, workers: int | None = None) -> DataBundle:
    """Fill the tokenized cache of `recipe` (the folder build_data reads) with `workers` processes;
    a cache already there is only loaded."""
    folder, template, added = cache_folder(recipe, tokenizer)
    if folder.is_dir():
        return make_bundle(*cache.load(folder), added_tokens=added)
    workers = workers or default_workers()
    with ParallelTokenizer(tokenizer, template, recipe.data, workers) as tokenize:
        built = build_cached(recipe, tokenizer, template, folder, tokenize)
    return make_bundle(*built, cache="miss", cache_path=str(folder), added_tokens=added, workers=workers)
