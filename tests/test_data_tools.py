"""OpenAI tool-call chats (examples/data/tools/tool_calls.messages.jsonl): rendered by the built-in
templates in their usual style, and exactly the assistant turns (tool calls included) train."""
from __future__ import annotations

import copy
import itertools
import json

import pytest
from conftest import EXAMPLES, PHI3_TOKENIZER, STORIES
from transformers import AutoTokenizer

from zerotune.core.recipe import DataConfig, DataSource
from zerotune.training.data.tokenize import IGNORE
from zerotune.training.data.formats import DataError
from zerotune.training.data.samples import tokenize_source
from zerotune.training.data.formats import to_conversation
from zerotune.training.data.templates import BUILTIN
from zerotune.training.data.tokenize import add_template_tokens, render

TOOLS = EXAMPLES / "data" / "tools" / "tool_calls.messages.jsonl"
ROWS = [json.loads(line) for line in TOOLS.read_text().splitlines()]


@pytest.fixture(scope="module")
def phi3():
    return AutoTokenizer.from_pretrained(str(PHI3_TOKENIZER))


@pytest.fixture(scope="module")
def chatml(phi3):
    """phi-3's tokenizer with chatml's special tokens added."""
    return with_tokens(phi3, "chatml")


def with_tokens(tok, name):
    tok = copy.deepcopy(tok)
    add_template_tokens(tok, name)
    return tok


def tokenize(tok, path, template, fmt="messages", **data):
    src = DataSource(path=str(path), format=fmt)
    return tokenize_source(src, tok, template, DataConfig(train=[src], max_len=4096, **data))


def trained_runs(tok, ids, labels) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    groups = itertools.groupby(zip(ids, labels), key=lambda x: x[1] != IGNORE)
    return [tok.decode([i for i, _ in g]) for trained, g in groups if trained]


def args_of(call) -> dict:
    a = call["function"]["arguments"]
    return json.loads(a) if isinstance(a, str) else a


def text_of(content) -> str:
    if isinstance(content, list):
        return "\n".join(p.get("text", p.get("value")) for p in content)
    return content or ""


def chatml_turn(m) -> str:
    """What one assistant message must train under chatml, written out independently of the template."""
    out = f"<think>\n{m['reasoning_content']}\n</think>\n\n" if m.get("reasoning_content") else ""
    out += text_of(m["content"])
    for k, c in enumerate(m.get("tool_calls") or []):
        call = json.dumps({"name": c["function"]["name"], "arguments": args_of(c)}, ensure_ascii=False)
        out += ("\n" if m["content"] or k else "") + f"<tool_call>\n{call}\n</tool_call>"
    return out + "<|im_end|>\n"


def llama3_turn(m) -> str:
    out = f"<think>\n{m['reasoning_content']}\n</think>\n\n" if m.get("reasoning_content") else ""
    lines = [text_of(m["content"]).strip()] if m["content"] else []
    lines += [json.dumps({"name": c["function"]["name"], "parameters": args_of(c)}, ensure_ascii=False)
              for c in m.get("tool_calls") or []]
    return out + "\n".join(lines) + "<|eot_id|>"


def test_every_tool_call_chat_trains_exactly_its_assistant_turns(phi3):
    for name, turn in (("chatml", chatml_turn), ("llama3", llama3_turn)):
        tok = with_tokens(phi3, name)
        samples, st = tokenize(tok, TOOLS, BUILTIN[name])
        assert st["samples"] == len(ROWS) == 31 and st["bad_rows"] == 0
        calls = 0
        for row, (ids, labels) in zip(ROWS, samples):
            want = [turn(m) for m in row["messages"] if m["role"] == "assistant" and m.get("weight") != 0]
            assert trained_runs(tok, ids, labels) == want
            calls += sum(len(m.get("tool_calls") or []) for m in row["messages"])
            text = tok.decode(ids)
            for m in row["messages"]:   # every tool result is in the prompt, untrained
                if m["role"] == "tool":
                    assert m["content"] in text and not any(m["content"] in r for r in trained_runs(tok, ids, labels))
        assert calls == 35


