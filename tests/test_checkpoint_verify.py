"""Checkpoints are verified before they are trusted: MANIFEST.json (sizes, crc32 of small files)
written before COMPLETE; resume falls back to the newest checkpoint that verifies, with one
warning naming the file; a full disk during a save is one line and leaves nothing that counts.
The first tests use real folders (no engine); the slow ones real torchrun runs (gloo, CPU)."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import train_losses, zerotune
from test_checkpoint import data24, recipe, same_curve  # noqa: F401  (data24 is a fixture)
from zerotune.core.layout import DAMAGED_MARKER, MANIFEST_FILE, MARKER, STATE_FILE, complete_checkpoints
from zerotune.training.checkpoint import manifest
from zerotune.core.errors import CheckpointError
from zerotune.training.checkpoint.resume import resolve_resume


def make(run: Path, step: int, shard: bytes = b"w" * 1000) -> Path:
    d = run / "checkpoints" / f"step-{step:06d}"
    d.mkdir(parents=True)
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(shard)
    (d / "rng-rank0.safetensors").write_bytes(b"r" * 64)
    (d / STATE_FILE).write_text(json.dumps({"step": step, "world_size": 1, "eval_loss": None}))
    manifest.write(d)
    (d / MARKER).write_text("{}")
    return d


def test_manifest_records_every_file_and_verifies(tmp_path):
    d = make(tmp_path, 2)
    m = json.loads((d / MANIFEST_FILE).read_text())
    assert sorted(m["files"]) == ["rng-rank0.safetensors", "zero_pp_rank_0_mp_rank_00_optim_states.pt", STATE_FILE]
    assert m["files"]["rng-rank0.safetensors"] == {"size": 64, "crc32": manifest.crc32(d / "rng-rank0.safetensors")}
    assert manifest.verify(d) is None and manifest.total_bytes(d) == 1000 + 64 + (d / STATE_FILE).stat().st_size

    with open(d / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "r+b") as f:
        f.truncate(300)
    assert manifest.verify(d) == "zero_pp_rank_0_mp_rank_00_optim_states.pt is 300 bytes, 1,000 when saved (truncated)"
    (d / "rng-rank0.safetensors").write_bytes(b"x" * 64)   # same size, other bytes: the crc32 sees it
    assert manifest.verify(d).startswith("rng-rank0.safetensors does not match its crc32 (corrupted) (and 1 more)")
    (d / "rng-rank0.safetensors").unlink()
    assert manifest.verify(d).startswith("rng-rank0.safetensors is missing")


def test_large_files_get_their_size_checked_only(tmp_path, monkeypatch):
    monkeypatch.setattr(manifest, "CRC_MAX_BYTES", 100)
    d = make(tmp_path, 2)
    assert "crc32" not in json.loads((d / MANIFEST_FILE).read_text())["files"]["zero_pp_rank_0_mp_rank_00_optim_states.pt"]
    (d / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(b"z" * 1000)
    assert manifest.verify(d) is None


def test_resume_falls_back_past_a_damaged_newest_checkpoint(tmp_path, capsys):
    make(tmp_path, 2)
    make(tmp_path, 4)
    newest = make(tmp_path, 6)
    with open(newest / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "r+b") as f:
        f.truncate(10)
    assert resolve_resume(tmp_path, "auto").name == "step-000004"
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["zerotune: warning: checkpoint step-000006 is damaged: zero_pp_rank_0_mp_rank_00_optim_states.pt "
                   "is 10 bytes, 1,000 when saved (truncated); resuming from step-000004"]
    # set aside: no longer complete (status, export and retention skip it), the reason kept beside its files
    assert [c.name for c in complete_checkpoints(tmp_path)] == ["step-000002", "step-000004"]
    assert "truncated" in (newest / DAMAGED_MARKER).read_text() and newest.joinpath(STATE_FILE).is_file()
    assert resolve_resume(tmp_path, "auto").name == "step-000004" and capsys.readouterr().err == ""


def test_a_missing_shard_and_an_explicit_damaged_checkpoint(tmp_path, capsys):
    make(tmp_path, 2)
    newest = make(tmp_path, 4)
    (newest / "rng-rank0.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"^checkpoint.resume: '.*step-000004' is damaged: "
                                              r"rng-rank0.safetensors is missing$"):
        resolve_resume(tmp_path, str(newest))
    assert resolve_resume(tmp_path, "auto").name == "step-000002"
    assert "checkpoint step-000004 is damaged: rng-rank0.safetensors is missing; resuming from step-000002" in \
        capsys.readouterr().err


def test_no_checkpoint_that_verifies_is_an_error_not_a_fresh_start(tmp_path):
    for step in (2, 4):
        (make(tmp_path, step) / "rng-rank0.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        resolve_resume(tmp_path, "auto")
    assert str(e.value) == (f"no checkpoint in {tmp_path / 'checkpoints'} can be resumed: step-000004: "
                            "rng-rank0.safetensors is missing; step-000002: rng-rank0.safetensors is missing; "
                            "set checkpoint.resume: never with checkpoint.overwrite: true to start over")
    assert len(complete_checkpoints(tmp_path)) == 2   # nothing set aside: the next attempt says the same


def test_checkpoints_saved_before_manifests_are_trusted(tmp_path):
    d = make(tmp_path, 2)
    (d / MANIFEST_FILE).unlink()
    assert resolve_resume(tmp_path, "auto") == d


# ----------------------------------------------------------------------------- real runs


def shard(ckpt: Path, rank: int) -> Path:
    found = sorted(ckpt.glob(f"*zero_pp_rank_{rank}_*optim_states.pt"))
    assert found, sorted(p.name for p in ckpt.iterdir())
    return found[0]


@pytest.mark.slow
def test_truncated_then_missing_newest_shard_resumes_from_the_previous_checkpoint(tmp_path, data24):
    r = recipe(tmp_path, "v", 3, data24)
    run = tmp_path / "runs" / "v"
    zerotune("train", str(r), "--nproc", "2")
    want = train_losses(run)
    assert [c.name for c in complete_checkpoints(run)] == ["step-000004", "step-000006"]
    bad = shard(run / "checkpoints" / "step-000006", 1)
    size = bad.stat().st_size
    with open(bad, "r+b") as f:
        f.truncate(size // 2)

    p = zerotune("train", str(r), "--nproc", "2")
    warning = (f"zerotune: warning: checkpoint step-000006 is damaged: {bad.name} is {size // 2:,} bytes, "
               f"{size:,} when saved (truncated); resuming from step-000004")
    assert p.stderr.count(warning) == 1, p.stderr[-3000:]
    assert "Traceback" not in p.stderr and "resumed from step-000004" in p.stdout + p.stderr
    same_curve(train_losses(run), want, resumed_at=4)
    assert [c.name for c in complete_checkpoints(run)] == ["step-000004", "step-000006"]   # step 6 saved anew

    missing = shard(run / "checkpoints" / "step-000006", 0)
    missing.unlink()
    p = zerotune("train", str(r), "--nproc", "2")
    assert p.stderr.count(f"zerotune: warning: checkpoint step-000006 is damaged: {missing.name} is missing; "
                          "resuming from step-000004") == 1, p.stderr[-3000:]
    same_curve(train_losses(run), want, resumed_at=4)


@pytest.mark.slow
def test_full_disk_mid_save_is_one_line_and_never_counts(tmp_path, data24):
    """A real tmpfs too small for a second checkpoint (root), else an injected ENOSPC on rank 1."""
    r = recipe(tmp_path, "full", 3, data24)
    run = tmp_path / "runs" / "full"
    ckpts = run / "checkpoints"
    ckpts.mkdir(parents=True)
    env, mounted = {}, False
    if os.geteuid() == 0 and shutil.which("mount"):
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=5m", "tmpfs", str(ckpts)]).returncode == 0
    if not mounted:
        env = {"ZEROTUNE_TEST_ENOSPC": "4:1"}
    try:
        p = zerotune("train", str(r), "--nproc", "2", check=False, env=env)
        lines = [ln for ln in p.stderr.splitlines() if ln.startswith("zerotune: error:")]
        assert p.returncode == 2 and len(lines) == 1, p.stderr[-4000:]
        assert lines[0].startswith(f"zerotune: error: no space left on the device of {ckpts}: a checkpoint needs ~")
        assert lines[0].endswith("free some space (or lower checkpoint.keep) and run the same command to resume")
        assert "Traceback" not in p.stderr and "ChildFailedError" not in p.stderr
        assert [c.name for c in complete_checkpoints(run)] == ["step-000002"]
        assert not (ckpts / "step-000004").exists()             # the partial save gave its space back
        assert (run / "FAILED").read_text().startswith("no space left on the device of")
        assert "Traceback (most recent call last)" in "".join(p.read_text() for p in (run / "logs").glob("rank-*.log"))
    finally:
        if mounted:
            subprocess.run(["umount", str(ckpts)])


def test_a_write_cut_short_is_a_full_disk_only_when_the_checkpoint_cannot_fit(tmp_path, monkeypatch, capsys):
    """torch's zip writer reports a failed write as "unexpected pos A vs B", errno lost (the GPU machine,
    2026-12-06): as_said says the one full-disk line and removes the partial save when less is free
    than the checkpoint needs, and passes any other error, or the same one with room left, on as it is."""
    import torch
    from zerotune.training.checkpoint import disk_space

    class Engine:
        module = torch.nn.Linear(1000, 1000, bias=False)   # needs 1e6 x (4 + 12) bytes: 15.3 MiB

    run = tmp_path / "run"
    partial = run / "checkpoints" / "step-000006"
    partial.mkdir(parents=True)
    (partial / "mp_rank_00_model_states.pt").write_bytes(b"x" * 2708)
    cut = RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 2816 vs 2708")
    monkeypatch.setattr(disk_space, "_free", lambda folder: 1 << 30)
    assert disk_space.as_said(cut, run, partial, Engine()) is cut and partial.is_dir()
    monkeypatch.setattr(disk_space, "_free", lambda folder: 10 << 20)
    other = RuntimeError("CUDA error: an illegal memory access was encountered")
    assert disk_space.as_said(other, run, partial, Engine()) is other and partial.is_dir()
    said = disk_space.as_said(cut, run, partial, Engine())
    assert isinstance(said, CheckpointError) and not partial.exists()
    assert str(said).startswith(f"no space left on the device of {run / 'checkpoints'}: a checkpoint needs ~15.3 MiB")
    assert capsys.readouterr().err.count("zerotune: error: no space left on the device") == 1
