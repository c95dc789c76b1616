"""Rows of each source format -> one conversation form.

A conversation is a list of turns {"role": system|user|assistant|tool, "content": str}:
an optional system turn first, then user (or tool) and assistant turns alternating, ending
with an assistant turn. `text` rows are the exception: {"text": str}, every token trains.

Column names are remapped per source (`columns: {instruction: question, output: answer}`),
as LLaMA-Factory's dataset_info does. Every check raises DataError naming the file, the row
and what was expected.
"""
from __future__ import annotations

import json
from typing import Any
from zerotune.core.errors import UserError

Conversation = list[dict[str, str]]


class DataError(UserError, ValueError):
    """Bad input data. The message names the file and row; print it as is."""


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


def _type(v: Any) -> str:
    return "null" if v is None else {"str": "string", "dict": "object", "list": "list"}.get(type(v).__name__, type(v).__name__)


def _string(row: dict, col: str, where: str, fmt: str, required: bool) -> str:
    if col not in row or row[col] is None:
        if required:
            have = ", ".join(map(repr, row)) or "none"
            raise DataError(f"{where}: missing field {col!r} ({fmt} rows need {' and '.join(REQUIRED[fmt])}; "
                            f"this row has {have}; remap names with the source's columns)")
        return ""
    v = row[col]
    if not isinstance(v, str):
        raise DataError(f"{where}: field {col!r} must be a string, got {_type(v)}")
    return v


def _check_order(conv: Conversation, where: str) -> Conversation:
    """System first (optional), then user/tool and assistant alternating, assistant last."""
    turns = conv[1:] if conv and conv[0]["role"] == "system" else conv
    if not turns:
        raise DataError(f"{where}: empty conversation (expected user and assistant turns)")
    for i, t in enumerate(turns):
        want = ("user", "tool") if i % 2 == 0 else ("assistant",)
        if t["role"] not in want:
            n = i + (len(conv) - len(turns)) + 1
            raise DataError(f"{where}: turn {n} is {t['role']!r} but the conversation must alternate "
                            f"user/tool and assistant turns (expected {' or '.join(map(repr, want))})")
    if turns[-1]["role"] != "assistant":
        raise DataError(f"{where}: the last turn is {turns[-1]['role']!r}; expected it to be the assistant's "
                        "(nothing to train on after it)")
    return conv


def _system(row, col, where, fmt, default):
    s = _string(row, col, where, fmt, required=False)
    return [{"role": "system", "content": s or default}] if (s or default) else []


def _tools_text(row: dict, col: str, where: str) -> str:
    tools = row.get(col)
    if tools in (None, "", []):
        return ""
    if isinstance(tools, str):
        return tools
    if isinstance(tools, (list, dict)):
        return json.dumps(tools, ensure_ascii=False)
    raise DataError(f"{where}: field {col!r} must be a JSON string or a list of tool definitions, got {_type(tools)}")


def _with_tools(conv: Conversation, tools: str) -> Conversation:
    """Tool definitions go into the system turn (templates differ too much in how they take `tools`)."""
    if not tools:
        return conv
    note = "You can call these tools:\n" + tools
    if conv and conv[0]["role"] == "system":
        return [{"role": "system", "content": conv[0]["content"] + "\n\n" + note}, *conv[1:]]
    return [{"role": "system", "content": note}, *conv]


def alpaca(row: dict, where: str, columns: dict[str, str], system_prompt: str | None = None) -> Conversation:
    c = {k: columns.get(k, k) for k in FIELDS["alpaca"]}
    instruction = _string(row, c["instruction"], where, "alpaca", True)
    output = _string(row, c["output"], where, "alpaca", True)
    inp = _string(row, c["input"], where, "alpaca", False)
    conv = _system(row, c["system"], where, "alpaca", system_prompt)
    history = row.get(c["history"]) or []
    if not isinstance(history, list):
        raise DataError(f"{where}: field {c['history']!r} must be a list of [instruction, response] pairs, got {_type(history)}")
    for k, pair in enumerate(history, 1):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
            raise DataError(f"{where}: {c['history']!r} item {k} must be a pair of strings [instruction, response]")
        conv += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
    prompt = instruction + ("\n\n" + inp if inp else "")
    conv += [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]
    return conv


