"""One chat turn of a `messages` or `sharegpt` row -> a normalised turn, and the order checks.

A normalised turn is {"role": system|user|assistant|tool, "content": str}, plus only what the
row gives:

    "tool_calls"         assistant: [{"type": "function", "function": {"name": str, "arguments": dict}, "id"?}]
    "reasoning_content"  assistant: the reasoning trace (rows may call it reasoning or thinking)
    "tool_call_id", "name"  tool: which call this result answers
    "train"              assistant: False (loss_weight 0, weight 0, train false) or True (1, true)

Content is a string, or a list of typed text parts ({"type": "text", "text" or "value": ...})
joined by newlines as vLLM does; null only on an assistant turn that calls tools. Tool call
arguments may be a JSON string (OpenAI) or an object. ShareGPT `function_call` turns hold
{"name": ..., "arguments": ...} (or a list of them) as JSON text, LLaMA-Factory style.
"""
from __future__ import annotations

import json
from typing import Any

from zerotune.core.errors import UserError


class DataError(UserError, ValueError):
    """Bad input data. The message names the file and row; print it as is."""


class Conversation(list):
    """A list of turns, with the function schemas offered to the model (`tools`, None when
    none) and, per turn, where it came from in the row (`origin`, e.g. "turn 3", for errors)."""

    def __init__(self, turns=(), tools: list | None = None, origin: list[str] | None = None):
        super().__init__(turns)
        self.tools = tools or None
        self.origin = origin if origin is not None else [f"turn {k}" for k in range(1, len(self) + 1)]


TEXT_PARTS = ("text", "input_text", "output_text")
REASONING_KEYS = ("reasoning_content", "reasoning", "thinking")
TRAIN_KEYS = ("loss_weight", "weight", "train")


def type_name(v: Any) -> str:
    return "null" if v is None else {"str": "string", "dict": "object", "list": "list"}.get(type(v).__name__, type(v).__name__)


def text_of(value: Any, at: str) -> str:
    """A string, or a list of text parts joined by newlines. `at` names the field in errors."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise DataError(f"{at} must be a string or a list of text parts, got {type_name(value)}")
    texts = []
    for n, part in enumerate(value, 1):
        if not isinstance(part, dict) or "type" not in part:
            raise DataError(f"{at} part {n} must be an object with 'type' and 'text', got {type_name(part)}")
        if part["type"] not in TEXT_PARTS:
            raise DataError(f"{at} part {n} has type {part['type']!r}; only text parts can be trained on "
                            "(type 'text' with a 'text' or 'value' string)")
        text = part.get("text", part.get("value"))
        if not isinstance(text, str):
            raise DataError(f"{at} part {n} has no 'text' (or 'value') string")
        texts.append(text)
    return "\n".join(texts)


def parse_json(value: Any, at: str, verb: str = "is") -> Any:
    """A JSON string parsed; anything else as it is."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        pos = f"column {e.colno}" if e.lineno == 1 else f"line {e.lineno} column {e.colno}"
        raise DataError(f"{at} {verb} not valid JSON ({pos}: {e.msg})") from None


def tool_call(call: Any, at: str) -> dict:
    """One call, OpenAI ({"id", "type", "function": {"name", "arguments"}}) or flat ({"name", "arguments"})."""
    if not isinstance(call, dict):
        raise DataError(f"{at} must be an object with a function 'name' and 'arguments', got {type_name(call)}")
    fn = call["function"] if isinstance(call.get("function"), dict) else call
    name = fn.get("name")
    if not isinstance(name, str) or not name:
        raise DataError(f"{at} has no function 'name'")
    args = parse_json(fn.get("arguments", fn.get("parameters", {})), f"{at} ({name!r}): arguments", "are")
    if not isinstance(args, dict):
        raise DataError(f"{at} ({name!r}): arguments must be a JSON object, got {type_name(args)}")
    out = {"type": "function", "function": {"name": name, "arguments": args}}
    if call.get("id") is not None:
        out["id"] = str(call["id"])
    return out


def tool_calls(value: Any, at: str) -> list[dict]:
    calls = value if isinstance(value, list) else [value]
    return [tool_call(c, f"{at} {n}") for n, c in enumerate(calls, 1)]


