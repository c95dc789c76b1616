"""Issue 26: `zerotune train` plans from the tokenized data's real lengths (launcher/data_size.py).

A micro-batch is padded to its longest row, so the most tokens it can hold is micro_batch_size x
the longest row the loader batches (a sample, or a packed row), not micro_batch_size x
data.max_len. The tokenized cache, written before the plan, knows that length: short chat rows
at a large max_len no longer turn gradient checkpointing on where the real batches fit without.
The plan line says what the plan was made for, and what packing does to this data's padding.
The CLI runs in-process (launcher.cli.main), as tests/test_preflight.py does."""
from __future__ import annotations

import numpy as np
import pytest
import yaml

from conftest import base_recipe, write_recipe

GPU = "3GiB"   # stories260K at micro-batch 16: x max_len 4096 needs checkpointing here, x its real rows do not


def launch(capsys, recipe_path, *args) -> tuple[int, str]:
    from zerotune.launcher.cli import main
    rc = main(["launch", str(recipe_path), "--dry-run", "--nproc", "1", "--gpu-memory", GPU, *map(str, args)])
    return rc, capsys.readouterr().err


def short_rows(tmp_path, **data) -> dict:
    """The Alpaca demo (mean ~500 tokens with stories260K's tokenizer, longest ~1,850) at max_len 4096, mbs 16."""
    return base_recipe(tmp_path, model={"dtype": "bf16"}, data={"max_len": 4096, **data},
                       train={"micro_batch_size": 16, "gradient_checkpointing": "auto"}, distributed={"zero": 0})


def layers(ckpt) -> int:
    """Decoder layers checkpointed, of stories260K's 5 (true: all, false: none, N: the first N)."""
    return 5 if ckpt is True else 0 if ckpt is False else int(ckpt)


def saved(tmp_path) -> dict:
    return yaml.safe_load((tmp_path / "runs" / "t" / "recipe.yaml").read_text())


def test_short_rows_at_a_large_max_len_plan_without_checkpointing(tmp_path, capsys):
    from zerotune.core.recipe_load import validate_recipe
    from zerotune.launcher.plan import choose
    recipe = short_rows(tmp_path)
    # what the planner alone says for micro_batch_size x data.max_len: checkpointing on (layers: by the layer)
    alone = choose(validate_recipe(recipe), 1, 1, 3 * 2 ** 30)
    assert alone.strategy.grad_ckpt is True
    rc, err = launch(capsys, write_recipe(tmp_path, recipe))
    assert rc == 0, err
    got = saved(tmp_path)
    assert layers(got["train"]["gradient_checkpointing"]) < layers(alone.settings()["gradient_checkpointing"])
    assert got["data"]["max_len"] == 4096   # max_len kept as written
    line = next(ln for ln in err.splitlines() if ln.startswith("zerotune: data: "))
    longest = int(line.split(" x ")[1].split()[0].replace(",", ""))
    assert 500 < longest < 4096 and f"longest {longest:,} (data.max_len 4,096)" in line
    assert f"planned for micro-batches of 16 x {longest:,} tokens at most" in line


def test_a_recipe_that_needs_checkpointing_at_its_real_lengths_still_gets_it(tmp_path, capsys):
    """The same data truncated to 1,024 tokens at micro-batch 64: the real rows need it too."""
    recipe = short_rows(tmp_path, max_len=1024)
    recipe["train"]["micro_batch_size"] = 64
    rc, err = launch(capsys, write_recipe(tmp_path, recipe))
    assert rc == 0, err
    assert layers(saved(tmp_path)["train"]["gradient_checkpointing"]) > 0
    assert "planned for micro-batches of 64 x 1,024 tokens at most" in err


def test_packing_off_says_the_padding_it_would_avoid(tmp_path, capsys):
    rc, err = launch(capsys, write_recipe(tmp_path, short_rows(tmp_path)))
    assert rc == 0, err
    [line] = [ln for ln in err.splitlines() if ln.startswith("zerotune: packing ")]
    assert line.startswith("zerotune: packing off (data.packing: false): micro-batches of 16 would be ")
    pct = int(line.split(" would be ")[1].split("%")[0])
    assert 30 < pct < 90 and "data.packing: true would avoid it" in line and "fewer optimizer steps per epoch" in line
    assert saved(tmp_path)["data"]["packing"] is False   # the default stays off: the recipe decides