def _turns(row: dict, where: str, columns: dict[str, str], fmt: str, roles: dict[str, str],
           system_prompt: str | None) -> Conversation:
    key = "messages" if fmt == "messages" else "conversations"
    list_col = columns.get(key, key)
    role_tag = columns.get("role_tag", TAG_DEFAULTS[fmt][0])
    content_tag = columns.get("content_tag", TAG_DEFAULTS[fmt][1])
    if list_col not in row or row[list_col] is None:
        have = ", ".join(map(repr, row)) or "none"
        raise DataError(f"{where}: missing field {list_col!r} ({fmt} rows need a list of turns; this row has {have}; "
                        "remap names with the source's columns)")
    turns = row[list_col]
    if not isinstance(turns, list):
        raise DataError(f"{where}: field {list_col!r} must be a list of turns, got {_type(turns)}")
    conv: Conversation = []
    for k, t in enumerate(turns, 1):
        if not isinstance(t, dict):
            raise DataError(f"{where}: turn {k} must be an object with {role_tag!r} and {content_tag!r}, got {_type(t)}")
        for tag in (role_tag, content_tag):
            if tag not in t:
                raise DataError(f"{where}: turn {k} has no {tag!r} key (expected {role_tag!r} and {content_tag!r})")
        role, content = t[role_tag], t[content_tag]
        if role not in roles:
            raise DataError(f"{where}: turn {k} has unknown role {role!r} (expected one of {', '.join(map(repr, roles))})")
        if not isinstance(content, str):
            raise DataError(f"{where}: turn {k} {content_tag!r} must be a string, got {_type(content)}")
        if roles[role] == "system" and k > 1:
            raise DataError(f"{where}: turn {k} is a system turn; only the first turn may be one")
        conv.append({"role": roles[role], "content": content})
    _check_order(conv, where)   # turn numbers in errors are those of the row's own list
    if not (conv and conv[0]["role"] == "system"):
        conv = _system(row, columns.get("system", "system"), where, fmt, system_prompt) + conv
    return _with_tools(conv, _tools_text(row, columns.get("tools", "tools"), where))


def sharegpt(row, where, columns, system_prompt=None) -> Conversation:
    return _turns(row, where, columns, "sharegpt", SHAREGPT_ROLES, system_prompt)


def messages(row, where, columns, system_prompt=None) -> Conversation:
    return _turns(row, where, columns, "messages", MESSAGE_ROLES, system_prompt)


def prompt_completion(row, where, columns, system_prompt=None) -> Conversation:
    c = {k: columns.get(k, k) for k in FIELDS["prompt_completion"]}
    prompt = _string(row, c["prompt"], where, "prompt_completion", True)
    completion = _string(row, c["completion"], where, "prompt_completion", True)
    return _system(row, c["system"], where, "prompt_completion", system_prompt) + [
        {"role": "user", "content": prompt}, {"role": "assistant", "content": completion}]


def text(row, where, columns, system_prompt=None) -> dict:
    return {"text": _string(row, columns.get("text", "text"), where, "text", True)}


FORMATS = {"alpaca": alpaca, "sharegpt": sharegpt, "messages": messages,
           "prompt_completion": prompt_completion, "text": text}


def to_conversation(fmt: str, row: Any, where: str, columns: dict[str, str], system_prompt: str | None = None):
    if not isinstance(row, dict):
        raise DataError(f"{where}: expected an object with {fmt} fields, got {_type(row)}")
    return FORMATS[fmt](row, where, columns, system_prompt)
