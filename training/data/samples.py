"""One source -> tokenized samples [(input_ids, labels)] and its counts.

    samples, stats = tokenize_source(src, tokenizer, template, recipe.data)

Rows are read (sources.py), turned into one conversation form (formats.py), rendered with
the chat template and labelled (tokenize.py), then tokenized in chunks of CHUNK rows per
tokenizer call. A bad row raises a one-line DataError naming its file and row, or with
`data.on_bad_rows: skip` is skipped and counted (the first three messages are kept for `zerotune
data preview`). Bad rows: those formats.py refuses, those the chat template or the tokenizer fails
on (e.g. a lone UTF-16 surrogate, JSON "\\ud800"). A sample whose prompt alone fills data.max_len
is truncated like any other (its prompt's start and its response's: data.truncation: truncate)
and counted, the first named, for a warning (build.py truncation_warnings).
"""
from __future__ import annotations

import itertools
import json
import re

import numpy as np

from .formats import DataError, check_columns, to_conversation
from .sources import read_rows
from .tokenize import IGNORE, assistant_spans, label_tokens, tokenize_text, truncate

CHUNK = 256          # rows tokenized per tokenizer call
CHUNK_ROWS = 1024    # rows read, tokenized and written to the shards at a time by the one-process build
SURROGATE = re.compile("[\ud800-\udfff]")   # a lone UTF-16 surrogate: valid JSON, not encodable text


def new_source_stats(src) -> dict:
    return {"path": src.path, "format": src.format, "rows": 0, "samples": 0, "bad_rows": 0, "bad_examples": [],
            "truncated": 0, "dropped_too_long": 0, "dropped_no_target": 0, "longest": 0,
            "prompt_cut": 0, "prompt_cut_first": None}   # truncated samples whose prompt alone filled max_len


def merge_stats(src, parts: list[dict]) -> dict:
    """The counts of one source from those of its chunks (tokenized apart, in order)."""
    st = new_source_stats(src)
    for p in parts:
        for k in ("rows", "samples", "bad_rows", "truncated", "dropped_too_long", "dropped_no_target", "prompt_cut"):
            st[k] += p[k]
        st["prompt_cut_first"] = st["prompt_cut_first"] or p["prompt_cut_first"]
        st["longest"] = max(st["longest"], p["longest"])
        st["bad_examples"] = (st["bad_examples"] + p["bad_examples"])[:3]
    return st


def tokenize_source(src, tokenizer, template, data_cfg, limit: int | None = None) -> tuple[list, dict]:
    """[(ids, labels)] of one source, and its counts. Bad rows raise, or are skipped and counted."""
    check_columns(src.format, src.columns, f"data source {src.path}")
    out, st = tokenize_rows(read_rows(src), src, tokenizer, template, data_cfg, limit)
    if st["rows"] == 0:
        raise DataError(f"{src.path}: no rows")
    return out, st


def bad_row(err: DataError, data_cfg, st: dict) -> None:
    """A row that cannot be used: raised, or with data.on_bad_rows: skip counted in `st` (the
    first three kept as examples)."""
    if data_cfg.on_bad_rows != "skip":
        raise err
    st["bad_rows"] += 1
    if len(st["bad_examples"]) < 3:
        st["bad_examples"].append(str(err))


def conversations(rows, src, data_cfg, st: dict, limit: int | None = None):
    """(where, conversation) for each row of `src` that parses (bad_row for the others); counts
    rows in `st`. Shared by tokenizing (below) and the no-model check (validate.py)."""
    for where, row in rows:
        st["rows"] += 1
        try:
            if isinstance(row, DataError):
                raise row
            conv = to_conversation(src.format, row, where, src.columns, data_cfg.system_prompt)
        except DataError as e:
            bad_row(e, data_cfg, st)
        else:
            yield where, conv
        if limit and st["rows"] >= limit:
            return


def unusable(where: str, text: str, err: Exception) -> DataError:
    """One line for a row the chat template or the tokenizer fails on (not a traceback)."""
    if SURROGATE.search(text):
        return DataError(f"{where}: holds a lone UTF-16 surrogate (e.g. JSON \"\\ud800\"), text no tokenizer can "
                         "encode; fix or drop the row, or set data.on_bad_rows: skip")
    msg = (str(err).strip().splitlines() or [""])[0][:200]
    return DataError(f"{where}: cannot be rendered and tokenized ({type(err).__name__}: {msg}); fix or drop the row, "
                     "or set data.on_bad_rows: skip")


