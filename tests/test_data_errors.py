"""Hostile input: every malformed file fails with one line naming the file, the row and what
was expected; `data.on_bad_rows: skip` skips such rows and reports exact counts."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from conftest import PHI3_TOKENIZER, STORIES, base_recipe, write_recipe
from transformers import AutoTokenizer

from zerotune.launcher.cli import main
from zerotune.core.recipe import DataConfig, DataSource
from zerotune.core.recipe_load import validate_recipe
from zerotune.training.data.formats import DataError
from zerotune.training.data.build import build_data
from zerotune.training.data.samples import tokenize_source
from zerotune.training.data.templates import BUILTIN
from zerotune.training.data.build import load_tokenizer

BAD = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(str(STORIES))


def _tokenize(tok, path, fmt="alpaca", columns=None, template=BUILTIN["alpaca"], **data):
    src = DataSource(path=str(path), format=fmt, columns=columns or {})
    cfg = DataConfig(train=[src], max_len=128, **data)
    return tokenize_source(src, tok, template, cfg)


CASES = [  # file, format, columns, the error must match (after the file name)
    ("bad_json_line.jsonl", "alpaca", {}, r" line 2: not valid JSON \(column \d+: Expecting ',' delimiter\)"),
    ("empty.jsonl", "alpaca", {}, r": empty file \(expected one JSON object per line\)"),
    ("empty_list.json", "alpaca", {}, r": no rows"),
    ("truncated.json", "alpaca", {}, r" line 1: not valid JSON"),
    ("not_utf8.jsonl", "alpaca", {}, r" line 1: not UTF-8 text \(byte 0 of the line\)"),
    ("notes.txt", "alpaca", {}, r": unsupported file type '.txt' \(expected .json, .jsonl, .parquet, .csv\)"),
    ("alpaca_missing_output.json", "alpaca", {}, r" row 2: missing field 'output' \(alpaca rows need instruction and output; this row has 'instruction'"),
    ("alpaca_wrong_type.json", "alpaca", {}, r" row 2: field 'output' must be a string, got int"),
    ("alpaca_bad_history.json", "alpaca", {}, r" row 1: field 'history' must be a list of \[instruction, response\] pairs, got string"),
    ("row_not_object.json", "alpaca", {}, r" row 2: expected an object with alpaca fields, got list"),
    ("sharegpt_unknown_role.jsonl", "sharegpt", {}, r" line 2: turn 2 has unknown role 'wizard' \(expected one of 'system', 'human'"),
    ("sharegpt_not_alternating.jsonl", "sharegpt", {}, r" line 1: turn 2 is 'user' but the conversation must alternate user/tool and assistant turns \(expected 'assistant'\)"),
    ("sharegpt_ends_with_user.jsonl", "sharegpt", {}, r" line 1: the last turn is 'user'; expected it to be the assistant's"),
    ("sharegpt_not_list.jsonl", "sharegpt", {}, r" line 1: field 'conversations' must be a list of turns, got string"),
    ("sharegpt_missing_value.jsonl", "sharegpt", {}, r" line 1: turn 1 has no 'value' key \(expected 'from' and 'value'\)"),
    ("messages_content_list.jsonl", "messages", {}, r" line 1: turn 2 'content' part 1 must be an object with 'type' and 'text', got string"),
    ("messages_late_system.jsonl", "messages", {}, r" line 1: turn 3 is a system turn; only the first turn may be one"),
    ("messages_empty.jsonl", "messages", {}, r" line 1: empty conversation \(expected user and assistant turns\)"),
    ("text_null.jsonl", "text", {}, r" line 1: missing field 'text' \(text rows need text"),
    ("pc_wrong_columns.csv", "prompt_completion", {}, r" row 1: missing field 'prompt' \(prompt_completion rows need prompt and completion; this row has 'question', 'answer'"),
    ("pc_ok.csv", "prompt_completion", {"prompt": "question"}, r" row 1: missing field 'question'"),  # mapping to a missing column
]


@pytest.mark.parametrize("name,fmt,columns,expected", CASES, ids=[c[0] + ("+map" if c[2] else "") for c in CASES])
def test_hostile_file_fails_with_file_row_and_expectation(tok, name, fmt, columns, expected):
    path = BAD / name
    with pytest.raises(DataError) as e:
        _tokenize(tok, path, fmt, columns)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith(str(path)), msg
    assert re.search(expected, msg[len(str(path)):]), msg


def test_unknown_column_key_missing_source_and_bad_templates(tok, tmp_path):
    with pytest.raises(DataError, match=r"columns: 'answer' is not a field of format 'alpaca' \(fields: instruction, output"):
        _tokenize(tok, BAD / "pc_ok.csv", "alpaca", {"answer": "completion"})
    with pytest.raises(DataError, match=r"^/no/such/file.json: not a data file, data folder or saved dataset$"):
        _tokenize(tok, "/no/such/file.json")
    empty_dir = tmp_path / "d"
    empty_dir.mkdir()
    with pytest.raises(DataError, match=r"folder holds no .json, .jsonl, .parquet, .csv files"):
        _tokenize(tok, empty_dir)
    # a tokenizer without a template and no model.chat_template: the error names the fix
    recipe = validate_recipe(base_recipe(tmp_path, model={"path": str(STORIES), "chat_template": None}))
    with pytest.raises(DataError) as e:
        build_data(recipe, load_tokenizer(recipe), use_cache=False)
    assert str(e.value) == (f"model.chat_template: the tokenizer ({STORIES}) has no chat_template and data source "
                            f"{recipe.data.train[0].path} (format alpaca) needs one; set model.chat_template to a "
                            "built-in (chatml, llama3, alpaca, plain; 'alpaca' suits base models), a .jinja file or "
                            "a Jinja template string")
    # phi-3's template silently drops tool turns: caught, not trained on a conversation with a hole
    phi = AutoTokenizer.from_pretrained(str(PHI3_TOKENIZER))
    f = tmp_path / "tools.jsonl"
    f.write_text(json.dumps({"conversations": [
        {"from": "human", "value": "Weather in Paris?"}, {"from": "function_call", "value": '{"name": "weather"}'},
        {"from": "observation", "value": "sunny, 21C"}, {"from": "gpt", "value": "It is sunny."}]}) + "\n")
    with pytest.raises(DataError, match=r"tools.jsonl line 1: the chat template does not render turn 3 \('tool'\)"):
        _tokenize(phi, f, "sharegpt", template=phi.chat_template)
    # chatml renders tool turns: function_call trains, observation does not
    samples, _ = _tokenize(phi, f, "sharegpt", template=BUILTIN["chatml"])
    ids, labels = samples[0]
    trained = phi.decode([t for t, l in zip(ids, labels) if l != -100])
    assert trained == '<tool_call>\n{"name": "weather", "arguments": {}}\n</tool_call><|im_end|>\nIt is sunny.<|im_end|>\n'


def test_skip_bad_rows_reports_exact_counts(tok, tmp_path):
    good = {"instruction": "Say hi", "output": "Hi!"}
    lines = [json.dumps(good), "{broken", json.dumps({"instruction": "x"}), json.dumps(good),
             json.dumps({"instruction": 1, "output": "y"}), "", json.dumps(good), "[1, 2]"]
    f = tmp_path / "mixed.jsonl"
    f.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"mixed.jsonl line 2: not valid JSON"):
        _tokenize(tok, f)
    samples, st = _tokenize(tok, f, on_bad_rows="skip")
    assert (st["rows"], st["bad_rows"], st["samples"], len(samples)) == (7, 4, 3, 3)
    assert "mixed.jsonl line 2: not valid JSON" in st["bad_examples"][0]
    # through build_data: the totals reach data.stats (and `zerotune data preview`)
    recipe = validate_recipe(base_recipe(tmp_path, data={"train": [{"path": str(f), "format": "alpaca"}],
                                                         "on_bad_rows": "skip", "max_len": 64}))
    stats = build_data(recipe, load_tokenizer(recipe), use_cache=False).stats
    assert stats["skipped_bad_rows"] == 4 and stats["train_samples"] == 3


def test_too_long_empty_and_no_target_are_counted(tok, tmp_path):
    rows = [{"instruction": "word " * 200, "output": "short answer"},          # over-long prompt
            {"instruction": "q", "output": "long answer " * 100},             # over-long response
            {"instruction": "q", "output": " "},                              # would train only the eos
            {"instruction": "q", "output": "fine"}]
    f = tmp_path / "lengths.json"
    f.write_text(json.dumps(rows))
    with pytest.raises(DataError) as e:
        _tokenize(tok, f)
    assert str(e.value) == (f"{f} row 3: field 'output' is an empty assistant response (it would train only the "
                            "end-of-turn token); fill it or drop the row")
    samples, st = _tokenize(tok, f, on_bad_rows="skip")
    longest = len(tok(tok.bos_token + "### Instruction:\nq\n\n### Response:\n" + rows[1]["output"] + tok.eos_token,
                      add_special_tokens=False)["input_ids"])
    assert (st["bad_rows"], st["truncated"], st["samples"], st["longest"]) == (1, 2, 3, longest)
    assert all(len(s[0]) <= 128 for s in samples)
    ids, labels = samples[0]   # the prompt's start is kept, and the response still trains
    assert ids[:20] == tok(tok.bos_token + "### Instruction:\nword word", add_special_tokens=False)["input_ids"][:20]
    assert tok.decode([t for t, l in zip(ids, labels) if l != -100]) == "short answer</s>"   # the whole response
    ids, labels = samples[1]   # a long response is cut at its end
    assert len(ids) == 128 and tok.decode([t for t, l in zip(ids, labels) if l != -100]).startswith("long answer long")
    _, st = _tokenize(tok, f, truncation="drop", on_bad_rows="skip")
    assert st["dropped_too_long"] == 2 and st["samples"] == 1
    # a chat whose every assistant turn opts out of the loss has nothing to train: dropped and counted
    m = tmp_path / "optout.jsonl"
    m.write_text(json.dumps({"messages": [{"role": "user", "content": "q"},
                                          {"role": "assistant", "content": "a", "loss_weight": 0}]}) + "\n" +
                 json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}))
    samples, st = _tokenize(tok, m, "messages")
    assert st["dropped_no_target"] == 1 and st["samples"] == 1 and tok.decode(
        [t for t, l in zip(*samples[0]) if l != -100]) == "a</s>"


def test_preview_cli_error_is_one_line(tmp_path, capsys):
    r = base_recipe(tmp_path, data={"train": [{"path": str(BAD / "sharegpt_unknown_role.jsonl"), "format": "sharegpt"}]})
    assert main(["data", "preview", str(write_recipe(tmp_path, r))]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and re.match(r"zerotune: error: .*sharegpt_unknown_role.jsonl line 2: turn 2 has unknown role 'wizard'", err[0]), err

def _cli_lines(capsys, *argv) -> tuple[int, list[str]]:
    capsys.readouterr()
    rc = main(list(argv))
    return rc, capsys.readouterr().err.strip().splitlines()


def test_a_row_the_tokenizer_cannot_take_is_one_line_naming_file_and_row(tmp_path, capsys):
    """Issue 27: a lone UTF-16 surrogate (JSON "\\ud800", valid JSON, not encodable text) made
    `data validate --tokenize` and `train` end in the tokenizer's TypeError (exit 1, no row named)."""
    rows = [{"instruction": "Say hi", "output": "Hi!"}] * 3
    f = tmp_path / "surrogate.json"
    f.write_text(json.dumps(rows)[:-1] + ', {"instruction": "broken \\ud800 text", "output": "ok"}]')
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, data={"train": [{"path": str(f), "format": "alpaca"}]}))
    want = (f"zerotune: error: {f} row 4: holds a lone UTF-16 surrogate (e.g. JSON \"\\ud800\"), text no tokenizer "
            "can encode; fix or drop the row, or set data.on_bad_rows: skip")
    assert _cli_lines(capsys, "data", "validate", str(recipe), "--tokenize") == (2, [want])
    assert _cli_lines(capsys, "train", str(recipe)) == (2, [want])
    assert not (tmp_path / "runs" / "t").exists()   # no run folder (the tokenized cache beside it is not one)
    samples, st = _tokenize(tok=AutoTokenizer.from_pretrained(str(STORIES)), path=f, on_bad_rows="skip")
    assert (st["rows"], st["bad_rows"], st["samples"]) == (4, 1, 3) and "row 4: holds a lone" in st["bad_examples"][0]


