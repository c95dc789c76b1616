"""`zerotune data prepare`: tokenizing on several processes fills the very cache the job reads,
with the samples and counts of the one-process build; `zerotune data validate` from the CLI."""
from __future__ import annotations

import json
import re

import pytest
from conftest import ALPACA, base_recipe, write_recipe
from test_data_tools import TOOLS

from zerotune.core.recipe_load import validate_recipe
from zerotune.launcher.cli import main
from zerotune.training.data import prepare
from zerotune.training.data.formats import DataError
from zerotune.training.data.build import build_data
from zerotune.training.data.prepare import prepare_data
from zerotune.training.data.build import load_tokenizer


@pytest.fixture
def small_chunks(monkeypatch):
    monkeypatch.setattr(prepare, "CHUNK_ROWS", 64)   # several chunks per source, spread over the workers


def recipe_for(tmp_path, sources, **data):
    return validate_recipe(base_recipe(tmp_path, model={"chat_template": "chatml"},
                                       data={"train": sources, "max_len": 1024, "eval_split": 0.05, **data}))


def test_parallel_prepare_fills_the_cache_the_job_loads(tmp_path, small_chunks):
    sources = [{"path": str(ALPACA), "format": "alpaca", "weight": 0.5}, {"path": str(TOOLS), "format": "messages"}]
    r = recipe_for(tmp_path, sources, packing=True)
    ready = prepare_data(r, load_tokenizer(r), workers=2)
    assert ready.stats["cache"] == "miss" and ready.stats["workers"] == 2
    job = build_data(r, load_tokenizer(r))   # what every rank runs: it only loads
    assert job.stats["cache"] == "hit" and job.stats["cache_path"] == ready.stats["cache_path"]
    serial = build_data(r, load_tokenizer(r), use_cache=False)
    for a, b in ((job.train, serial.train), (job.eval, serial.eval)):
        assert len(a) == len(b) and a.packed and b.packed
        for x, y in zip(a, b):
            assert x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)
    assert [s["rows"] for s in job.stats["sources"]] == [999, 31]
    assert {k: job.stats[k] for k in ("train_samples", "eval_samples", "train_target_tokens", "truncated")} == \
        {k: serial.stats[k] for k in ("train_samples", "eval_samples", "train_target_tokens", "truncated")}
    assert prepare_data(r, load_tokenizer(r), workers=2).stats["cache"] == "hit"


def test_bad_rows_fail_or_count_as_in_one_process(tmp_path, small_chunks):
    rows = json.loads(ALPACA.read_text())[:300]
    rows[150]["output"] = ""
    rows[250] = {"instruction": "no output"}
    rows[40]["output"] = 7
    f = tmp_path / "bad.json"
    f.write_text(json.dumps(rows))
    r = recipe_for(tmp_path, [{"path": str(f), "format": "alpaca"}])
    with pytest.raises(DataError) as e:
        prepare_data(r, load_tokenizer(r), workers=2)
    assert str(e.value) == f"{f} row 41: field 'output' must be a string, got int"
    skip = recipe_for(tmp_path, [{"path": str(f), "format": "alpaca"}], on_bad_rows="skip")
    parallel = prepare_data(skip, load_tokenizer(skip), workers=2).stats["sources"][0]
    serial = build_data(skip, load_tokenizer(skip), use_cache=False).stats["sources"][0]
    assert parallel == serial and parallel["bad_rows"] == 3 and parallel["samples"] == 297
    assert [m.split(": ")[0] for m in parallel["bad_examples"]] == [f"{f} row 41", f"{f} row 151", f"{f} row 251"]


def test_prepare_and_validate_from_the_command_line(tmp_path, capsys, small_chunks):
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, data={"train": [{"path": str(TOOLS), "format": "messages"}],
                                                                "max_len": 2048}, model={"chat_template": "chatml"}))
    assert main(["data", "validate", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert re.match(r"data +31 rows checked in \d+\.\d\d s: ok\n +source +.*tool_calls.messages.jsonl \(messages\): "
                    r"31 rows -> 31 samples\n$", out), out
    assert main(["data", "validate", str(recipe), "--tokenize"]) == 0
    assert "(rendered and tokenized): ok" in capsys.readouterr().out
    assert main(["data", "prepare", str(recipe), "--workers", "2"]) == 0
    out = capsys.readouterr().out
    assert re.match(r"cache +written: .*\.zerotune-cache/\w+ \(2 workers, \d+\.\d\d s\)\n", out), out
    assert main(["data", "prepare", str(recipe)]) == 0
    assert re.match(r"cache +ready: ", capsys.readouterr().out)
    assert main(["data", "preview", str(recipe), "--n", "1"]) == 0
    assert re.search(r"cache +hit", capsys.readouterr().out)


def test_a_killed_build_leaves_no_staging_folder_behind(tmp_path):
    """A build killed by SIGKILL (out of memory, scancel) cannot clean up: the next build on this
    host removes its staging folder; a live process's and another host's are left alone."""
    import os
    import socket
    import subprocess
    import sys
    r = recipe_for(tmp_path, [{"path": str(ALPACA), "format": "alpaca"}])
    root = tmp_path / "runs" / ".zerotune-cache"
    killed = subprocess.run([sys.executable, "-c", "import os, signal; from pathlib import Path; "
                             "from zerotune.training.data import cache; "
                             f"t = cache.staging(Path({str(root / 'abc')!r})); (t / 'tokens').mkdir(); "
                             "os.kill(os.getpid(), signal.SIGKILL)"])
    assert killed.returncode == -9
    host = socket.gethostname()
    [left] = root.glob(f"abc.tmp-{host}-*")   # the killed build's, with its pid
    alive, other_host = root / f"def.tmp-{host}-{os.getpid()}", root / "abc.tmp-elsewhere-1"
    alive.mkdir(), other_host.mkdir()
    data = build_data(r, load_tokenizer(r))
    assert data.stats["cache"] == "miss" and not left.exists() and alive.is_dir() and other_host.is_dir()
    assert sorted(p.name for p in root.iterdir() if ".tmp-" in p.name) == sorted([alive.name, other_host.name])
