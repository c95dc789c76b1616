"""Rows of each source format -> one conversation form: a list of {"role", "content"} turns."""
from __future__ import annotations

from typing import Any

Conversation = list[dict[str, str]]


class DataError(ValueError):
    user_facing = True

    """Bad input data. The message names the file and row."""


def alpaca(row: dict[str, Any], where: str, columns: dict[str, str]) -> Conversation:
    col = {k: columns.get(k, k) for k in ("instruction", "input", "output", "system")}
    for k in ("instruction", "output"):
        if col[k] not in row:
            raise DataError(f"{where}: missing field {col[k]!r} (alpaca rows need instruction and output)")
        if not isinstance(row[col[k]], str):
            raise DataError(f"{where}: field {col[k]!r} must be a string, got {type(row[col[k]]).__name__}")
    inp = row.get(col["input"]) or ""
    if not isinstance(inp, str):
        raise DataError(f"{where}: field {col['input']!r} must be a string, got {type(inp).__name__}")
    prompt = row[col["instruction"]] + ("\n\n" + inp if inp else "")
    conv: Conversation = []
    if row.get(col["system"]):
        conv.append({"role": "system", "content": row[col["system"]]})
    conv += [{"role": "user", "content": prompt}, {"role": "assistant", "content": row[col["output"]]}]
    return conv


FORMATS = {"alpaca": alpaca}
