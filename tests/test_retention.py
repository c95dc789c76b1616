"""Retention and checkpoint discovery on real folders (no engine needed)."""
from __future__ import annotations

import json

from zerotune.training.checkpoint.resume import resolve_resume
from zerotune.training.checkpoint.save import prune
from zerotune.core.layout import MARKER, STATE_FILE, complete_checkpoints, latest_complete, partial_checkpoints


def make(run, step, eval_loss=None, complete=True):
    d = run / "checkpoints" / f"step-{step:06d}"
    d.mkdir(parents=True)
    (d / "zero_pp_rank_0_mp_rank_00_model_states.pt").write_bytes(b"x")
    (d / STATE_FILE).write_text(json.dumps({"step": step, "eval_loss": eval_loss, "world_size": 1}))
    if complete:
        (d / MARKER).write_text("{}")
    return d


def names(paths):
    return [p.name for p in paths]


def test_keeps_the_newest_and_the_best_by_eval_loss(tmp_path):
    for step, loss in [(100, 2.0), (200, 1.5), (300, 1.7), (400, 1.9), (500, 1.8)]:
        make(tmp_path, step, loss)
    make(tmp_path, 450, complete=False)   # an interrupted save older than the newest complete one
    deleted = prune(tmp_path, keep=2)
    assert names(complete_checkpoints(tmp_path)) == ["step-000200", "step-000400", "step-000500"]
    assert sorted(names(deleted)) == ["step-000100", "step-000300", "step-000450"]
    assert partial_checkpoints(tmp_path) == []


def test_best_inside_the_window_is_not_kept_twice_and_no_eval_means_newest_only(tmp_path):
    for step in (1, 2, 3):
        make(tmp_path, step)
    prune(tmp_path, keep=1)
    assert names(complete_checkpoints(tmp_path)) == ["step-000003"]


def test_resume_picks_the_newest_complete_and_ignores_a_partial_one(tmp_path, capsys):
    make(tmp_path, 10)
    make(tmp_path, 20, complete=False)
    assert latest_complete(tmp_path).name == "step-000010"
    assert resolve_resume(tmp_path, "auto").name == "step-000010"
    assert "ignoring incomplete checkpoint(s) step-000020" in capsys.readouterr().err
    assert resolve_resume(tmp_path, "never") is None
    assert resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step-000010")).name == "step-000010"
    import pytest
    from zerotune.core.errors import CheckpointError
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        resolve_resume(tmp_path, str(tmp_path / "checkpoints" / "step-000020"))


def test_resume_never_refuses_to_overwrite_a_run_unless_told(tmp_path):
    import pytest
    from zerotune.core.layout import check_fresh_start
    from zerotune.core.recipe import RecipeError
    make(tmp_path, 10)
    with pytest.raises(RecipeError, match="already holds checkpoints"):
        check_fresh_start(tmp_path, "never", overwrite=False)
    check_fresh_start(tmp_path, "never", overwrite=True)
    check_fresh_start(tmp_path, "auto", overwrite=False)


def test_cli_refuses_fresh_start_over_a_run_before_writing_anything(tmp_path, recipe_file):
    from conftest import zerotune
    run = tmp_path / "runs" / "t"
    make(run, 10)
    (run / "recipe.yaml").write_text("the old run's recipe\n")
    p = zerotune("train", str(recipe_file()), "--set", "checkpoint.resume=never", check=False)
    assert p.returncode == 2 and "already holds checkpoints" in p.stderr and "Traceback" not in p.stderr
    assert (run / "recipe.yaml").read_text() == "the old run's recipe\n"