def test_chatml_renders_tools_calls_and_results_qwen_style(chatml):
    tok = chatml
    row = ROWS[1]   # two parallel calls, two results, reasoning
    conv = to_conversation("messages", row, "r", {})
    text = render(tok, BUILTIN["chatml"], conv, tools=conv.tools)
    assert text.startswith("<|im_start|>system\n# Tools\n\nYou may call one or more functions to assist with the user "
                           "query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
                           + json.dumps(row["tools"][0]) + "\n</tools>\n\n")
    assert ('<|im_start|>assistant\n<think>\nThe user compares two cities, so I need the weather for both. I can ask '
            'for them in parallel.\n</think>\n\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Madrid"}}\n'
            '</tool_call>\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call><|im_end|>\n'
            '<|im_start|>user\n<tool_response>\n{"city": "Madrid", "temperature": 24, "unit": "celsius", "conditions": '
            '"sunny"}\n</tool_response>\n<tool_response>\n{"city": "Rome", "temperature": 21, "unit": "celsius", '
            '"conditions": "light rain"}\n</tool_response><|im_end|>\n<|im_start|>assistant\nMadrid is warmer') in text
    llama = render(tok, BUILTIN["llama3"], conv, tools=conv.tools)
    assert ('<|start_header_id|>ipython<|end_header_id|>\n\n{"city": "Rome", "temperature": 21, "unit": "celsius", '
            '"conditions": "light rain"}<|eot_id|>') in llama
    assert llama.count("Environment: ipython") == 1 and '"name": "get_weather"' in llama.split("<|eot_id|>")[0]


def test_templates_without_tool_support_get_the_documented_text(phi3):
    """alpaca (and phi-3's own template) ignore tools and tool_calls: they are written into the text."""
    tok = AutoTokenizer.from_pretrained(str(STORIES))
    samples, _ = tokenize(tok, TOOLS, BUILTIN["alpaca"])
    ids, labels = samples[2]   # convert_currency: arguments given as a JSON string
    text = tok.decode(ids)
    assert text.startswith("<s> You can call these tools:\n" + json.dumps(ROWS[2]["tools"]) + "\n\n### Instruction:\n")
    assert trained_runs(tok, ids, labels) == [
        '{"name": "convert_currency", "arguments": {"amount": 250, "from_currency": "EUR", "to_currency": "JPY"}}</s>',
        "250 EUR is about 40,710 JPY at today's rate of 162.84 yen per euro.</s>"]
    # phi-3's template drops tool turns: refused rather than trained with a hole
    with pytest.raises(DataError) as e:
        tokenize(phi3, TOOLS, phi3.chat_template)
    assert str(e.value) == (f"{TOOLS} line 1: the chat template does not render turn 4 ('tool'); pick a template that "
                            "supports this role (e.g. model.chat_template: chatml)")


def to_sharegpt(row) -> dict:
    """The same chat as LLaMA-Factory writes it (function_call / observation turns, tools as JSON text)."""
    conv = []
    for m in row["messages"]:
        if m.get("tool_calls"):
            calls = [{"name": c["function"]["name"], "arguments": args_of(c)} for c in m["tool_calls"]]
            conv.append({"from": "function_call", "value": json.dumps(calls if len(calls) > 1 else calls[0])})
        else:
            conv.append({"from": {"system": "system", "user": "human", "assistant": "gpt", "tool": "observation"}[m["role"]],
                         "value": text_of(m["content"])})
    return {"conversations": conv, "tools": json.dumps(row["tools"]) if isinstance(row["tools"], list) else row["tools"]}