def test_packing_on_as_written_plans_for_its_packed_rows(tmp_path, capsys):
    recipe = short_rows(tmp_path, packing=True)
    recipe["train"]["micro_batch_size"] = 2   # rows of ~4,096 tokens (sdpa's packed-row mask is 4,096^2 a row)
    rc, err = launch(capsys, write_recipe(tmp_path, recipe))
    assert rc == 0, err
    got = saved(tmp_path)
    assert got["data"]["packing"] is True and got["data"]["max_len"] == 4096
    [line] = [ln for ln in err.splitlines() if ln.startswith("zerotune: packing ")]
    assert line.startswith("zerotune: packing on (data.packing: true): 999 samples in ")
    rows = int(line.split(" samples in ")[1].split()[0].replace(",", ""))
    assert 100 < rows < 999   # ~8 samples a row
    longest = int(next(ln for ln in err.splitlines() if "planned for micro-batches" in ln).split(" x ")[1].split()[0]
                  .replace(",", ""))
    assert 3500 < longest <= 4096   # packed rows fill max_len


def test_zerotune_plan_plans_for_the_lengths_train_plans_for_once_the_data_is_tokenized(tmp_path, capsys):
    """`zerotune plan` reads the tokenized cache when it is there (the plan tokenizes nothing), so its
    table is made for the micro-batches train plans for; before, it plans for micro_batch x
    data.max_len and says why."""
    import json
    from zerotune.launcher.cli import main

    def plan() -> dict:
        rc = main(["plan", str(path), "--gpus", "1", "--gpu-memory", GPU, "--json"])
        out = json.loads(capsys.readouterr().out)
        assert rc == 0, out
        return out

    path = write_recipe(tmp_path, short_rows(tmp_path))
    before = plan()
    assert before["data"] == ["data: planned for micro-batches of 16 x data.max_len 4,096 tokens: no tokenized "
                              "cache yet (`zerotune data prepare RECIPE` writes it, as `zerotune train` does); plan "
                              "then reads the data's real lengths, as train does"]
    assert before["workload"]["seq_len"] == 4096
    rc, err = launch(capsys, path)   # tokenizes into the cache and plans from its lengths
    assert rc == 0, err
    after = plan()
    assert after["data"][0] in err and after["data"][1] in err   # the lines train printed, word for word
    longest = int(after["data"][0].split(" x ")[1].split()[0].replace(",", ""))
    assert after["workload"]["seq_len"] == longest < 4096

    assert after["workload"]["micro_batch_size"] == before["workload"]["micro_batch_size"] == 16
    # its `auto:` line is what train resolved (the table's "recommended" ignores what the recipe fixes)
    train = saved(tmp_path)["train"]
    ckpt = train["gradient_checkpointing"]
    label = {True: "ckpt on", False: "ckpt off"}[ckpt] if type(ckpt) is bool else f"ckpt {ckpt}/5"
    loss = "the chunked loss" if train["fused_loss"] else "the plain loss"
    assert after["auto"].startswith(f"auto: this recipe as written trains with full ZeRO-0, {label}, {loss} (")


def test_padding_fraction_by_hand():
    from zerotune.launcher.data_size import padding_fraction
    assert padding_fraction([5, 7, 9, 11], 1) == 0.0               # one row a batch: never padded
    assert padding_fraction([4, 4, 4, 4, 4, 4], 3) == 0.0          # equal rows
    assert padding_fraction([2, 4, 6, 8], 4) == pytest.approx(1 - 20 / 32)   # one batch, padded to 8
    assert padding_fraction([1, 9], 8) == pytest.approx(1 - 10 / 18)         # fewer rows than a batch
    lengths = np.random.default_rng(1).integers(1, 100, 1000)
    assert padding_fraction(lengths, 16, seed=3) == padding_fraction(lengths, 16, seed=3)   # seeded
    assert 0.3 < padding_fraction(lengths, 16) < 0.7