def test_a_prompt_longer_than_max_len_is_named_by_validate_and_train(tmp_path, capsys):
    """Issue 27: validate said "ok" for a row whose prompt alone exceeds data.max_len, without a
    word (the warning came only when every sample was cut). Such a sample is truncated as before
    (its prompt's start and its response's: it still has targets) and a warning names the file
    and its first such row, from validate and from train's tokenizing."""
    rows = [{"instruction": "Say hi", "output": "Hi!"}, {"instruction": "word " * 200, "output": "short answer"}]
    f = tmp_path / "long_prompt.json"
    f.write_text(json.dumps(rows))
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, data={"train": [{"path": str(f), "format": "alpaca"}],
                                                                "max_len": 128}))
    capsys.readouterr()
    assert main(["data", "validate", str(recipe), "--tokenize"]) == 0
    out = capsys.readouterr().out.splitlines()
    warning = [line for line in out if line.startswith("warning")]
    assert len(warning) == 1 and re.fullmatch(
        rf"warning      data.max_len 128 is shorter than the prompt alone of 1 sample\(s\) of {re.escape(str(f))} "
        rf"\(first: {re.escape(str(f))} row 2, \d+ prompt tokens\): truncation keeps the prompt's first 96 tokens, "
        r"loses its end and trains on the response's start; raise data.max_len, .*", warning[0]), out
    r = validate_recipe(base_recipe(tmp_path, data={"train": [{"path": str(f), "format": "alpaca"}], "max_len": 128}))
    data = build_data(r, load_tokenizer(r), use_cache=False)   # what train tokenizes: the same warning
    assert capsys.readouterr().err.strip() == "zerotune: warning: " + warning[0].removeprefix("warning      ")
    assert data.stats["warnings"] and len(data.train) == 2
    assert all(any(l != -100 for l in data.train[i]["labels"]) for i in range(2))   # never zero target tokens