def fit(where: str, ids: list[int], labels: list[int], data_cfg, st: dict):
    """One tokenized row as it trains, within data.max_len (truncated, or None: dropped and counted
    in `st`). A row whose prompt alone fills max_len is counted (and the first named) in `st`:
    truncation keeps the prompt's start and the response's, the prompt's end is lost (a warning)."""
    st["longest"] = max(st["longest"], len(ids))
    if len(ids) > data_cfg.max_len:
        if data_cfg.truncation == "drop":
            st["dropped_too_long"] += 1
            return None
        first = next((i for i, l in enumerate(labels) if l != IGNORE), len(ids))
        if data_cfg.max_len <= first < len(ids):   # the prompt alone fills max_len: cut, it loses its end
            st["prompt_cut"] += 1
            st["prompt_cut_first"] = st["prompt_cut_first"] or f"{where}, {first:,} prompt tokens"
        ids, labels = truncate(ids, labels, data_cfg.max_len)
        st["truncated"] += 1
    if all(l == IGNORE for l in labels):
        st["dropped_no_target"] += 1
        return None
    return list(ids), list(labels)


def tokenize_rows(rows, src, tokenizer, template, data_cfg, limit: int | None = None) -> tuple[list, dict]:
    """tokenize_source on some (where, row) pairs of `src` (prepare.py hands chunks to workers)."""
    st = new_source_stats(src)
    out: list[tuple[list[int], list[int]]] = []
    pending: list[tuple[str, str, list]] = []   # (where, text, spans) awaiting one batched tokenizer call

    def add(where, ids, labels) -> None:
        sample = fit(where, ids, labels, data_cfg, st)
        if sample is not None:
            out.append(sample)

    def encode(batch):
        return tokenizer([p[1] for p in batch], add_special_tokens=False, return_offsets_mapping=True, verbose=False)

    def flush() -> None:
        try:
            encoded = [(pending, encode(pending))] if pending else []
        except Exception:   # one row the tokenizer cannot take fails the whole batch: find it, row by row
            encoded = []
            for one in pending:
                try:
                    encoded.append(([one], encode([one])))
                except Exception as e:
                    bad_row(unusable(one[0], one[1], e), data_cfg, st)
        for batch, enc in encoded:
            for (where, _, spans), ids, offs in zip(batch, enc["input_ids"], enc["offset_mapping"]):
                try:
                    add(where, ids, label_tokens(ids, offs, spans, data_cfg.train_on_prompt))
                except DataError as e:
                    bad_row(e, data_cfg, st)
        pending.clear()

    for where, conv in conversations(rows, src, data_cfg, st, limit):
        try:
            if src.format == "text":
                add(where, *tokenize_text(tokenizer, conv["text"]))
            else:
                pending.append((where, *assistant_spans(tokenizer, template, conv, where, data_cfg.train_on,
                                                        data_cfg.train_on_reasoning)))
        except Exception as e:   # the earlier rows waiting for the tokenizer first: errors come in row order
            flush()
            bad_row(e if isinstance(e, DataError) else   # else the template or the tokenizer failed on this row
                    unusable(where, json.dumps(conv, ensure_ascii=False, default=str), e), data_cfg, st)
        if len(pending) >= CHUNK:
            flush()
    flush()
    st["samples"] = len(out)
    return out, st


# ----------------------------------------------------------------------------- streaming into shards
def row_chunks(src, size: int):
    """The (where, row) pairs of `src`, `size` at a time: no more of a source is in memory at once."""
    rows = read_rows(src)
    while chunk := list(itertools.islice(rows, size)):
        yield chunk


def tokenize_chunk(rows, src, tokenizer, template, data_cfg) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict]:
    """tokenize_rows on one chunk, as flat int32 ids and labels, int64 lengths, and its counts."""
    out, st = tokenize_rows(rows, src, tokenizer, template, data_cfg)
    lengths = np.fromiter((len(ids) for ids, _ in out), dtype=np.int64, count=len(out))
    flat = lambda k: np.fromiter((t for s in out for t in s[k]), dtype=np.int32, count=int(lengths.sum()))  # noqa: E731
    return flat(0), flat(1), lengths, st


def write_source(writer, src, chunks) -> dict:
    """Append the tokenized chunks of one source (in row order) to the ShardWriter; its counts."""
    st = new_source_stats(src)
    for ids, labels, lengths, part in chunks:
        writer.add(ids, labels, lengths)
        st = merge_stats(src, [st, part])
    if st["rows"] == 0:
        raise DataError(f"{src.path}: no rows")
    return st


class SerialTokenizer:
    """Tokenizes a source in this process, chunk by chunk, into a ShardWriter (prepare.py's
    ParallelTokenizer does the same on a pool of processes)."""

    def __init__(self, tokenizer, template, data_cfg):
        self.tokenizer, self.template, self.data_cfg = tokenizer, template, data_cfg

    def __call__(self, src, writer) -> dict:
        check_columns(src.format, src.columns, f"data source {src.path}")
        chunks = (tokenize_chunk(rows, src, self.tokenizer, self.template, self.data_cfg)
                  for rows in row_chunks(src, CHUNK_ROWS))
        return write_source(writer, src, chunks)