def test_sharegpt_function_calls_are_the_same_chats():
    same = 0
    for row in ROWS:
        if any(m.get("reasoning_content") or m.get("weight") == 0 or (m.get("tool_calls") and m["content"])
               for m in row["messages"]):
            continue   # sharegpt has no reasoning, no loss weights, no text beside a call
        a = to_conversation("sharegpt", to_sharegpt(row), "r", {})
        b = to_conversation("messages", row, "r", {})
        for t in b:
            t.pop("tool_call_id", None)
            for c in t.get("tool_calls", []):
                del c["id"]
        assert a == b and a.tools == b.tools
        same += 1
    assert same == 22


def test_content_parts_and_empty_tools(phi3, chatml, tmp_path):
    parts = ROWS[0]["messages"][1]["content"]
    assert parts == [{"type": "text", "text": "What's the weather like in Lisbon right now?"}]
    assert ROWS[19]["messages"][0]["content"][0]["type"] == "text" and "value" in ROWS[19]["messages"][0]["content"][0]
    plain = json.loads(json.dumps(ROWS[0]))
    for m in plain["messages"]:
        m["content"] = text_of(m["content"]) if m["content"] is not None else None
    assert to_conversation("messages", ROWS[0], "r", {}) == to_conversation("messages", plain, "r", {})
    two = {"messages": [{"role": "user", "content": [{"type": "text", "text": "Line one."},
                                                     {"type": "input_text", "value": "Line two."}]},
                        {"role": "assistant", "content": [{"type": "output_text", "text": "Both read."}]}]}
    assert to_conversation("messages", two, "r", {})[0]["content"] == "Line one.\nLine two."
    # an empty tools list, as a list or as the JSON text "[]", renders no tools section in any template
    for tools in ([], "[]", " "):
        for fmt, row in (("messages", {**ROWS[15], "tools": tools}), ("sharegpt", {**to_sharegpt(ROWS[15]), "tools": tools})):
            conv = to_conversation(fmt, row, "r", {})
            assert conv.tools is None
            f = tmp_path / f"{fmt}.jsonl"
            f.write_text(json.dumps(row) + "\n")
            for template in (phi3.chat_template, BUILTIN["chatml"]):
                ids, _ = tokenize(chatml, f, template, fmt)[0][0]
                assert "tools" not in phi3.decode(ids).lower()


