"""`zerotune export --out DIR` never deletes what it did not write (issue 11): the run folder, a
folder above or inside it, the working directory and foreign folders are refused with one line
and every file left in place; an earlier export of the same run (it carries .zerotune-export.json)
is replaced. Exports are written with normal permissions (0644 under umask 022) and with the KV
cache back on in config.json. The checkpoint is a real ZeRO-0 checkpoint of stories260K made
here (no torchrun), so these tests are fast."""
from __future__ import annotations

import json
import os
import shutil
import stat
from pathlib import Path

import pytest

from conftest import STORIES, base_recipe
from zerotune.core.layout import MARKER, STATE_FILE

EXPORT_MARKER = ".zerotune-export.json"


def tree(folder: Path) -> dict[str, int]:
    """Every file under `folder` with its size."""
    return {str(p.relative_to(folder)): p.stat().st_size for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def run(tmp_path) -> Path:
    """tmp/runs/t: recipe.yaml (on a copy of stories260K whose config.json says use_cache: false)
    and checkpoints/step-000001, a ZeRO-0 checkpoint holding the model's weights."""
    import torch
    from transformers import AutoModelForCausalLM

    from zerotune.core.recipe_load import validate_recipe
    model_dir = tmp_path / "model"
    shutil.copytree(STORIES, model_dir)
    config = json.loads((model_dir / "config.json").read_text())
    (model_dir / "config.json").write_text(json.dumps({**config, "use_cache": False}, indent=2))
    recipe = validate_recipe(base_recipe(tmp_path, model={"path": str(model_dir)}, distributed={"zero": 0}))
    run_dir = recipe.run_dir
    ckpt = run_dir / "checkpoints" / "step-000001"
    ckpt.mkdir(parents=True)
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    sd = AutoModelForCausalLM.from_pretrained(str(STORIES)).state_dict()
    torch.save({"module": sd}, ckpt / "mp_rank_00_model_states.pt")
    (ckpt / STATE_FILE).write_text(json.dumps({"step": 1, "world_size": 1}))
    (ckpt / MARKER).write_text('{"step": 1}\n')
    (run_dir / "metrics.jsonl").write_text('{"step": 1}\n')
    return run_dir


def export(capsys, *args) -> tuple[int, str]:
    from zerotune.launcher.cli import main
    rc = main(["export", *map(str, args)])
    return rc, capsys.readouterr().err


def test_export_refuses_the_run_folder_and_folders_above_or_inside_it(run, capsys, monkeypatch):
    before = tree(run.parent.parent)
    cases = {
        run: f"--out {run} is the run folder itself: exporting there would delete its checkpoints; "
             "choose a new folder (e.g. exported/t)",
        run.parent: f"--out {run.parent} holds the run folder {run}: exporting there would delete it; "
                    "choose a new folder (e.g. exported/t)",
        run / "checkpoints": f"--out {run / 'checkpoints'} is inside the run folder {run}, where only final/ may be "
                             "written; choose a new folder (e.g. exported/t)",
    }
    for out, message in cases.items():
        for force in ((), ("--force",)):   # --force never overrides these
            assert export(capsys, run, "--out", out, *force) == (2, f"zerotune: error: {message}\n")
    work = run.parent.parent / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert export(capsys, run, "--out", ".", "--force") == (
        2, "zerotune: error: --out . is the working directory or holds it; choose a new folder (e.g. exported/t)\n")
    assert tree(run.parent.parent) == before   # every file still there


def test_export_refuses_a_foreign_folder_unless_forced(run, tmp_path, capsys):
    foreign = tmp_path / "examples"
    (foreign / "data").mkdir(parents=True)
    (foreign / "data" / "rows.jsonl").write_text('{"text": "precious"}\n')
    (foreign / "README.md").write_text("mine\n")
    before = tree(foreign)
    rc, err = export(capsys, run, "--out", foreign)
    assert (rc, err) == (2, f"zerotune: error: --out {foreign} is not empty and is not an export of {run} (it has no "
                            ".zerotune-export.json); choose a new folder (e.g. exported/t), or pass --force to replace it\n")
    assert tree(foreign) == before
    a_file = tmp_path / "notes.txt"
    a_file.write_text("x")
    assert export(capsys, run, "--out", a_file) == (
        2, f"zerotune: error: --out {a_file} is a file; choose a new folder (e.g. exported/t), or pass --force to "
           "replace it\n")
    assert a_file.read_text() == "x"
    # an export of another run is not ours either
    other = tmp_path / "other-export"
    other.mkdir()
    (other / EXPORT_MARKER).write_text(json.dumps({"run_dir": "/somewhere/else"}))
    assert export(capsys, run, "--out", other) == (
        2, f"zerotune: error: --out {other} is an export of another run (/somewhere/else); choose a new folder "
           "(e.g. exported/t), or pass --force to replace it\n")
    # --force replaces the foreign folder with the export
    assert export(capsys, run, "--out", foreign, "--force")[0] == 0
    assert (foreign / "model.safetensors").is_file() and not (foreign / "README.md").exists()
    assert json.loads((foreign / EXPORT_MARKER).read_text())["run_dir"] == str(run.resolve())


def test_reexport_replaces_an_earlier_export_with_normal_permissions(run, tmp_path, capsys):
    out = tmp_path / "exported" / "t"
    old = os.umask(0o022)
    try:
        assert export(capsys, run, "--out", out)[0] == 0
        (out / "stale.txt").write_text("from the first export")
        assert export(capsys, run, "--out", out, "--checkpoint", "step-1")[0] == 0   # the same run: replaced
        assert export(capsys, run, "--out", run / "final")[0] == 0                   # the run's own final/ too
    finally:
        os.umask(old)
    assert not (out / "stale.txt").exists()
    marker = json.loads((out / EXPORT_MARKER).read_text())
    assert marker == {"run_dir": str(run.resolve()), "checkpoint": "step-000001", "content": "Hugging Face model"}
    for folder in (out, run / "final"):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o755
        for f in folder.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o644, f
        assert json.loads((folder / "config.json").read_text())["use_cache"] is True   # the base said false
    assert [p.name for p in out.parent.iterdir()] == ["t"]   # no temporary folders left beside it
    assert (run / "checkpoints" / "step-000001" / MARKER).is_file() and (run / "metrics.jsonl").is_file()


def test_save_final_writes_the_marker_use_cache_and_permissions(tmp_path):
    """RUN_DIR/final from the end of training (one gloo rank, a stand-in engine at ZeRO 0)."""
    import torch.distributed as dist
    from transformers import AutoModelForCausalLM

    from zerotune.core.recipe_load import validate_recipe
    from zerotune.training.export.write import save_final
    recipe = validate_recipe(base_recipe(tmp_path))
    model = AutoModelForCausalLM.from_pretrained(str(STORIES))
    model.config.use_cache = False   # as the loop sets it for training

    class Engine:
        module = model

        @staticmethod
        def zero_optimization_partition_weights():
            return False
    final = recipe.run_dir / "final"
    final.mkdir(parents=True)
    (final / "old.txt").write_text("an earlier final")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    old = os.umask(0o022)
    try:
        save_final(Engine(), model, recipe, final, rank=0)
    finally:
        os.umask(old)
        dist.destroy_process_group()
    assert json.loads((final / EXPORT_MARKER).read_text()) == {
        "run_dir": str(recipe.run_dir.resolve()), "checkpoint": "end of training", "content": "Hugging Face model"}
    assert json.loads((final / "config.json").read_text())["use_cache"] is True
    assert stat.S_IMODE((final / "model.safetensors").stat().st_mode) == 0o644
    assert not (final / "old.txt").exists()
