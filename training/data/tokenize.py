"""Conversation -> input_ids + labels (-100 everywhere but assistant turns).

The chat template renders the whole conversation to text, exactly as at inference. Each
assistant turn's span is found by rendering prefixes:

    start = len(render(turns before it, add_generation_prompt=True))   # where the model starts writing
    end   = common prefix of render(turns through it) and the full text  # its content + end-of-turn token

The text is tokenized once, and a token is labelled when its character offsets lie wholly
inside a span. So labels are right whatever the tokenizer merges at turn boundaries (a token
that straddles the boundary belongs to the prompt, as at inference), and the tokens are the
ones the model sees at inference.
"""
from __future__ import annotations

from .formats import Conversation, DataError
from .templates import BUILTIN, SPECIAL_TOKENS

IGNORE = -100


def resolve_template(tokenizer, chat_template: str | None) -> str:
    """The Jinja template to render with: the tokenizer's own, a built-in by name, or the string."""
    if chat_template is None:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.chat_template
        raise DataError(
            "model.chat_template: the tokenizer has no chat_template; set model.chat_template to a built-in "
            f"({', '.join(BUILTIN)}; 'alpaca' suits base models) or a Jinja template string")
    if chat_template in BUILTIN:
        return BUILTIN[chat_template]
    if "{{" not in chat_template and "{%" not in chat_template:
        raise DataError(f"model.chat_template: {chat_template!r} is neither a built-in ({', '.join(BUILTIN)}) "
                        "nor a Jinja template")
    return chat_template


def add_template_tokens(tokenizer, chat_template: str | None) -> list[str]:
    """Add the special tokens a built-in template needs and the tokenizer lacks; returns them.

    The model's embeddings must then grow to len(tokenizer) (model.resize_token_embeddings).
    """
    vocab = tokenizer.get_vocab()
    missing = [t for t in SPECIAL_TOKENS.get(chat_template or "", []) if t not in vocab]
    if missing:
        tokenizer.add_special_tokens({"extra_special_tokens": missing}, replace_extra_special_tokens=False)
    return missing


def render(tokenizer, template: str, messages: Conversation, add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False,
                                         add_generation_prompt=add_generation_prompt)


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


def assistant_spans(tokenizer, template: str, conv: Conversation, where: str = "") -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and the (start, end) character span of each assistant turn."""
    at = f"{where}: " if where else ""
    try:
        text = render(tokenizer, template, conv)
    except Exception as e:  # jinja raises for roles/orders a template rejects
        raise DataError(f"{at}the chat template cannot render this conversation: {type(e).__name__}: {e}") from None
    pos = 0
    for k, turn in enumerate(conv, 1):   # a template that drops a role would silently lose text
        c = turn["content"].strip()
        i = text.find(c, pos) if c else pos
        if i < 0:
            raise DataError(f"{at}the chat template does not render turn {k} ({turn['role']!r}); "
                            "pick a template that supports this role (e.g. model.chat_template: chatml)")
        pos = i + len(c)
    spans = []
    for i, turn in enumerate(conv):
        if turn["role"] != "assistant":
            continue
        before = render(tokenizer, template, conv[:i], add_generation_prompt=True) if i else ""
        if not text.startswith(before):
            raise DataError(f"{at}the chat template does not render conversations prefix by prefix "
                            "(turn text changes when later turns follow); set model.chat_template to a built-in")
        end = _common_prefix(render(tokenizer, template, conv[: i + 1]), text)
        spans.append((len(before), end))
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
                          where: str = "") -> tuple[list[int], list[int]]:
    text, spans = assistant_spans(tokenizer, template, conv, where)
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
