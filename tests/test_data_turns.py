"""Which tokens train: reasoning on/off, the last assistant turn only, per-turn loss weights;
and which template renders: a .jinja file, a Qwen3-style template of the tokenizer's own."""
from __future__ import annotations

import json
import re

import pytest
from conftest import ALPACA, STORIES, base_recipe, write_recipe
from test_data_tools import ROWS, TOOLS, chatml_turn, tokenize, trained_runs, with_tokens
from transformers import AutoTokenizer

from zerotune.core.recipe_load import validate_recipe
from zerotune.launcher.cli import main
from zerotune.training.data.formats import DataError
from zerotune.training.data.build import build_data
from zerotune.training.data.templates import BUILTIN
from zerotune.training.data.build import load_tokenizer

U = {"role": "user", "content": "Is 91 prime?"}
THINKING = {"role": "assistant", "content": "No: 91 = 7 x 13.",
            "reasoning_content": "Try small primes. 91 / 7 = 13 exactly, so it has the factors 7 and 13."}


@pytest.fixture(scope="module")
def chatml():
    from conftest import PHI3_TOKENIZER
    return with_tokens(AutoTokenizer.from_pretrained(str(PHI3_TOKENIZER)), "chatml")


@pytest.fixture(scope="module")
def stories():
    return AutoTokenizer.from_pretrained(str(STORIES))