def test_a_data_file_is_counted_once_while_unchanged_and_again_when_it_changes(tmp_path):
    """`zerotune plan` counts the data for its table and again for its auto line: one read."""
    from zerotune.launcher.data_size import _count_file, _count_local_rows
    f = tmp_path / "rows.jsonl"
    f.write_text('{"text": "a"}\n\n{"text": "bb"}\n')
    before = _count_file.cache_info()
    assert _count_local_rows(f) == _count_local_rows(tmp_path) == (2, len(f.read_text()))
    after = _count_file.cache_info()
    assert (after.misses - before.misses, after.hits - before.hits) == (1, 1)
    f.write_text('{"text": "a"}\n{"text": "bb"}\n{"text": "ccc"}\n')
    assert _count_local_rows(f)[0] == 3   # a new size (or mtime) is a new key
    (tmp_path / "more.json").write_text('[{"text": "d"}, {"text": "e"}]')
    assert _count_local_rows(tmp_path)[0] == 5 and _count_local_rows(tmp_path / "more.json")[0] == 2
    (tmp_path / "broken.json").write_text("[{")
    assert _count_local_rows(tmp_path) is None   # not JSON: the size is unknown, as before


def test_packed_rows_of_one_sample_each_are_planned_without_the_packed_row_mask(tmp_path, capsys):
    """Issue 28 (call D, one H100, 2026-12-07): rows of 131,072 tokens, each one truncated document,
    packed: transformers masks such a row causally (its position ids count 0..n-1 once), but the
    plan counted sdpa's packed-row mask (3 n^2 bytes: 48 GiB), offloaded 28 layers of QLoRA that
    then peaked at 25.3 of 79.6 GiB, and refused LoRA there. The plan now counts the mask only
    where a row holds several samples or a micro-batch pads one; the run keeps data.packing."""
    import json
    from zerotune.core.recipe_load import validate_recipe
    from zerotune.launcher.cli import main
    from zerotune.launcher.data_size import DataLengths

    rng = np.random.default_rng(0)
    words = ["the", "little", "cat", "saw", "a", "big", "dog", "and", "ran", "home", "one", "day"]
    data = tmp_path / "long.jsonl"
    data.write_text("".join(json.dumps({"text": " ".join(rng.choice(words, 3000))}) + "\n" for _ in range(6)))
    recipe = base_recipe(tmp_path, model={"dtype": "bf16"}, distributed={"zero": 0},
                         data={"train": [{"path": str(data), "format": "text"}], "max_len": 1024, "packing": True},
                         train={"micro_batch_size": 1, "gradient_checkpointing": "auto"})
    path = write_recipe(tmp_path, recipe)
    rc, err = launch(capsys, path)   # tokenizes into the cache (every sample truncated to 1,024), plans
    assert rc == 0, err
    assert saved(tmp_path)["data"]["packing"] is True   # the run packs as written
    assert "packing on (data.packing: true): 6 samples in 6 rows" in err
    rc = main(["plan", str(path), "--gpus", "1", "--gpu-memory", GPU, "--json"])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["workload"]["packed"] is False and out["workload"]["seq_len"] == 1024, out["workload"]

    r = validate_recipe(recipe)
    one = DataLengths(samples=np.array([1024] * 4), rows=np.array([1024] * 4), packed=True)
    two = DataLengths(samples=np.array([512] * 8), rows=np.array([1024] * 4), packed=True)
    uneven = DataLengths(samples=np.array([1024, 900]), rows=np.array([1024, 900]), packed=True)
    assert one.planning_recipe(r).data.packing is False and two.planning_recipe(r).data.packing is True
    assert uneven.planning_recipe(r).data.packing is False   # micro-batches of 1: no row is padded
    mbs2 = validate_recipe({**recipe, "train": {**recipe["train"], "micro_batch_size": 2}})
    assert uneven.planning_recipe(mbs2).data.packing is True   # 900 padded to 1,024: position ids 0 on the padding
    assert one.planning_recipe(mbs2).data.packing is False     # rows of one length: nothing padded
    unpacked = validate_recipe({**recipe, "data": {**recipe["data"], "packing": False}})
    assert one.planning_recipe(unpacked).data.packing is False