def parse_tools(value: Any, where: str, col: str) -> list[dict] | None:
    """The `tools` column: a list of function schemas (or its JSON text); [] and "[]" mean none.
    Flat schemas ({"name", "parameters"}) are wrapped as OpenAI's {"type": "function", "function": ...}."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    tools = parse_json(value, f"{where}: field {col!r}")
    if isinstance(tools, dict):
        tools = [tools]
    if not isinstance(tools, list):
        raise DataError(f"{where}: field {col!r} must be a list of tool definitions (or its JSON text), got {type_name(tools)}")
    out = []
    for n, t in enumerate(tools, 1):
        fn = t.get("function", t) if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise DataError(f"{where}: field {col!r} item {n} must be a function schema with a 'name'")
        out.append(t if "function" in t else {"type": "function", "function": t})
    return out or None


def train_flag(turn: dict, role: str, at: str) -> bool | None:
    """loss_weight / weight (0 or 1) or train (true/false); None when the turn does not say."""
    for key in TRAIN_KEYS:
        v = turn.get(key)
        if v is None:
            continue
        ok = isinstance(v, bool) if key == "train" else (not isinstance(v, bool) and v in (0, 1))
        if not ok:
            raise DataError(f"{at} {key!r} must be {'true or false' if key == 'train' else '0 or 1'}, got {v!r}")
        if v and role != "assistant":
            raise DataError(f"{at} is a {role!r} turn with {key}: {json.dumps(v)}; only assistant turns train")
        return bool(v)
    return None


def parse_turn(t: Any, where: str, k: int, tags: tuple[str, str], roles: dict[str, str]) -> dict:
    """Row turn k -> a normalised turn (see the module docstring)."""
    role_tag, content_tag = tags
    at = f"{where}: turn {k}"
    if not isinstance(t, dict):
        raise DataError(f"{at} must be an object with {role_tag!r} and {content_tag!r}, got {type_name(t)}")
    if role_tag not in t:
        raise DataError(f"{at} has no {role_tag!r} key (expected {role_tag!r} and {content_tag!r})")
    raw = t[role_tag]
    if raw not in roles:
        raise DataError(f"{at} has unknown role {raw!r} (expected one of {', '.join(map(repr, roles))})")
    role = roles[raw]
    calls = t.get("tool_calls") or ([t["function_call"]] if t.get("function_call") else [])
    if content_tag not in t and not (role == "assistant" and calls):
        raise DataError(f"{at} has no {content_tag!r} key (expected {role_tag!r} and {content_tag!r})")
    content = t.get(content_tag)
    if raw == "function_call":   # sharegpt: the call itself is the turn's text
        calls, content = parse_json(content, f"{at} ('function_call')"), None
    if content is None and not (role == "assistant" and calls):
        raise DataError(f"{at} {content_tag!r} must be a string or a list of text parts, got null")
    turn = {"role": role, "content": "" if content is None else text_of(content, f"{at} {content_tag!r}")}
    if role == "assistant":
        if calls:
            turn["tool_calls"] = tool_calls(calls, f"{at} tool call")
        reasoning = next((t[key] for key in REASONING_KEYS if t.get(key) is not None), None)
        if reasoning is not None:
            turn["reasoning_content"] = text_of(reasoning, f"{at} reasoning")
    if role == "tool":
        for key in ("tool_call_id", "name"):
            if t.get(key) is not None:
                turn[key] = str(t[key])
    flag = train_flag(t, role, at)
    if flag is not None:
        turn["train"] = flag
    return turn


def check_order(conv: list[dict], where: str, origin: list[str]) -> None:
    """System first (optional); then user and assistant turns alternating, where an assistant
    turn with tool_calls is followed by the tools' results ('tool' turns) and then an assistant
    turn again; the assistant speaks last. Errors name the turn as the row numbers it."""
    start = 1 if conv and conv[0]["role"] == "system" else 0
    if start == len(conv):
        raise DataError(f"{where}: empty conversation (expected user and assistant turns)")
    prev, calls = None, None    # the previous turn's role; the tool calls awaiting results
    for i in range(start, len(conv)):
        t, at = conv[i], f"{where}: {origin[i]}"
        role = t["role"]
        if role == "system":
            raise DataError(f"{at} is a system turn; only the first turn may be one")
        if role == "tool":
            if not calls:
                raise DataError(f"{at} is a tool result with no tool call before it "
                                "(a 'tool' turn must follow an assistant turn with tool_calls)")
            _check_call_id(t, calls, at)
        elif prev == "assistant" and calls:
            raise DataError(f"{at} is {role!r} but the tool calls before it have no results "
                            "(expected 'tool' turns after an assistant turn with tool_calls)")
        else:
            want = {None: ("user",), "user": ("assistant",), "assistant": ("user",), "tool": ("assistant", "tool")}[prev]
            if role not in want:
                raise DataError(f"{at} is {role!r} but the conversation must alternate user/tool and assistant "
                                f"turns (expected {' or '.join(map(repr, want))})")
        if role != "tool":
            calls = t.get("tool_calls") if role == "assistant" else None
        prev = role
    if prev != "assistant":
        raise DataError(f"{where}: the last turn is {prev!r}; expected it to be the assistant's "
                        "(nothing to train on after it)")


def _check_call_id(result: dict, calls: list[dict], at: str) -> None:
    ids = [c["id"] for c in calls if "id" in c]
    if "tool_call_id" in result and ids and result["tool_call_id"] not in ids:
        raise DataError(f"{at} answers tool_call_id {result['tool_call_id']!r}, which no call of the assistant "
                        f"turn before it has (its ids: {', '.join(map(repr, ids))})")