def write_rows(path, *rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_reasoning_trains_or_is_masked(chatml, stories, tmp_path):
    f = write_rows(tmp_path / "r.jsonl", {"messages": [U, THINKING]},
                   {"messages": [U, {**THINKING, "thinking": THINKING["reasoning_content"], "reasoning_content": None}]})
    think = f"<think>\n{THINKING['reasoning_content']}\n</think>\n\n"
    for ids, labels in tokenize(chatml, f, BUILTIN["chatml"])[0]:   # reasoning_content and thinking: the same
        assert trained_runs(chatml, ids, labels) == [think + "No: 91 = 7 x 13.<|im_end|>\n"]
    for ids, labels in tokenize(chatml, f, BUILTIN["chatml"], train_on_reasoning=False)[0]:
        assert trained_runs(chatml, ids, labels) == ["No: 91 = 7 x 13.<|im_end|>\n"]
        assert "<|im_start|>assistant\n" + think + "No: 91" in chatml.decode(ids)   # still seen, not trained
    # a turn that reasons, then calls tools: with reasoning masked, exactly the calls train
    ids, labels = tokenize(chatml, TOOLS, BUILTIN["chatml"], train_on_reasoning=False)[0][1]
    first = {**ROWS[1]["messages"][1], "reasoning_content": None}
    assert trained_runs(chatml, ids, labels)[0] == chatml_turn(first) and chatml_turn(first).startswith("<tool_call>")
    # alpaca has no reasoning field: the reasoning is written before the answer, in the same tags
    (ids, labels), = tokenize(stories, f, BUILTIN["alpaca"])[0][:1]
    assert stories.decode(ids).endswith("### Response:\n" + think + "No: 91 = 7 x 13.</s>")
    assert trained_runs(stories, ids, labels) == [think + "No: 91 = 7 x 13.</s>"]
    (ids, labels), = tokenize(stories, f, BUILTIN["alpaca"], train_on_reasoning=False)[0][:1]
    assert trained_runs(stories, ids, labels) == ["No: 91 = 7 x 13.</s>"]
    # reasoning alone, masked, leaves an empty answer: refused, not trained as one end-of-turn token
    g = write_rows(tmp_path / "only.jsonl", {"messages": [U, {**THINKING, "content": ""}]})
    assert trained_runs(chatml, *tokenize(chatml, g, BUILTIN["chatml"])[0][0]) == [think + "<|im_end|>\n"]
    with pytest.raises(DataError, match=r"only.jsonl line 1: turn 2 is an empty assistant response"):
        tokenize(chatml, g, BUILTIN["chatml"], train_on_reasoning=False)


def test_last_assistant_only_and_per_turn_flags(chatml, tmp_path):
    samples, _ = tokenize(chatml, TOOLS, BUILTIN["chatml"], train_on="last_assistant")
    for row, (ids, labels) in zip(ROWS, samples):
        assert trained_runs(chatml, ids, labels) == [chatml_turn(row["messages"][-1])]
    a1, a2 = {"role": "assistant", "content": "First answer."}, {"role": "assistant", "content": "Second answer."}
    u2 = {"role": "user", "content": "And then?"}
    f = write_rows(tmp_path / "flags.jsonl",
                   {"messages": [U, {**a1, "train": True}, u2, a2]},          # explicit true trains under last_assistant
                   {"messages": [U, {**a1, "loss_weight": 0}, u2, a2]},
                   {"messages": [U, a1, u2, {**a2, "train": False}]},
                   {"messages": [U, {**a1, "weight": 1}, u2, {**a2, "weight": 0}]})
    runs = [trained_runs(chatml, *s) for s in tokenize(chatml, f, BUILTIN["chatml"])[0]]
    assert runs == [["First answer.<|im_end|>\n", "Second answer.<|im_end|>\n"], ["Second answer.<|im_end|>\n"],
                    ["First answer.<|im_end|>\n"], ["First answer.<|im_end|>\n"]]
    samples, st = tokenize(chatml, f, BUILTIN["chatml"], train_on="last_assistant")
    assert [trained_runs(chatml, *s) for s in samples] == [
        ["First answer.<|im_end|>\n", "Second answer.<|im_end|>\n"], ["Second answer.<|im_end|>\n"],
        ["First answer.<|im_end|>\n"]]
    assert st["dropped_no_target"] == 1   # row 3: the last turn opted out and the history does not train
    # an empty turn in the history is fine when it does not train
    g = write_rows(tmp_path / "history.jsonl", {"messages": [U, {"role": "assistant", "content": ""}, u2, a2]})
    assert trained_runs(chatml, *tokenize(chatml, g, BUILTIN["chatml"], train_on="last_assistant")[0][0]) == \
        ["Second answer.<|im_end|>\n"]


# A Qwen3-style template: reasoning is rendered only for turns after the last user turn.
QWEN3_STYLE = (
    "{%- set ns = namespace(last_user=-1) %}"
    "{%- for m in messages %}{%- if m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}{%- endif %}{%- endfor %}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'assistant' %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if m.get('reasoning_content') and loop.index0 > ns.last_user %}"
    "{{- '<think>\\n' + m['reasoning_content'] + '\\n</think>\\n\\n' }}{%- endif %}"
    "{{- m['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}")


def test_a_template_that_drops_earlier_reasoning(chatml, tmp_path):
    second = {"role": "assistant", "content": "Yes, 97 is prime.", "reasoning_content": "No prime up to 9 divides 97."}
    f = write_rows(tmp_path / "q3.jsonl", {"messages": [U, THINKING, {"role": "user", "content": "And 97?"}, second]})
    with pytest.raises(DataError) as e:
        tokenize(chatml, f, QWEN3_STYLE)
    assert str(e.value) == (f"{f} line 1: the chat template renders turn 2 differently once later turns follow (it "
                            "drops text or reasoning of earlier turns, as Qwen3's drops their reasoning); set "
                            "data.train_on: last_assistant, or give that turn loss_weight: 0")
    ids, labels = tokenize(chatml, f, QWEN3_STYLE, train_on="last_assistant")[0][0]
    assert trained_runs(chatml, ids, labels) == [
        "<think>\nNo prime up to 9 divides 97.\n</think>\n\nYes, 97 is prime.<|im_end|>\n"]
    assert THINKING["reasoning_content"] not in chatml.decode(ids)   # as the model sees it at inference


def test_chat_template_from_a_jinja_file(tmp_path, monkeypatch):
    rows = json.loads(ALPACA.read_text())[:8]
    data = tmp_path / "a.json"
    data.write_text(json.dumps(rows))
    (tmp_path / "tmpl").mkdir()
    (tmp_path / "tmpl" / "alpaca.jinja").write_text(BUILTIN["alpaca"])
    monkeypatch.chdir(tmp_path)   # relative template paths are taken from the working directory
    r = base_recipe(tmp_path, data={"train": [{"path": str(data), "format": "alpaca"}], "max_len": 256})
    from_file = validate_recipe({**r, "model": {**r["model"], "chat_template": "tmpl/alpaca.jinja"}})
    built_in = validate_recipe(r)
    a = build_data(from_file, load_tokenizer(from_file), use_cache=False).train
    b = build_data(built_in, load_tokenizer(built_in), use_cache=False).train
    assert len(a) == 8 and all((a[i]["labels"] == b[i]["labels"]).all() for i in range(8))
    (tmp_path / "a.jinja").write_text("just text")
    for name, message in (("nope.jinja", f"template file 'nope.jinja' not found (tried {tmp_path / 'nope.jinja'})"),
                          ("a.jinja", f"{tmp_path / 'a.jinja'} holds no Jinja template (no {{{{ or {{% in it)")):
        bad = validate_recipe({**r, "model": {**r["model"], "chat_template": name}})
        with pytest.raises(DataError) as e:
            build_data(bad, load_tokenizer(bad), use_cache=False)
        assert str(e.value) == f"model.chat_template: {message}"


def test_preview_says_which_turns_train(tmp_path, capsys):
    r = base_recipe(tmp_path, model={"chat_template": "chatml"},
                    data={"train": [{"path": str(TOOLS), "format": "messages"}], "max_len": 4096,
                          "train_on": "last_assistant", "train_on_reasoning": False})
    assert main(["data", "preview", write_recipe(tmp_path, r).as_posix(), "--n", "13", "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"trains +the last assistant turn of each chat \(tool calls included, tool results not; "
                     r"reasoning masked; a turn's loss_weight: 0 opts out\)", out)
    sample = out.split("--- sample 13 of")[1].split("--- ")[0]
    assert sample.count("[[") == 1 and "<|im_start|> assistant\n[[In euros it would be about 1,105.68 EUR.<|im_end|>" in sample
