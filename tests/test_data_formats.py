"""Formats, sources, chat templates and loss masks on the real example data."""
from __future__ import annotations

import copy
import itertools
import json

import pytest
from conftest import ALPACA, MESSAGES, PHI3_TOKENIZER, SHAREGPT, STORIES, base_recipe
from transformers import AutoTokenizer

from zerotune.core.recipe import DataConfig, DataSource
from zerotune.core.recipe_load import validate_recipe
from zerotune.training.data.tokenize import IGNORE
from zerotune.training.data.build import build_data
from zerotune.training.data.samples import tokenize_source
from zerotune.training.data.formats import to_conversation
from zerotune.training.data.templates import BUILTIN
from zerotune.training.data.tokenize import add_template_tokens, resolve_template, tokenize_conversation
from zerotune.training.data.build import load_tokenizer


@pytest.fixture(scope="module")
def phi3():
    return AutoTokenizer.from_pretrained(str(PHI3_TOKENIZER))


@pytest.fixture(scope="module")
def stories():
    return AutoTokenizer.from_pretrained(str(STORIES))


def _rows(path):
    return json.loads(path.read_text()) if path.suffix == ".json" else [json.loads(l) for l in path.read_text().splitlines()]


def test_sharegpt_messages_and_alpaca_load_to_one_form():
    share, msgs = _rows(SHAREGPT), _rows(MESSAGES)
    assert len(share) == len(msgs) == 500
    for k, (a, b) in enumerate(zip(share, msgs)):
        ca = to_conversation("sharegpt", a, f"row {k}", {})
        assert ca == to_conversation("messages", b, f"row {k}", {})
        assert [t["role"] for t in ca] == ["user", "assistant"] * (len(ca) // 2)
    alpaca = {"instruction": "Add these", "input": "2 and 3", "output": "5", "system": "Be brief.",
              "history": [["hi", "hello"]]}
    as_messages = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
                                {"role": "assistant", "content": "hello"},
                                {"role": "user", "content": "Add these\n\n2 and 3"}, {"role": "assistant", "content": "5"}]}
    assert to_conversation("alpaca", alpaca, "r", {}) == to_conversation("messages", as_messages, "r", {})
    renamed = {"q": "Add these\n\n2 and 3", "a": "5"}
    assert to_conversation("prompt_completion", renamed, "r", {"prompt": "q", "completion": "a"}, "Be brief.") == \
        [as_messages["messages"][0], *as_messages["messages"][3:]]
    tagged = {"chat": [{"speaker": "human", "text": "hi"}, {"speaker": "gpt", "text": "hello"}], "sys": "S"}
    assert to_conversation("sharegpt", tagged, "r", {"conversations": "chat", "role_tag": "speaker",
                                                     "content_tag": "text", "system": "sys"}) == \
        [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]


def _check_labels(tok, ids, labels, conv, ends=("<|end|>", "<|endoftext|>", "<|im_end|>", "<|eot_id|>", "</s>")):
    """Decode: each run of labelled tokens is exactly one assistant turn's content + end-of-turn
    tokens, in order; so no prompt token is labelled and no assistant token is missed."""
    runs = [[i for i, _ in g] for trained, g in itertools.groupby(zip(ids, labels), key=lambda x: x[1] != IGNORE) if trained]
    want = [t["content"].strip() for t in conv if t["role"] == "assistant"]
    assert len(runs) == len(want)
    for run, content in zip(runs, want):
        text = tok.decode(run)
        for e in ends:
            text = text.replace(e, "")
        assert text.strip() == content
    assert all(l == IGNORE or l == i for i, l in zip(ids, labels))


def test_phi3_labels_exactly_the_assistant_turns_of_every_multi_turn_chat(phi3):
    template = resolve_template(phi3, None)   # phi-3's own chat template
    multi = 0
    for k, row in enumerate(_rows(SHAREGPT)):
        conv = to_conversation("sharegpt", row, f"row {k}", {})
        ids, labels = tokenize_conversation(phi3, template, conv)
        _check_labels(phi3, ids, labels, conv)
        assert phi3.convert_ids_to_tokens(ids[[i for i, l in enumerate(labels) if l != IGNORE][-1]]) == "<|endoftext|>"
        multi += len(conv) > 2
    assert multi == 333   # 4- and 6-turn chats: every assistant turn trains


