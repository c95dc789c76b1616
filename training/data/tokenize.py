"""Conversation -> input_ids + labels (-100 everywhere but the assistant turns that train).

The chat template renders the whole conversation to text, exactly as at inference. Each
trained assistant turn's span is found by rendering prefixes:

    start = len(render(turns before it, add_generation_prompt=True))   # where the model starts writing
    end   = common prefix of render(turns through it) and the full text  # its content + end-of-turn token

The text is tokenized once, and a token is labelled when its character offsets lie wholly
inside a span. So labels are right whatever the tokenizer merges at turn boundaries (a token
that straddles the boundary belongs to the prompt, as at inference), and the tokens are the
ones the model sees at inference.

Which assistant turns train: all of them (`data.train_on: all_assistant`) or the last one
(`last_assistant`); a turn's own loss_weight / weight / train flag overrides both. A tool
call is part of its assistant turn and trains with it; tool results never train. With
`data.train_on_reasoning: false` a turn's reasoning (and the tags around it) is masked and
only what follows it trains.
"""
from __future__ import annotations

import re

from .chat_template import add_template_tokens, for_template, render, resolve_template
from .formats import Conversation, DataError

# render, resolve_template and add_template_tokens live in chat_template.py; importable from here as before
__all__ = ["IGNORE", "add_template_tokens", "assistant_spans", "label_tokens", "render", "resolve_template",
           "tokenize_conversation", "tokenize_text", "trained_turns", "truncate"]
IGNORE = -100
_AFTER_REASONING = re.compile(r"\s*(</[^<>\s]+>|<\|[^<>\s]+\|>)?\s*")   # the closing tag and blank lines


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n          # binary search on the first differing character
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid - 1
    return lo


def trained_turns(conv: Conversation, where: str, train_on: str = "all_assistant",
                  train_on_reasoning: bool = True) -> list[int]:
    """Indices of the assistant turns that train. A trained turn with nothing in it (no text, no
    tool call, no trained reasoning) would train only its end-of-turn token: refused."""
    assistants = [i for i, t in enumerate(conv) if t["role"] == "assistant"]
    out = []
    for i in assistants:
        flag = conv[i].get("train")
        if flag is False or (flag is None and train_on == "last_assistant" and i != assistants[-1]):
            continue
        t = conv[i]
        if not (t["content"].strip() or t.get("tool_calls")
                or (train_on_reasoning and t.get("reasoning_content", "").strip())):
            hint = ", or give the turn loss_weight: 0" if conv.origin[i].startswith("turn") else ""
            raise DataError(f"{where}: {conv.origin[i]} is an empty assistant response (it would train only the "
                            f"end-of-turn token); fill it or drop the row{hint}")
        out.append(i)
    return out


def _check_rendered(text: str, conv: Conversation, at: str) -> None:
    """Every turn's text appears in order: a template that drops a role would silently lose text."""
    pos = 0
    for k, turn in enumerate(conv):
        c = turn["content"].strip()
        i = text.find(c, pos) if c else pos
        if i < 0:
            raise DataError(f"{at}the chat template does not render {conv.origin[k]} ({turn['role']!r}); "
                            "pick a template that supports this role (e.g. model.chat_template: chatml)")
        pos = i + len(c)


def _check_turn_span(turn: dict, part: str, origin: str, at: str) -> None:
    """The span of a trained turn holds its text, its tool calls and its reasoning."""
    names = [call["function"]["name"] for call in turn.get("tool_calls") or []]
    for name in names:
        if part.count(name) < names.count(name):
            raise DataError(f"{at}the chat template does not render tool call {name!r} of "
                            f"{origin}; pick a template that renders tool_calls (e.g. model.chat_template: chatml)")
    reasoning = (turn.get("reasoning_content") or turn.get("thinking") or "").strip()
    if turn["content"].strip() not in part or reasoning not in part:
        raise DataError(f"{at}the chat template renders {origin} differently once later turns follow (it drops "
                        "text or reasoning of earlier turns, as Qwen3's drops their reasoning); set data.train_on: "
                        "last_assistant, or give that turn loss_weight: 0")