U = {"role": "user", "content": "Weather in Paris?"}
A = {"role": "assistant", "content": "It is sunny."}
CALL = {"role": "assistant", "content": None, "tool_calls": [
    {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]}
RESULT = {"role": "tool", "tool_call_id": "call_1", "content": '{"conditions": "sunny"}'}


def with_args(args):
    return {**CALL, "tool_calls": [{**CALL["tool_calls"][0], "function": {"name": "get_weather", "arguments": args}}]}


BAD_ROWS = [  # (row, the message after "FILE line 1: ")
    ({"messages": [U, A, RESULT, A]},
     "turn 3 is a tool result with no tool call before it (a 'tool' turn must follow an assistant turn with tool_calls)"),
    ({"messages": [RESULT, A]},
     "turn 1 is a tool result with no tool call before it (a 'tool' turn must follow an assistant turn with tool_calls)"),
    ({"messages": [U, with_args('{"city": "Paris"'), RESULT, A]},
     "turn 2 tool call 1 ('get_weather'): arguments are not valid JSON (column 17: Expecting ',' delimiter)"),
    ({"messages": [U, with_args('["Paris"]'), RESULT, A]},
     "turn 2 tool call 1 ('get_weather'): arguments must be a JSON object, got list"),
    ({"messages": [U, {**CALL, "tool_calls": [{"type": "function", "function": {"arguments": "{}"}}]}, RESULT, A]},
     "turn 2 tool call 1 has no function 'name'"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                {"type": "image_url", "image_url": {"url": "https://x/cat.png"}}]}, A]},
     "turn 1 'content' part 2 has type 'image_url'; only text parts can be trained on (type 'text' with a 'text' or "
     "'value' string)"),
    ({"messages": [{"role": "user", "content": [{"type": "text"}]}, A]},
     "turn 1 'content' part 1 has no 'text' (or 'value') string"),
    ({"messages": [U, CALL, {**RESULT, "tool_call_id": "call_9"}, A]},
     "turn 3 answers tool_call_id 'call_9', which no call of the assistant turn before it has (its ids: 'call_1')"),
    ({"messages": [U, CALL, U, A]},
     "turn 3 is 'user' but the tool calls before it have no results (expected 'tool' turns after an assistant turn "
     "with tool_calls)"),
    ({"messages": [U, CALL, RESULT]},
     "the last turn is 'tool'; expected it to be the assistant's (nothing to train on after it)"),
    ({"messages": [U, {"role": "assistant", "content": ""}]},
     "turn 2 is an empty assistant response (it would train only the end-of-turn token); fill it or drop the row, "
     "or give the turn loss_weight: 0"),
    ({"messages": [U, {**A, "loss_weight": 0.5}]}, "turn 2 'loss_weight' must be 0 or 1, got 0.5"),
    ({"messages": [{**U, "train": True}, A]}, "turn 1 is a 'user' turn with train: true; only assistant turns train"),
    ({"messages": [U, A], "tools": '[{"name": "get_weather"'},
     "field 'tools' is not valid JSON (column 24: Expecting ',' delimiter)"),
    ({"messages": [U, A], "tools": [{"description": "no name"}]},
     "field 'tools' item 1 must be a function schema with a 'name'"),
    ({"conversations": [{"from": "human", "value": "Weather?"}, {"from": "function_call", "value": "get_weather(Paris)"},
                        {"from": "observation", "value": "sunny"}, {"from": "gpt", "value": "Sunny."}]},
     "turn 2 ('function_call') is not valid JSON (column 1: Expecting value)"),
]


@pytest.mark.parametrize("row,expected", BAD_ROWS, ids=[e[:40] for _, e in BAD_ROWS])
def test_bad_chat_row_is_one_line_naming_file_row_and_turn(chatml, tmp_path, row, expected):
    f = tmp_path / "bad.jsonl"
    f.write_text(json.dumps(row) + "\n")
    fmt = "sharegpt" if "conversations" in row else "messages"
    with pytest.raises(DataError) as e:
        tokenize(chatml, f, BUILTIN["chatml"], fmt)
    assert str(e.value) == f"{f} line 1: {expected}"
    # skipped and counted under on_bad_rows: skip
    _, st = tokenize(chatml, f, BUILTIN["chatml"], fmt, on_bad_rows="skip")
    assert (st["bad_rows"], st["samples"], st["bad_examples"]) == (1, 0, [f"{f} line 1: {expected}"])


def test_a_template_that_drops_a_tool_call_is_refused(chatml, tmp_path):
    first_call_only = BUILTIN["chatml"].replace("m.get('tool_calls') or []", "(m.get('tool_calls') or [])[:1]")
    two = {"messages": [U, {**CALL, "tool_calls": [CALL["tool_calls"][0], {**CALL["tool_calls"][0], "id": "call_2",
           "function": {"name": "get_time", "arguments": {"city": "Paris"}}}]}, RESULT, {**RESULT, "tool_call_id": "call_2"}, A]}
    f = tmp_path / "two.jsonl"
    f.write_text(json.dumps(two) + "\n")
    ids, labels = tokenize(chatml, f, BUILTIN["chatml"])[0][0]
    assert 'get_time", "arguments": {"city": "Paris"}' in trained_runs(chatml, ids, labels)[0]
    with pytest.raises(DataError) as e:
        tokenize(chatml, f, first_call_only)
    assert str(e.value) == (f"{f} line 1: the chat template does not render tool call 'get_time' of turn 2; pick a "
                            "template that renders tool_calls (e.g. model.chat_template: chatml)")
