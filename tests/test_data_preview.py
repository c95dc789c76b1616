"""`zerotune data preview`: samples with the trained tokens marked, statistics, the cache."""
from __future__ import annotations

import json
import re

from conftest import ALPACA, base_recipe, write_recipe

from zerotune.launcher.cli import main


def test_preview_marks_trained_tokens_and_reports_stats(tmp_path, capsys):
    rows = json.loads(ALPACA.read_text())[:80]
    f = tmp_path / "a.json"
    f.write_text(json.dumps(rows))
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, data={"train": [{"path": str(f), "format": "alpaca"}],
                                                                "max_len": 256, "eval_split": 0.1}))
    assert main(["data", "preview", str(recipe), "--n", "2", "--set", "data.packing=true"]) == 0
    out = capsys.readouterr().out
    # sample 2 ("Transform the following sentence...") : the prompt is plain, the whole response is marked
    assert "### Instruction:\nTransform the following sentence using a synonym: The car sped quickly.\n\n" \
           "### Response:\n[[The car accelerated rapidly.</s>]]" in out
    assert out.count("--- sample ") == 2 and "[[" not in out.split("### Response:")[0]
    assert re.search(r"samples +72 train / 8 eval \(\d+ train rows after packing\)", out)
    assert re.search(r"tokens +[\d,]+ train, [\d,]+ trained \(\d+\.\d% of tokens carry loss\)", out)
    eff = float(re.search(r"packing +on: efficiency (\d+\.\d)%", out).group(1))
    assert eff > 90
    assert re.search(r"filtered +truncated \d+, dropped too long 0, dropped with no trained token 0, skipped bad rows 0", out)
    assert "cache        miss: tokenized in" in out
    # second run: the cache is used, and the saving is shown
    assert main(["data", "preview", str(recipe), "--n", "1", "--set", "data.packing=true"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"cache +hit: loaded in \d+\.\d\d s instead of tokenizing \(\d+\.\d\d s\)", out)
    # packing off: the would-be efficiency is still reported
    assert main(["data", "preview", str(recipe), "--n", "1", "--no-cache"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"packing +off \(data.packing=true would fill rows of 256 to \d+\.\d%\)", out)
    assert "cache        off" in out
