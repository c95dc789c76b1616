"""Preflight (issue 11): what `zerotune train` / `zerotune launch` check in the launcher process
before torchrun, each failure one exact line, in order (model folder, tokenizer vocabulary, data,
max_len, resume target, disk space), with RUN_DIR untouched. The CLI runs in-process
(launcher.cli.main) except where the real one-line stderr of a subprocess is the point."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import PHI3_TOKENIZER, ROOT, STORIES, base_recipe, without_data_warnings, write_recipe, zerotune

FIXTURES = ROOT / "tests" / "fixtures" / "data"


def launch(capsys, recipe: Path, *args) -> tuple[int, str]:
    """`zerotune launch RECIPE --dry-run --nproc 1 ...` in-process: (exit code, stderr)."""
    from zerotune.launcher.cli import main
    rc = main(["launch", str(recipe), "--dry-run", "--nproc", "1", *map(str, args)])
    return rc, capsys.readouterr().err


def error(capsys, recipe: Path, *args) -> str:
    rc, err = launch(capsys, recipe, *args)   # the data's own warnings (prompts over max_len) may come first
    err = without_data_warnings(err)
    assert rc == 2 and err.startswith("zerotune: error: ") and err.count("\n") == 1, err
    return err.removeprefix("zerotune: error: ").rstrip("\n")


def model_copy(tmp_path: Path, *names: str) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    for name in names:
        shutil.copy(STORIES / name, folder / name)
    return folder


# ----------------------------------------------------------------------------- model folder
def test_model_folder_needs_config_tokenizer_and_weights(tmp_path, capsys):
    recipe = write_recipe(tmp_path, base_recipe(tmp_path))
    folder = model_copy(tmp_path, "model.safetensors")
    assert error(capsys, recipe, "--set", f"model.path={folder}") == \
        f"model.path: '{folder}' is a folder without config.json (not a Hugging Face model)"
    shutil.copy(STORIES / "config.json", folder)
    assert error(capsys, recipe, "--set", f"model.path={folder}") == (
        f"model.path: '{folder}' has no tokenizer files (tokenizer.json, tokenizer.model, vocab.json, ...); "
        "set model.tokenizer to the folder or hub id of its tokenizer")
    (folder / "model.safetensors").unlink()
    shutil.copy(STORIES / "tokenizer.json", folder)
    assert error(capsys, recipe, "--set", f"model.path={folder}") == \
        f"model.path: '{folder}' has no weights (*.safetensors, *.bin or an index)"
    assert not (tmp_path / "runs" / "t").exists()


def test_offline_hub_id_fails_at_once_naming_the_folders_tried(tmp_path):
    recipe = write_recipe(tmp_path, base_recipe(tmp_path))
    p = zerotune("launch", str(recipe), "--dry-run", "--set", "model.path=no-such-org/no-such-model", check=False,
                 env={"HF_HUB_OFFLINE": "1"})
    assert p.returncode == 2 and p.stderr == (
        f"zerotune: error: model.path: 'no-such-org/no-such-model' is not a local folder (tried "
        f"{tmp_path}/no-such-org/no-such-model, {ROOT}/no-such-org/no-such-model) and could not be fetched from the "
        "hub (HF_HUB_OFFLINE=1 and it is not in the local Hugging Face cache)\n")


# ----------------------------------------------------------------------------- tokenizer vocabulary
def test_a_much_larger_tokenizer_is_refused(tmp_path, capsys):
    """phi-3's 32k tokenizer on stories260K's 512 embeddings would grow the model many times over."""
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, model={"tokenizer": str(PHI3_TOKENIZER)}))
    assert error(capsys, recipe) == (
        f"model.tokenizer: the tokenizer of '{PHI3_TOKENIZER}' has 32,011 tokens but the model has 512 embeddings "
        "(config.json vocab_size): training would add 31,499 embedding rows; use the model's own tokenizer "
        "(up to 8 new tokens, e.g. a chat template's, are allowed)")
    assert not (tmp_path / "runs" / "t").exists()


def test_a_few_template_tokens_are_allowed_for_full_runs_only(tmp_path, capsys):
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, model={"chat_template": "chatml"}))
    assert launch(capsys, recipe)[0] == 0                  # 512 + 2 tokens: the loop resizes the embedding
    lora = write_recipe(tmp_path, base_recipe(tmp_path, name="l", model={"chat_template": "chatml"},
                                              method={"kind": "lora"}, distributed={"zero": 0}), "lora.yaml")
    assert error(capsys, lora) == (
        "model.chat_template: 'chatml' adds token(s) ['<|im_start|>', '<|im_end|>'] that the model's vocabulary "
        "lacks; method.kind lora cannot train new embeddings: use a template made of tokens the tokenizer has, "
        "or method.kind: full")


# ----------------------------------------------------------------------------- data
@pytest.mark.parametrize("fixture", ["truncated.json", "alpaca_missing_output.json"])
def test_bad_data_fails_in_the_launcher_and_keeps_the_run_folder(tmp_path, capsys, fixture):
    from zerotune.core.recipe_load import validate_recipe
    from zerotune.training.data.formats import DataError
    from zerotune.training.data.build import build_data
    from zerotune.training.data.build import load_tokenizer
    sections = {"data": {"train": [{"path": str(FIXTURES / fixture), "format": "alpaca"}], "max_len": 128}}
    r = validate_recipe(base_recipe(tmp_path, **sections))
    with pytest.raises(DataError) as expected:   # the data layer's own message, passed on as it is
        build_data(r, load_tokenizer(r), use_cache=False)
    run_dir = tmp_path / "runs" / "t"
    run_dir.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text("the earlier run's\n")
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, **sections))
    assert error(capsys, recipe) == str(expected.value)
    assert sorted(p.name for p in run_dir.iterdir()) == ["metrics.jsonl", "recipe.yaml"]
    assert (run_dir / "recipe.yaml").read_text() == "the earlier run's\n"


def test_max_len_past_the_context_warns(tmp_path, capsys):
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, data={"max_len": 1024}))
    rc, err = launch(capsys, recipe)
    assert rc == 0
    assert ("zerotune: warning: data.max_len 1024 is longer than the model's context (config.json "
            "max_position_embeddings: 512); positions past it were never trained\n") in err
    rows = tmp_path / "long.json"   # the data check's own warnings come through too
    rows.write_text(json.dumps([{"instruction": "word " * 50, "output": "x " * 20}] * 3))
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, data={"train": [{"path": str(rows), "format": "alpaca"}],
                                                                "max_len": 16}))
    rc, err = launch(capsys, recipe)
    assert rc == 0 and f"zerotune: warning: data.max_len 16 truncates every sample of {rows} (3 of 3;" in err


# ----------------------------------------------------------------------------- resume target, disk, counts
def test_resume_target_must_be_a_complete_checkpoint(tmp_path, capsys):
    recipe = write_recipe(tmp_path, base_recipe(tmp_path))
    missing = tmp_path / "nope"
    assert error(capsys, recipe, "--set", f"checkpoint.resume={missing}") == \
        f"checkpoint.resume: '{missing}' is not a folder (use auto, never or a checkpoints/step-N folder)"
    partial = tmp_path / "other" / "checkpoints" / "step-000002"
    partial.mkdir(parents=True)
    assert error(capsys, recipe, "--set", f"checkpoint.resume={partial}") == \
        f"checkpoint.resume: '{partial}' is not a complete checkpoint (no COMPLETE file)"
    (partial / "COMPLETE").write_text("{}")
    assert error(capsys, recipe, "--set", f"checkpoint.resume={partial}") == \
        f"checkpoint.resume: '{partial}' is not a zerotune checkpoint (no zerotune_state.json)"
    (partial / "zerotune_state.json").write_text(json.dumps({"step": 2, "world_size": 1}))
    assert launch(capsys, recipe, "--set", f"checkpoint.resume={partial}")[0] == 0


def test_disk_space_for_one_checkpoint(tmp_path, capsys, monkeypatch):
    from zerotune.launcher import preflight
    monkeypatch.setattr(preflight, "free_bytes", lambda folder: 1_000_000)
    recipe = write_recipe(tmp_path, base_recipe(tmp_path))
    # stories260K, fp32, ZeRO-3: fp32 weights + Adam m, v in the optimizer shards, no weights in the model states
    # the tokenized cache (runs/.zerotune-cache: the plan reads its lengths) is written before this check
    assert error(capsys, recipe) == (
        f"output_dir: {tmp_path / 'runs'} has 1.0 MiB free but one checkpoint of this run needs about 3.0 MiB "
        "(260,032 parameters x 12 bytes); free some space or point output_dir at a larger disk")
    assert error(capsys, recipe, "--set", "distributed.zero=2").endswith("(260,032 parameters x 16 bytes); free some "
                                                                         "space or point output_dir at a larger disk")
    assert not (tmp_path / "runs" / "t").exists()


@pytest.mark.parametrize("command,args,message", [
    ("train", ["--nproc", "0"], "--nproc 0: must be 1 or more"),
    ("train", ["--nproc", "-2"], "--nproc -2: must be 1 or more"),
    ("launch", ["--nproc", "0"], "--nproc 0: must be 1 or more"),
    ("launch", ["--nnodes", "0"], "--nnodes 0: must be 1 or more"),
    ("launch", ["--nnodes", "2", "--node-rank", "2", "--master-addr", "h"], "--node-rank 2: must be 0 to 1 (--nnodes 2)"),
])
def test_process_and_node_counts(tmp_path, capsys, command, args, message):
    from zerotune.launcher.cli import main
    recipe = write_recipe(tmp_path, base_recipe(tmp_path))
    assert main([command, str(recipe), *args]) == 2
    assert capsys.readouterr().err == f"zerotune: error: {message}\n"
    assert not (tmp_path / "runs").exists()


def test_checks_run_in_order(tmp_path, capsys):
    """A recipe with a bad model, bad data and a bad resume target: the model is named first, then the data."""
    bad_data = {"train": [{"path": str(FIXTURES / "truncated.json"), "format": "alpaca"}]}
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, data=bad_data, checkpoint={"resume": str(tmp_path)}))
    no_config = model_copy(tmp_path, "tokenizer.json")
    assert error(capsys, recipe, "--set", f"model.path={no_config}").startswith("model.path: ")
    assert error(capsys, recipe).startswith(f"{FIXTURES / 'truncated.json'} line 1: ")
