"""The chat template: which one (`model.chat_template`), the tokens it needs, and rendering.

    template = resolve_template(tokenizer, recipe.model.chat_template)
    conv = for_template(conv, tokenizer, template)       # what the template ignores goes into the text
    text = render(tokenizer, template, conv, tools=conv.tools)

Tools, tool calls and reasoning reach the template as transformers passes them
(`apply_chat_template(messages, tools=...)`, assistant `tool_calls`, `reasoning_content`). A
template that ignores one of them (found once per template by rendering a probe) gets it
written into the text instead, so nothing the data holds is silently lost:

    tools       "You can call these tools:\\n" + the JSON list, at the end of the system turn
    tool_calls  one {"name": ..., "arguments": {...}} line per call after the answer's text
    reasoning   "<think>\\n" + reasoning + "\\n</think>\\n\\n" before the answer's text
"""
from __future__ import annotations

import json
from pathlib import Path

from .templates import BUILTIN, SPECIAL_TOKENS
from .turns import Conversation, DataError

CHOICES = f"a built-in ({', '.join(BUILTIN)}; 'alpaca' suits base models), a .jinja file or a Jinja template string"


def _is_template(s: str) -> bool:
    return "{{" in s or "{%" in s


def read_template_file(name: str) -> str:
    """model.chat_template given as a path to a .jinja file; a relative path is taken from the
    working directory."""
    path = Path(name).expanduser()
    full = path if path.is_absolute() else Path.cwd() / path
    if not full.is_file():
        raise DataError(f"model.chat_template: template file {name!r} not found (tried {full})")
    text = full.read_text(encoding="utf-8")
    if not _is_template(text):
        raise DataError(f"model.chat_template: {full} holds no Jinja template (no {{{{ or {{% in it)")
    return text


def resolve_template(tokenizer, chat_template: str | None) -> str:
    """The Jinja template to render with: the tokenizer's own, a built-in by name, a .jinja file
    or the string itself."""
    if chat_template is None:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.chat_template
        raise DataError(f"model.chat_template: the tokenizer has no chat_template; set model.chat_template to {CHOICES}")
    if chat_template in BUILTIN:
        return BUILTIN[chat_template]
    if _is_template(chat_template):
        return chat_template
    if chat_template.endswith((".jinja", ".j2")) or "/" in chat_template:
        return read_template_file(chat_template)
    raise DataError(f"model.chat_template: {chat_template!r} is neither a built-in ({', '.join(BUILTIN)}), "
                    "a .jinja file nor a Jinja template")


def add_template_tokens(tokenizer, chat_template: str | None) -> list[str]:
    """Add the special tokens a built-in template needs and the tokenizer lacks; returns them.

    The model's embeddings must then grow to len(tokenizer) (model.resize_token_embeddings).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS.get(chat_template or "", []) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return missing


def render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool = False,
           tools: list | None = None) -> str:
    return tokenizer.apply_chat_template(list(messages), tools=tools, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


# ----------------------------------------------------------------------------- what a template renders
_PROBE_USER = {"role": "user", "content": "zt-probe-question"}
_PROBE_TOOL = {"type": "function", "function": {"name": "zt_probe_tool", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}
_PROBE_CALL = {"id": "ztprobe01", "type": "function", "function": {"name": "zt_probe_call", "arguments": {}}}
_FEATURES: dict[str, dict] = {}


def _renders(tokenizer, template, messages, needle, tools=None) -> bool:
    try:
        return needle in render(tokenizer, template, messages, tools=tools)
    except Exception:   # a template may reject what it does not know: then it does not render it
        return False


def features(tokenizer, template: str) -> dict:
    """{"tools": bool, "tool_calls": bool, "reasoning_key": "reasoning_content" | "thinking" | None}:
    what the template renders, found by rendering probes (once per template)."""
    if template not in _FEATURES:
        answer = {"role": "assistant", "content": "zt-probe-answer"}
        _FEATURES[template] = {
            "tools": _renders(tokenizer, template, [_PROBE_USER, answer], "zt_probe_tool", tools=[_PROBE_TOOL]),
            "tool_calls": _renders(tokenizer, template, [_PROBE_USER, {**answer, "tool_calls": [_PROBE_CALL]}],
                                   "zt_probe_call"),
            "reasoning_key": next((k for k in ("reasoning_content", "thinking") if _renders(
                tokenizer, template, [_PROBE_USER, {**answer, k: "zt-probe-reasoning"}], "zt-probe-reasoning")), None),
        }
    return _FEATURES[template]


def call_text(call: dict) -> str:
    return json.dumps({"name": call["function"]["name"], "arguments": call["function"]["arguments"]}, ensure_ascii=False)


def think_text(reasoning: str) -> str:
    return f"<think>\n{reasoning.strip()}\n</think>\n\n"


def _fold(turn: dict, f: dict) -> dict:
    """One turn as the template takes it: reasoning and tool calls it ignores go into the content."""
    t = dict(turn)
    if "reasoning_content" in t and f["reasoning_key"] != "reasoning_content":
        reasoning = t.pop("reasoning_content")
        if f["reasoning_key"]:
            t[f["reasoning_key"]] = reasoning
        elif reasoning.strip():
            t["content"] = think_text(reasoning) + t["content"]
    if t.get("tool_calls") and not f["tool_calls"]:
        calls = "\n".join(call_text(c) for c in t.pop("tool_calls"))
        t["content"] = (t["content"] + "\n" if t["content"] else "") + calls
    return t


def for_template(conv: Conversation, tokenizer, template: str) -> Conversation:
    """The conversation as the template takes it (see the module docstring). A tools note may
    become a new system turn at the front: its origin is "field 'tools'"."""
    f = features(tokenizer, template)
    turns, origin, tools = [_fold(t, f) for t in conv], list(conv.origin), conv.tools
    if tools and not f["tools"]:
        note = "You can call these tools:\n" + json.dumps(tools, ensure_ascii=False)
        if turns and turns[0]["role"] == "system":
            turns[0] = {**turns[0], "content": turns[0]["content"] + "\n\n" + note}
        else:
            turns, origin = [{"role": "system", "content": note}, *turns], ["field 'tools'", *origin]
        tools = None
    return Conversation(turns, tools=tools, origin=origin)
