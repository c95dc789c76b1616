"""Rows of each source format -> one conversation form.

A conversation (turns.Conversation) is a list of turns {"role": system|user|assistant|tool,
"content": str} (assistant turns may carry tool_calls and reasoning_content, see turns.py):
an optional system turn first, then user and assistant turns alternating (an assistant turn
that calls tools is followed by the tools' results), ending with an assistant turn. Its
`tools` are the function schemas offered to the model. `text` rows are the exception:
{"text": str}, every token trains.

Column names are remapped per source (`columns: {instruction: question, output: answer}`),
as LLaMA-Factory's dataset_info does. Every check raises DataError naming the file, the row
and what was expected.
"""
from __future__ import annotations

from typing import Any

from .turns import Conversation, DataError, check_order, parse_tools, parse_turn, type_name

__all__ = ["Conversation", "DataError", "FIELDS", "FORMATS", "check_columns", "to_conversation"]

# sharegpt "from" values (FastChat, LLaMA-Factory) -> roles. function_call turns are the
# assistant calling a tool (trained); observation turns are the tool's answer (not trained).
SHAREGPT_ROLES = {
    "system": "system",
    "human": "user", "user": "user",
    "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant", "bing": "assistant", "bard": "assistant",
    "function_call": "assistant",
    "observation": "tool", "tool": "tool", "function": "tool",
}
MESSAGE_ROLES = {"system": "system", "user": "user", "assistant": "assistant", "tool": "tool",
                 "function": "tool", "ipython": "tool"}

# The fields each format reads (the keys `columns` may remap); REQUIRED: those a row must have.
FIELDS = {
    "alpaca": ("instruction", "output", "input", "system", "history"),
    "sharegpt": ("conversations", "system", "tools", "role_tag", "content_tag"),
    "messages": ("messages", "system", "tools", "role_tag", "content_tag"),
    "prompt_completion": ("prompt", "completion", "system"),
    "text": ("text",),
}
REQUIRED = {"alpaca": ("instruction", "output"), "sharegpt": ("conversations",), "messages": ("messages",),
            "prompt_completion": ("prompt", "completion"), "text": ("text",)}
# Tag settings (not columns): which key of a turn holds the role / the content.
TAG_DEFAULTS = {"sharegpt": ("from", "value"), "messages": ("role", "content")}


def check_columns(fmt: str, columns: dict[str, str], where: str) -> None:
    """A `columns` key that the format does not read is a typo: fail before reading any row."""
    unknown = sorted(set(columns) - set(FIELDS[fmt]))
    if unknown:
        raise DataError(f"{where}: columns: {', '.join(map(repr, unknown))} is not a field of format {fmt!r} "
                        f"(fields: {', '.join(FIELDS[fmt])})")


def _string(row: dict, col: str, where: str, fmt: str, required: bool) -> str:
    if col not in row or row[col] is None:
        if required:
            have = ", ".join(map(repr, row)) or "none"
            raise DataError(f"{where}: missing field {col!r} ({fmt} rows need {' and '.join(REQUIRED[fmt])}; "
                            f"this row has {have}; remap names with the source's columns)")
        return ""
    v = row[col]
    if not isinstance(v, str):
        raise DataError(f"{where}: field {col!r} must be a string, got {type_name(v)}")
    return v


def _system(row, col, where, fmt, default) -> tuple[list[dict], list[str]]:
    """The system turn from the row's column, else data.system_prompt; and its origin."""
    s = _string(row, col, where, fmt, required=False)
    if not (s or default):
        return [], []
    return [{"role": "system", "content": s or default}], [f"field {col!r}" if s else "data.system_prompt"]


def alpaca(row: dict, where: str, columns: dict[str, str], system_prompt: str | None = None) -> Conversation:
    c = {k: columns.get(k, k) for k in FIELDS["alpaca"]}
    instruction = _string(row, c["instruction"], where, "alpaca", True)
    output = _string(row, c["output"], where, "alpaca", True)
    inp = _string(row, c["input"], where, "alpaca", False)
    conv, origin = _system(row, c["system"], where, "alpaca", system_prompt)
    history = row.get(c["history"]) or []
    if not isinstance(history, list):
        raise DataError(f"{where}: field {c['history']!r} must be a list of [instruction, response] pairs, got {type_name(history)}")
    for k, pair in enumerate(history, 1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: {c['history']!r} item {k} must be a pair of strings [instruction, response]")
        conv += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        origin += [f"{c['history']!r} item {k} instruction", f"{c['history']!r} item {k} response"]
    prompt = instruction + ("\n\n" + inp if inp else "")
    conv += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return Conversation(conv, origin=origin + [f"field {c['instruction']!r}", f"field {c['output']!r}"])


def _turns(row: dict, where: str, columns: dict[str, str], fmt: str, roles: dict[str, str],
           system_prompt: str | None) -> Conversation:
    key = "messages" if fmt == "messages" else "conversations"
    list_col = columns.get(key, key)
    tags = (columns.get("role_tag", TAG_DEFAULTS[fmt][0]), columns.get("content_tag", TAG_DEFAULTS[fmt][1]))
    if list_col not in row or row[list_col] is None:
        have = ", ".join(map(repr, row)) or "none"
        raise DataError(f"{where}: missing field {list_col!r} ({fmt} rows need a list of turns; this row has {have}; "
                        "remap names with the source's columns)")
    turns = row[list_col]
    if not isinstance(turns, list):
        raise DataError(f"{where}: field {list_col!r} must be a list of turns, got {type_name(turns)}")
    conv = [parse_turn(t, where, k, tags, roles) for k, t in enumerate(turns, 1)]
    origin = [f"turn {k}" for k in range(1, len(conv) + 1)]   # errors number turns as the row's own list
    check_order(conv, where, origin)
    if conv[0]["role"] != "system":
        system, sys_origin = _system(row, columns.get("system", "system"), where, fmt, system_prompt)
        conv, origin = system + conv, sys_origin + origin
    tools_col = columns.get("tools", "tools")
    return Conversation(conv, tools=parse_tools(row.get(tools_col), where, tools_col), origin=origin)


def sharegpt(row, where, columns, system_prompt=None) -> Conversation:
    return _turns(row, where, columns, "sharegpt", SHAREGPT_ROLES, system_prompt)


def messages(row, where, columns, system_prompt=None) -> Conversation:
    return _turns(row, where, columns, "messages", MESSAGE_ROLES, system_prompt)


def prompt_completion(row, where, columns, system_prompt=None) -> Conversation:
    c = {k: columns.get(k, k) for k in FIELDS["prompt_completion"]}
    prompt = _string(row, c["prompt"], where, "prompt_completion", True)
    completion = _string(row, c["completion"], where, "prompt_completion", True)
    conv, origin = _system(row, c["system"], where, "prompt_completion", system_prompt)
    return Conversation(conv + [{"role": "user", "content": prompt}, {"role": "assistant", "content": completion}],
                        origin=origin + [f"field {c['prompt']!r}", f"field {c['completion']!r}"])


def text(row, where, columns, system_prompt=None) -> dict:
    return {"text": _string(row, columns.get("text", "text"), where, "text", True)}


FORMATS = {"alpaca": alpaca, "sharegpt": sharegpt, "messages": messages,
           "prompt_completion": prompt_completion, "text": text}


def to_conversation(fmt: str, row: Any, where: str, columns: dict[str, str], system_prompt: str | None = None):
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with {fmt} fields, got {type_name(row)}")
    return FORMATS[fmt](row, where, columns, system_prompt)
