"""A changed recipe on resume (issue 11): when RUN_DIR holds checkpoints, a recipe that changes
the training is refused naming the changed keys, unless checkpoint.allow_recipe_change; the run's
length, eval, checkpoint.*, logging.* and cluster.* may change freely; the earlier recipe is kept
as RUN_DIR/recipe.<step>.yaml. The checkpoint is a stand-in (COMPLETE + zerotune_state.json):
only the launcher reads it here."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import base_recipe, without_data_warnings, write_recipe


def launch(capsys, recipe: Path, *sets: str) -> tuple[int, str]:
    from zerotune.launcher.cli import main
    args = [a for s in sets for a in ("--set", s)]
    rc = main(["launch", str(recipe), "--dry-run", "--nproc", "1", *args])
    err = capsys.readouterr().err   # without the data's own warnings (prompts over max_len), read before the plan
    return rc, without_data_warnings(err)


@pytest.fixture
def run(tmp_path, capsys) -> tuple[Path, Path]:
    """(recipe file, RUN_DIR) of a run prepared once and holding a complete checkpoint at step 4."""
    from zerotune.core.recipe_load import load_run_recipe
    recipe = write_recipe(tmp_path, base_recipe(tmp_path))
    assert launch(capsys, recipe)[0] == 0
    run_dir = tmp_path / "runs" / "t"
    ckpt = run_dir / "checkpoints" / "step-000004"
    ckpt.mkdir(parents=True)
    (ckpt / "zerotune_state.json").write_text(json.dumps(
        {"step": 4, "world_size": 1, "recipe_digest": load_run_recipe(run_dir).digest()}))
    (ckpt / "COMPLETE").write_text('{"step": 4}\n')
    return recipe, run_dir


def test_a_changed_training_recipe_is_refused_naming_the_keys(run, capsys):
    recipe, run_dir = run
    before = (run_dir / "recipe.yaml").read_text()
    rc, err = launch(capsys, recipe, "train.lr=0.0001", "data.max_len=256", "train.max_steps=8")
    assert rc == 2 and err == (
        f"zerotune: error: checkpoint.allow_recipe_change: {run_dir} holds checkpoints (newest step-000004) trained "
        "with another recipe: data.max_len 128 -> 256, train.lr 0.001 -> 0.0001; set "
        "checkpoint.allow_recipe_change: true to resume with the new one (the earlier one is kept as "
        "recipe.000004.yaml), or give the run another name\n")
    assert (run_dir / "recipe.yaml").read_text() == before
    assert sorted(p.name for p in run_dir.glob("recipe*.yaml")) == ["recipe.yaml"]


def test_length_logging_and_checkpoint_keys_may_change(run, capsys):
    recipe, run_dir = run
    before = (run_dir / "recipe.yaml").read_text()
    rc, err = launch(capsys, recipe, "train.max_steps=8", "checkpoint.keep=3", "logging.every=2")
    assert rc == 0
    assert (f"zerotune: the recipe changed since step-000004 (train.max_steps 4 -> 8, checkpoint.keep 2 -> 3, "
            f"logging.every 1 -> 2); the earlier one is kept as {run_dir / 'recipe.000004.yaml'}\n") in err
    assert (run_dir / "recipe.000004.yaml").read_text() == before
    assert "max_steps: 8" in (run_dir / "recipe.yaml").read_text()
    assert launch(capsys, recipe, "train.max_steps=8", "checkpoint.keep=3", "logging.every=2") == (0, err.split(
        "zerotune: the recipe changed")[0] + err.split("recipe.000004.yaml\n")[1])   # unchanged now: nothing kept
    assert sorted(p.name for p in run_dir.glob("recipe*.yaml")) == ["recipe.000004.yaml", "recipe.yaml"]


def test_allow_recipe_change_resumes_and_keeps_every_earlier_recipe(run, capsys):
    recipe, run_dir = run
    first = (run_dir / "recipe.yaml").read_text()
    assert launch(capsys, recipe, "train.max_steps=8")[0] == 0                      # kept as recipe.000004.yaml
    second = (run_dir / "recipe.yaml").read_text()
    rc, err = launch(capsys, recipe, "train.max_steps=8", "train.lr=0.0001", "checkpoint.allow_recipe_change=true")
    assert rc == 0 and (f"(train.lr 0.001 -> 0.0001, checkpoint.allow_recipe_change false -> true); the earlier one "
                        f"is kept as {run_dir / 'recipe.000004-2.yaml'}") in err
    assert (run_dir / "recipe.000004.yaml").read_text() == first
    assert (run_dir / "recipe.000004-2.yaml").read_text() == second
    assert "lr: 0.0001" in (run_dir / "recipe.yaml").read_text()


def test_a_lost_recipe_yaml_is_checked_by_the_checkpoint_digest(run, capsys):
    recipe, run_dir = run
    (run_dir / "recipe.yaml").unlink()
    assert launch(capsys, recipe)[0] == 0              # the same recipe: its digest matches the checkpoint's
    (run_dir / "recipe.yaml").unlink()
    saved = json.loads((run_dir / "checkpoints" / "step-000004" / "zerotune_state.json").read_text())["recipe_digest"]
    rc, err = launch(capsys, recipe, "train.lr=0.0001")
    assert rc == 2 and err == (
        f"zerotune: error: checkpoint.allow_recipe_change: {run_dir / 'checkpoints' / 'step-000004'} was trained with "
        f"another recipe (digest {saved}, {run_dir / 'recipe.yaml'} is missing); set checkpoint.allow_recipe_change: "
        "true to resume with the new one (the earlier one is kept as recipe.000004.yaml), or give the run another name\n")


def test_which_keys_change_the_training(tmp_path):
    from zerotune.core.recipe_load import validate_recipe
    from zerotune.launcher.prepare import is_resume_safe, recipe_changes
    a = validate_recipe(base_recipe(tmp_path))
    b = validate_recipe(base_recipe(tmp_path, data={"train": [{"path": "x.jsonl", "format": "messages"}]},
                                    cluster={"partition": "gpu"}))
    assert recipe_changes(a, b) == [
        ("data.train.0.path", a.data.train[0].path, "x.jsonl"), ("data.train.0.format", "alpaca", "messages"),
        ("cluster.partition", None, "gpu")]
    safe = ["train.max_steps", "train.epochs", "train.eval_every", "checkpoint.every", "checkpoint.keep",
            "logging.every", "cluster.nodes", "data.cache_dir", "output_dir"]
    training = ["train.lr", "train.seed", "data.max_len", "data.train.0.path", "model.path", "method.lora.r",
                "distributed.zero", "train.micro_batch_size", "train.warmup_steps"]
    assert all(map(is_resume_safe, safe)) and not any(map(is_resume_safe, training))


def test_an_auto_the_old_recipe_did_not_resolve_is_no_change(tmp_path):
    """RUN_DIR/recipe.yaml of an older zerotune has no train.offload_activations (its default is
    auto); the resolved value of today's launcher is not a change of the training."""
    from zerotune.core.recipe_load import validate_recipe
    from zerotune.launcher.prepare import recipe_changes
    gc = {"gradient_checkpointing": True}
    old = validate_recipe(base_recipe(tmp_path, train=gc))
    assert old.train.offload_activations == "auto"
    new = validate_recipe(base_recipe(tmp_path, train={**gc, "offload_activations": False}))
    assert recipe_changes(old, new) == []
    newer = validate_recipe(base_recipe(tmp_path, train={**gc, "offload_activations": True}))
    assert recipe_changes(new, newer) == [("train.offload_activations", False, True)]
