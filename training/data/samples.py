"""One source -> tokenized samples [(input_ids, labels)] and its counts.

    samples, stats = tokenize_source(src, tokenizer, template, recipe.data)

Rows are read (sources.py), turned into one conversation form (formats.py), rendered with
the chat template and labelled (tokenize.py), then tokenized in chunks of CHUNK rows per
tokenizer call. A bad row raises a one-line DataError, or with `data.on_bad_rows: skip` is
skipped and counted (the first three messages are kept for `zerotune data preview`).
"""
from __future__ import annotations

import itertools

import numpy as np

from .formats import DataError, check_columns, to_conversation
from .sources import read_rows
from .tokenize import IGNORE, assistant_spans, label_tokens, tokenize_text, truncate

CHUNK = 256          # rows tokenized per tokenizer call
CHUNK_ROWS = 1024    # rows read, tokenized and written to the shards at a time by the one-process build


def new_source_stats(src) -> dict:
    return {"path": src.path, "format": src.format, "rows": 0, "samples": 0, "bad_rows": 0, "bad_examples": [],
            "truncated": 0, "dropped_too_long": 0, "dropped_no_target": 0, "longest": 0}


def merge_stats(src, parts: list[dict]) -> dict:
    """The counts of one source from those of its chunks (tokenized apart, in order)."""
    st = new_source_stats(src)
    for p in parts:
        for k in ("rows", "samples", "bad_rows", "truncated", "dropped_too_long", "dropped_no_target"):
            st[k] += p[k]
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


def tokenize_rows(rows, src, tokenizer, template, data_cfg, limit: int | None = None) -> tuple[list, dict]:
    """tokenize_source on some (where, row) pairs of `src` (prepare.py hands chunks to workers)."""
    st = new_source_stats(src)
    out: list[tuple[list[int], list[int]]] = []
    pending: list[tuple[str, list]] = []   # (text, spans) awaiting one batched tokenizer call

    def add(ids, labels) -> None:
        st["longest"] = max(st["longest"], len(ids))
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
        enc = tokenizer([p[0] for p in pending], add_special_tokens=False, return_offsets_mapping=True, verbose=False)
        for (_, spans), ids, offs in zip(pending, enc["input_ids"], enc["offset_mapping"]):
            add(ids, label_tokens(ids, offs, spans, data_cfg.train_on_prompt))
        pending.clear()

    for where, conv in conversations(rows, src, data_cfg, st, limit):
        try:
            if src.format == "text":
                add(*tokenize_text(tokenizer, conv["text"]))
            else:
                pending.append(assistant_spans(tokenizer, template, conv, where, data_cfg.train_on,
                                               data_cfg.train_on_reasoning))
        except DataError as e:
            bad_row(e, data_cfg, st)
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
