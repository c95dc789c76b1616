"""Bad data caught before any GPU time: validate_sources (what the launcher runs before torchrun),
a training set with no usable row, a data.max_len that cuts every sample."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
from conftest import ALPACA, MESSAGES, ROOT, SHAREGPT, base_recipe, write_recipe
from test_data_tools import TOOLS

from zerotune.core.recipe_load import validate_recipe
from zerotune.launcher.cli import main
from zerotune.training.data.formats import DataError
from zerotune.training.data.build import build_data
from zerotune.training.data.validate import validate_sources
from zerotune.training.data.build import load_tokenizer


def recipe_for(tmp_path, sources, **data):
    return validate_recipe(base_recipe(tmp_path, model={"chat_template": "chatml"},
                                       data={"train": sources, "max_len": 4096, **data}))


def test_every_row_bad_names_the_sources_and_counts(tmp_path):
    """Was: ValueError: Sample larger than population (eval_split on zero samples)."""
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps({"instruction": "q", "output": o}) + "\n" for o in ("", 3, "")) + "{oops\n")
    long = tmp_path / "long.json"
    long.write_text(json.dumps([{"instruction": "word " * 300, "output": "x " * 100}] * 2))
    sources = [{"path": str(bad), "format": "alpaca"}, {"path": str(long), "format": "alpaca"}]
    r = recipe_for(tmp_path, sources, on_bad_rows="skip", eval_split=0.1, max_len=64, truncation="drop")
    with pytest.raises(DataError) as e:
        build_data(r, load_tokenizer(r), use_cache=False)
    assert str(e.value) == (
        f"data.train: no usable samples ({bad}: 4 rows, 4 skipped as bad; {long}: 2 rows, 2 dropped as too long); "
        f"first bad row: {bad} line 1: field 'output' is an empty assistant response (it would train only the "
        "end-of-turn token); fill it or drop the row")
    with pytest.raises(DataError) as e2:   # the launcher's check says the same, without a tokenizer
        validate_sources(r.model_copy(update={"data": r.data.model_copy(update={"train": r.data.train[:1]})}))
    assert str(e2.value) == (f"data.train: no usable samples ({bad}: 4 rows, 4 skipped as bad); first bad row: {bad} "
                             "line 1: field 'output' is an empty assistant response (it would train only the "
                             "end-of-turn token); fill it or drop the row")
    one = tmp_path / "one.json"
    one.write_text(json.dumps([{"instruction": "q", "output": "a"}]))
    r = recipe_for(tmp_path, [{"path": str(one), "format": "alpaca"}], eval_split=0.5)
    with pytest.raises(DataError, match=r"^data.train: no training samples left: data.eval_split 0.5 holds out 1 of 1; "
                                        r"lower it or add samples$"):
        build_data(r, load_tokenizer(r), use_cache=False)


def test_max_len_that_cuts_every_sample_warns_once(tmp_path, capsys):
    rows = json.loads(ALPACA.read_text())[:30]
    f = tmp_path / "a.json"
    f.write_text(json.dumps(rows))
    r = recipe_for(tmp_path, [{"path": str(f), "format": "alpaca"}, {"path": str(SHAREGPT), "format": "sharegpt"}],
                   max_len=16)
    data = build_data(r, load_tokenizer(r), use_cache=False)
    err = capsys.readouterr().err.strip().splitlines()
    longest = [s["longest"] for s in data.stats["sources"]]
    assert err == [f"zerotune: warning: data.max_len 16 truncates every sample of {f} (30 of 30; the longest has "
                   f"{longest[0]:,} tokens)",
                   f"zerotune: warning: data.max_len 16 truncates every sample of {SHAREGPT} (500 of 500; the longest "
                   f"has {longest[1]:,} tokens)"]
    assert data.stats["warnings"] == [line.removeprefix("zerotune: warning: ") for line in err]
    # a max_len that fits: no warning, and "longest" was the longest sample before truncation
    fits = build_data(recipe_for(tmp_path, [{"path": str(f), "format": "alpaca"}]), load_tokenizer(r), use_cache=False)
    assert capsys.readouterr().err == "" and fits.stats["truncated"] == 0
    assert longest[0] == max(fits.train.length(i) for i in range(len(fits.train)))
    # preview shows it
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, data={"train": [{"path": str(f), "format": "alpaca"}],
                                                                "max_len": 16}))
    assert main(["data", "preview", str(recipe), "--n", "1", "--no-cache"]) == 0
    assert f"warning      data.max_len 16 truncates every sample of {f} (30 of 30;" in capsys.readouterr().out


def test_validate_sources_checks_every_row_without_a_model(tmp_path):
    sources = [{"path": str(ALPACA), "format": "alpaca"}, {"path": str(SHAREGPT), "format": "sharegpt"},
               {"path": str(MESSAGES), "format": "messages"}, {"path": str(TOOLS), "format": "messages"}]
    r = recipe_for(tmp_path, sources)
    rows_only = validate_sources(r)
    assert [(s["rows"], s["samples"], s["bad_rows"]) for s in rows_only["sources"]] == \
        [(999, 999, 0), (500, 500, 0), (500, 500, 0), (31, 31, 0)]
    assert rows_only["rows"] == 2030 and rows_only["warnings"] == []
    tokenized = validate_sources(r, load_tokenizer(r))   # also rendered and tokenized, as training does
    built = build_data(r, load_tokenizer(r), use_cache=False).stats
    assert [s["samples"] for s in tokenized["sources"]] == [s["samples"] for s in built["sources"]]
    # the first bad row stops it with the line training would print
    bad = tmp_path / "bad.jsonl"
    bad.write_text(TOOLS.read_text().splitlines()[0] + "\n" + json.dumps({"messages": [
        {"role": "user", "content": "hi"}, {"role": "tool", "content": "42"}, {"role": "assistant", "content": "ok"}]}) + "\n")
    r = recipe_for(tmp_path, [{"path": str(bad), "format": "messages"}])
    with pytest.raises(DataError) as e:
        validate_sources(r)
    assert str(e.value) == (f"{bad} line 2: turn 2 is a tool result with no tool call before it (a 'tool' turn must "
                            "follow an assistant turn with tool_calls)")
    skip = recipe_for(tmp_path, [{"path": str(bad), "format": "messages"}], on_bad_rows="skip")
    assert (validate_sources(skip)["bad_rows"], validate_sources(skip)["sources"][0]["samples"]) == (1, 1)


def test_validate_sources_imports_neither_torch_nor_transformers():
    code = ("import sys; from zerotune.core.recipe_load import validate_recipe; "
            "from zerotune.training.data.validate import validate_sources; "
            f"r = validate_recipe({{'name': 'x', 'model': {{'path': 'm'}}, 'data': {{'train': [{{'path': {str(TOOLS)!r}, "
            "'format': 'messages'}]}}); print(validate_sources(r)['rows'], 'torch' in sys.modules, "
            "'transformers' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert out.split() == ["31", "False", "False"]