def _answer_start(text: str, start: int, end: int, turn: dict) -> int:
    """Where a turn's answer begins after its reasoning and the closing tag (train_on_reasoning: false)."""
    reasoning = (turn.get("reasoning_content") or turn.get("thinking") or "").strip()
    if not reasoning and turn["content"].lstrip().startswith("<think>"):   # folded in by for_template
        reasoning = turn["content"].lstrip()[len("<think>"):].split("</think>")[0].strip()
    i = text.find(reasoning, start, end) if reasoning else -1
    if i < 0:
        return start
    return _AFTER_REASONING.match(text, i + len(reasoning)).end()


def assistant_spans(tokenizer, template: str, conv: Conversation, where: str = "", train_on: str = "all_assistant",
                    train_on_reasoning: bool = True) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the (start, end) character span of each assistant turn that trains."""
    at = f"{where}: " if where else ""
    if not isinstance(conv, Conversation):
        conv = Conversation(conv)
    trained = trained_turns(conv, where or "conversation", train_on, train_on_reasoning)
    msgs = for_template(conv, tokenizer, template)
    shift = len(msgs) - len(conv)    # a tools note may have become a system turn at the front
    try:
        text = render(tokenizer, template, msgs, tools=msgs.tools)
    except Exception as e:  # jinja raises for roles/orders a template rejects
        raise DataError(f"{at}the chat template cannot render this conversation: {type(e).__name__}: {e}") from None
    _check_rendered(text, msgs, at)
    spans = []
    for i in (k + shift for k in trained):
        before = render(tokenizer, template, msgs[:i], add_generation_prompt=True, tools=msgs.tools) if i else ""
        if not text.startswith(before):
            raise DataError(f"{at}the chat template does not render conversations prefix by prefix "
                            "(turn text changes when later turns follow); set model.chat_template to a built-in")
        start, end = len(before), _common_prefix(render(tokenizer, template, msgs[: i + 1], tools=msgs.tools), text)
        _check_turn_span(msgs[i], text[start:end], msgs.origin[i], at)
        if not train_on_reasoning:
            start = _answer_start(text, start, end, msgs[i])
        spans.append((start, end))
    return text, spans


def label_tokens(ids: list[int], offsets: list[tuple[int, int]], spans: list[tuple[int, int]],
                 train_on_prompt: bool = False) -> list[int]:
    labels, j = [], 0
    for tok, (s, e) in zip(ids, offsets):
        while j < len(spans) and spans[j][1] <= s:
            j += 1
        inside = j < len(spans) and spans[j][0] <= s and e <= spans[j][1]
        labels.append(tok if (inside or train_on_prompt) else IGNORE)
    if labels:
        labels[0] = IGNORE   # nothing predicts the first token (and packed samples must not see the previous one)
    return labels


def tokenize_conversation(tokenizer, template: str, conv: Conversation, train_on_prompt: bool = False,
                          where: str = "", **which) -> tuple[list[int], list[int]]:
    """One conversation -> (ids, labels); `which`: train_on, train_on_reasoning (see assistant_spans)."""
    text, spans = assistant_spans(tokenizer, template, conv, where, **which)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    return enc["input_ids"], label_tokens(enc["input_ids"], enc["offset_mapping"], spans, train_on_prompt)


def tokenize_text(tokenizer, text: str) -> tuple[list[int], list[int]]:
    """Raw text for continued pre-training: bos + text + eos, every token trains."""
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    if tokenizer.bos_token_id is not None:
        ids = [tokenizer.bos_token_id] + ids
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids, [IGNORE] + ids[1:]


def truncate(ids: list[int], labels: list[int], max_len: int) -> tuple[list[int], list[int]]:
    """Keep the prompt's start and as much response as fits.

    The prompt (tokens before the first trained one) keeps up to 3/4 of max_len; the response
    gets the rest and is cut at its end.
    """
    if len(ids) <= max_len:
        return ids, labels
    p = next((i for i, l in enumerate(labels) if l != IGNORE), len(ids))
    r = len(ids) - p
    keep_p = min(p, max(max_len - r, max_len - max_len // 4))
    keep_r = max_len - keep_p
    ids, labels = ids[:keep_p] + ids[p: p + keep_r], labels[:keep_p] + labels[p: p + keep_r]
    labels[0] = IGNORE
    return ids, labels
