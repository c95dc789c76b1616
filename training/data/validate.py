"""Check every row of every data source before any GPU time is spent (the launcher calls this
before torchrun; `zerotune data validate RECIPE` runs it by hand).

    report = validate_sources(recipe)              # rows only: no tokenizer, no torch, no transformers
    report = validate_sources(recipe, tokenizer)   # also render + tokenize every row, as training will

Without a tokenizer each row is parsed and turned into its conversation: fields and types,
turn order, tool calls (valid JSON arguments, a result only after a call), content parts, and
no assistant turn that trains is empty. With a tokenizer, every row is also rendered with the
chat template and tokenized exactly as training does (template problems, a row the tokenizer
cannot encode, over-long samples, the data.max_len warnings: a max_len that cuts every sample, a
prompt longer than max_len), but nothing is cached or kept in memory beyond one source's samples.

A bad row raises its one-line DataError (data.on_bad_rows: error), or is counted (skip); a
training set with no usable row raises one line naming every source and its counts.
"""
from __future__ import annotations

import time

from .build import no_samples_error, prepare_tokenizer, truncation_warnings
from .formats import DataError, check_columns
from .samples import bad_row, conversations, new_source_stats, tokenize_source
from .sources import read_rows
from .tokenize import trained_turns


def check_source(src, data_cfg) -> dict:
    """Parse and convert every row of one source (no tokenizer); its counts, as tokenize_source's."""
    st = new_source_stats(src)
    check_columns(src.format, src.columns, f"data source {src.path}")
    for where, conv in conversations(read_rows(src), src, data_cfg, st):
        try:
            if src.format == "text" or trained_turns(conv, where, data_cfg.train_on, data_cfg.train_on_reasoning):
                st["samples"] += 1
            else:
                st["dropped_no_target"] += 1
        except DataError as e:
            bad_row(e, data_cfg, st)
    if st["rows"] == 0:
        raise DataError(f"{src.path}: no rows")
    return st


def validate_sources(recipe, tokenizer=None) -> dict:
    """{"sources": [counts per source], "rows", "bad_rows", "warnings", "seconds"}; raises DataError."""
    t0 = time.perf_counter()
    d = recipe.data
    sources = []
    if tokenizer is None:
        sources = [check_source(src, d) for src in d.train] + [{**check_source(src, d), "eval": True} for src in d.eval]
    else:
        template, _ = prepare_tokenizer(recipe, tokenizer)
        for src, is_eval in [*((s, False) for s in d.train), *((s, True) for s in d.eval)]:
            st = tokenize_source(src, tokenizer, template, d)[1]
            sources.append({**st, "eval": True} if is_eval else st)
    train = [st for st in sources if not st.get("eval")]
    if sum(st["samples"] for st in train) == 0:
        raise no_samples_error(train)
    return {"sources": sources, "rows": sum(st["rows"] for st in sources),
            "bad_rows": sum(st["bad_rows"] for st in sources),
            "warnings": truncation_warnings(sources, d.max_len) if tokenizer is not None else [],
            "seconds": round(time.perf_counter() - t0, 3)}
