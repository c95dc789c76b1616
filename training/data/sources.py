"""Where rows come from: local .json/.jsonl/.parquet/.csv files, a folder of them, a
`datasets.save_to_disk` folder, or a Hugging Face hub id.

    for where, row in read_rows(source):   # where = "data.jsonl line 7": used in every error
        ...
    content_hash(source)                     # part of the tokenized-cache key

JSON, JSON lines and CSV are parsed here (so errors carry line numbers; CSV values are
strings); parquet is streamed in record batches with pyarrow; saved and hub datasets go
through `datasets` (memory-mapped Arrow, rows read one at a time).
"""
from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Iterator

from .formats import DataError

SUFFIXES = (".json", ".jsonl", ".parquet", ".csv")


def _is_saved_dataset(p: Path) -> bool:
    return p.is_dir() and ((p / "dataset_info.json").is_file() or (p / "dataset_dict.json").is_file()
                           or (p / "state.json").is_file())


def files_of(path: str) -> list[Path]:
    """The files a local source path stands for (one file, or the data files of a folder)."""
    p = Path(path)
    if p.is_file():
        if p.suffix not in SUFFIXES:
            raise DataError(f"{p}: unsupported file type {p.suffix!r} (expected {', '.join(SUFFIXES)})")
        return [p]
    if p.is_dir() and not _is_saved_dataset(p):
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix in SUFFIXES)
        if not files:
            raise DataError(f"{p}: folder holds no {', '.join(SUFFIXES)} files")
        return files
    return []


def _json_rows(p: Path) -> Iterator[tuple[str, object]]:
    """A .json file holds a list of rows (or JSON lines, as some exports do); read whole."""
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{p}: not UTF-8 text (byte {e.start})") from None
    if not text.strip():
        raise DataError(f"{p}: empty file (expected a JSON list of rows)")
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        if text.lstrip().startswith("{"):   # JSON lines saved as .json
            yield from _jsonl_lines(p, text.splitlines())
            return
        raise DataError(f"{p}: not valid JSON (line {e.lineno} column {e.colno}: {e.msg})") from None
    if isinstance(rows, dict):
        rows = [rows]
    if not isinstance(rows, list):
        raise DataError(f"{p}: expected a JSON list of rows, got {type(rows).__name__}")
    for n, row in enumerate(rows, 1):
        yield f"{p} row {n}", row


def _jsonl_rows(p: Path) -> Iterator[tuple[str, object]]:
    """A .jsonl file is streamed line by line (it may be larger than memory)."""
    def lines():
        with open(p, "rb") as fh:
            for n, raw in enumerate(fh, 1):
                try:
                    yield raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    yield DataError(f"{p} line {n}: not UTF-8 text (byte {e.start} of the line)")
    yield from _jsonl_lines(p, lines())


def _jsonl_lines(p: Path, lines) -> Iterator[tuple[str, object]]:
    seen = False
    for n, line in enumerate(lines, 1):
        if isinstance(line, DataError):
            seen = True
            yield f"{p} line {n}", line
            continue
        if not line.strip():
            continue
        seen = True
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            yield f"{p} line {n}", DataError(f"{p} line {n}: not valid JSON (column {e.colno}: {e.msg})")
            continue
        yield f"{p} line {n}", row
    if not seen:
        raise DataError(f"{p}: empty file (expected one JSON object per line)")


def _arrow_rows(ds, label: str, offset: int = 1) -> Iterator[tuple[str, object]]:
    for n, row in enumerate(ds, offset):
        yield f"{label} row {n}", row


def _load_datasets(source):
    import datasets
    datasets.disable_progress_bars()
    p = Path(source.path)
    if _is_saved_dataset(p):
        ds = datasets.load_from_disk(str(p))
        if isinstance(ds, datasets.DatasetDict):
            if source.split not in ds:
                raise DataError(f"{p}: split {source.split!r} not found (splits: {', '.join(ds)})")
            ds = ds[source.split]
        return ds
    if p.exists() or source.path.startswith((".", "/", "~")):
        raise DataError(f"{source.path}: not a data file, data folder or saved dataset")
    try:
        return datasets.load_dataset(source.path, source.name, split=source.split)
    except Exception as e:  # hub errors are many; name the source and the cause in one line
        raise DataError(f"{source.path}: cannot load the hub dataset (split {source.split!r}): "
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from None


def read_rows(source) -> Iterator[tuple[str, object]]:
    """(where, row) pairs; a row that cannot even be parsed is yielded as a DataError."""
    files = files_of(source.path)
    if not files:
        yield from _arrow_rows(_load_datasets(source), source.path)
        return
    for f in files:
        if f.suffix in (".json", ".jsonl"):
            yield from (_json_rows(f) if f.suffix == ".json" else _jsonl_rows(f))
            continue
        if f.stat().st_size == 0:
            raise DataError(f"{f}: empty file")
        yield from (_csv_rows(f) if f.suffix == ".csv" else _arrow_file_rows(f))


def _arrow_file_rows(f: Path) -> Iterator[tuple[str, object]]:
    """Parquet, streamed in record batches (rows numbered from 1)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    try:
        batches = pq.ParquetFile(f).iter_batches(batch_size=1024)
        n = 0
        for batch in batches:
            for row in batch.to_pylist():
                n += 1
                yield f"{f} row {n}", row
    except (pa.ArrowInvalid, OSError) as e:
        raise DataError(f"{f}: cannot read as parquet: {str(e).splitlines()[0]}") from None


def _csv_rows(f: Path) -> Iterator[tuple[str, object]]:
    """CSV with a header line; every value is a string. Row N is line N + 1 of the file."""
    with open(f, newline="", encoding="utf-8") as fh:
        reader = csv.DictReader(fh)
        try:
            for n, row in enumerate(reader, 1):
                if None in row:
                    yield f"{f} row {n}", DataError(f"{f} row {n}: more values than the {len(reader.fieldnames)} header columns")
                    continue
                yield f"{f} row {n}", {k: v for k, v in row.items() if v is not None}
        except (csv.Error, UnicodeDecodeError) as e:
            raise DataError(f"{f} line {reader.line_num}: not valid CSV ({e})") from None


def content_hash(source) -> str:
    """Hash of what a source reads: file bytes for local files, the Arrow fingerprint otherwise."""
    h = hashlib.sha256()
    files = files_of(source.path)
    if files:
        for f in files:
            h.update(str(f.relative_to(source.path) if f != Path(source.path) else f.name).encode())
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 22), b""):
                    h.update(chunk)
    else:
        ds = _load_datasets(source)
        h.update(f"{source.path}|{source.name}|{source.split}|{getattr(ds, '_fingerprint', '')}".encode())
    return h.hexdigest()[:20]