@pytest.mark.parametrize("name", ["chatml", "llama3", "alpaca", "plain"])
def test_builtin_templates_label_assistant_turns(phi3, name):
    tok = copy.deepcopy(phi3)   # tokens get added: leave the shared one alone
    before = len(tok)
    added = add_template_tokens(tok, name)
    assert len(tok) == before + len(added)
    if name == "chatml":
        assert added == ["<|im_start|>", "<|im_end|>"]
        assert len(tok("<|im_start|>", add_special_tokens=False)["input_ids"]) == 1
    for k, row in enumerate(_rows(MESSAGES)[:40]):
        conv = to_conversation("messages", row, f"row {k}", {}, system_prompt="You are helpful.")
        ids, labels = tokenize_conversation(tok, BUILTIN[name], conv)
        _check_labels(tok, ids, labels, conv)
        full_prompt = tokenize_conversation(tok, BUILTIN[name], conv, train_on_prompt=True)[1]
        assert full_prompt[1:] == ids[1:]   # train_on_prompt: every token but the first trains


def test_text_format_trains_every_token(stories, tmp_path):
    f = tmp_path / "t.jsonl"
    f.write_text(json.dumps({"text": "Once upon a time there was a cat."}) + "\n" + json.dumps({"body": "x"}) + "\n")
    src = DataSource(path=str(f), format="text")
    samples, st = tokenize_source(src, stories, None, DataConfig(train=[src], on_bad_rows="skip"))
    ids, labels = samples[0]
    assert ids[0] == stories.bos_token_id and ids[-1] == stories.eos_token_id
    assert labels == [IGNORE] + ids[1:] and st["bad_rows"] == 1


def test_every_source_kind_reads_the_same_rows(stories, tmp_path):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq
    rows = _rows(ALPACA)[:12]
    pq.write_table(pa.Table.from_pylist(rows[:6]), tmp_path / "a.parquet")
    import csv
    with open(tmp_path / "b.csv", "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=["instruction", "input", "output"])
        w.writeheader()
        w.writerows(rows[6:])
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "1.jsonl").write_text("\n".join(json.dumps(r) for r in rows[:6]) + "\n")
    (folder / "2.json").write_text(json.dumps(rows[6:]))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "all.json").write_text(json.dumps(rows))
    cfg = DataConfig(train=[DataSource(path=str(ALPACA), format="alpaca")], max_len=512)

    def read(path):
        return tokenize_source(DataSource(path=str(path), format="alpaca"), stories, BUILTIN["alpaca"], cfg)[0]

    want = read(tmp_path / "all.json")
    assert len(want) == 12
    assert read(tmp_path / "a.parquet") + read(tmp_path / "b.csv") == want
    assert read(folder) == want
    assert read(tmp_path / "saved") == want


def test_weights_eval_split_and_cache(tmp_path):
    small = tmp_path / "small.json"
    small.write_text(json.dumps(_rows(ALPACA)[:40]))
    other = tmp_path / "other.json"
    other.write_text(json.dumps(_rows(ALPACA)[40:60]))
    sources = [{"path": str(small), "format": "alpaca", "weight": 0.5}, {"path": str(other), "format": "alpaca", "weight": 2.5}]
    r = base_recipe(tmp_path, data={"train": sources, "max_len": 128, "packing": True})
    recipe = validate_recipe(r)
    tok = load_tokenizer(recipe)
    first = build_data(recipe, tok)
    s = first.stats
    assert s["train_samples"] == 20 + 50 and s["cache"] == "miss"   # 0.5 x 40 + 2.5 x 20
    assert s["train_tokens"] == first.train.num_tokens()
    again = build_data(recipe, load_tokenizer(recipe))
    assert again.stats["cache"] == "hit" and again.stats["cache_path"] == s["cache_path"]
    assert len(again.train) == len(first.train)
    for i in (0, len(first.train) - 1):
        for k in ("input_ids", "labels", "position_ids"):
            assert (again.train[i][k] == first.train[i][k]).all()
    assert again.stats["load_seconds"] < s["tokenize_seconds"]
    # anything that changes the tokens changes the key: the sources' content, max_len
    other.write_text(json.dumps(_rows(ALPACA)[40:61]))
    assert build_data(recipe, tok).stats["cache"] == "miss"
    shorter = validate_recipe({**r, "data": {**r["data"], "max_len": 96}})
    assert build_data(shorter, tok).stats["cache_path"] != s["cache_path"]
    # eval_split holds out samples before weighting (no upsampled copy of an eval sample trains)
    split = validate_recipe({**r, "data": {"train": [{**sources[0], "weight": 1.0}], "max_len": 128, "eval_split": 0.1}})
    d = build_data(split, tok, use_cache=False)
    assert (d.stats["train_samples"], d.stats["eval_samples"]) == (36, 4)
    train_rows = {tuple(x["input_ids"].tolist()) for x in d.train}
    assert not train_rows & {tuple(x["input_ids"].tolist()) for x in d.eval}
