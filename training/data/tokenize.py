"""Conversation -> input_ids + labels (-100 on everything but assistant turns).

The chat template renders the conversation to text; assistant spans are found by rendering
prefixes (text before turn i with the generation prompt, text through turn i), and tokens are
labelled by their character offsets in the whole text. Labelling by offsets is right whatever
the tokenizer merges at turn boundaries.
"""
from __future__ import annotations

from .formats import Conversation, DataError
from .templates import BUILTIN

IGNORE = -100


def resolve_template(tokenizer, chat_template: str | None) -> str:
    if chat_template is None:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.chat_template
        raise DataError(
            "the tokenizer has no chat_template: set model.chat_template to a built-in "
            f"({', '.join(BUILTIN)}) or a Jinja string")
    return BUILTIN.get(chat_template, chat_template)


def render(tokenizer, template: str, messages: Conversation, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


def assistant_spans(tokenizer, template: str, conv: Conversation) -> tuple[str, list[tuple[int, int]]]:
    text = render(tokenizer, template, conv)
    spans = []
    for i, turn in enumerate(conv):
        if turn["role"] != "assistant":
            continue
        before = render(tokenizer, template, conv[:i], add_generation_prompt=True) if i else ""
        through = render(tokenizer, template, conv[: i + 1])
        if not text.startswith(through) or not through.startswith(before):
            raise DataError("the chat template does not render conversations prefix by prefix; "
                            "set model.chat_template to a built-in")
        spans.append((len(before), len(through)))
    return text, spans


def tokenize_conversation(tokenizer, template: str, conv: Conversation, train_on_prompt: bool = False):
    text, spans = assistant_spans(tokenizer, template, conv)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, labels = enc["input_ids"], []
    for tok, (s, e) in zip(ids, enc["offset_mapping"]):
        inside = train_on_prompt or any(a <= s < b for a, b in spans)
        labels.append(tok if inside else IGNORE)
    return ids, labels
