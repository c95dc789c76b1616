"""One run folder, one job; no orphaned ranks. Real `zerotune train` processes (2 CPU ranks,
gloo): a launcher killed outright (SIGKILL to its process group) takes its ranks with it and
leaves the newest complete checkpoint intact; a second job on a live run folder is refused in one
line (exit 2) and the first runs on unharmed; a stale lock is taken over with a warning; the same
Slurm job may take over its own lock (a requeue)."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from conftest import train_losses, zerotune
from test_checkpoint import data24, recipe  # noqa: F401  (data24 is a fixture)
from test_interrupt import Started
from zerotune.core import runlock
from zerotune.core.layout import HEARTBEAT_FILE, LOCK_FILE, latest_complete
from zerotune.training.checkpoint import manifest


def train_cmd(r, nproc=2):
    return [sys.executable, "-m", "zerotune.launcher.cli", "train", str(r), "--nproc", str(nproc)]


@pytest.mark.slow
def test_sigkill_to_the_launcher_group_takes_the_ranks_and_the_next_run_takes_over(tmp_path, data24):
    r = recipe(tmp_path, "killed", 3, data24, max_steps=12)
    run = tmp_path / "runs" / "killed"
    job = Started(train_cmd(r), tmp_path / "out.txt", ZEROTUNE_TEST_STEP_SLEEP="0.5")
    job.wait_for_step(run / "metrics.jsonl", 5)   # step-000004 saved (every 2)
    ranks = [pid for pid, cmd in job.seen.items() if b"\0-m\0zerotune.training\0" in cmd]
    assert len(ranks) == 2, job.seen
    os.killpg(job.proc.pid, signal.SIGKILL)        # the launcher's group: the ranks run in their own session
    job.proc.wait(30)
    deadline = time.time() + 10
    while job.survivors() and time.time() < deadline:
        time.sleep(0.2)
    assert job.survivors() == [], job.text()[-3000:]
    newest = latest_complete(run)
    assert newest is not None and newest.name >= "step-000004" and manifest.verify(newest) is None

    p = zerotune("train", str(r), "--nproc", "2")   # the dead launcher's lock is stale: taken over
    warn = [ln for ln in p.stderr.splitlines() if "stale lock" in ln]
    assert len(warn) == 1 and f"zerotune: warning: taking over the stale lock of {run} (held by pid " \
        f"{job.proc.pid} on {socket.gethostname()}" in warn[0], p.stderr[-3000:]
    assert f"resumed from {newest.name}" in p.stdout + p.stderr
    assert sorted(train_losses(run)) == list(range(1, 13))
    assert (run / LOCK_FILE).read_text() == ""   # released at the end: the next run has nothing to warn about


@pytest.mark.slow
def test_a_second_job_on_a_live_run_folder_is_refused_and_the_first_is_unharmed(tmp_path, data24):
    r = recipe(tmp_path, "busy", 3, data24, max_steps=8)
    run = tmp_path / "runs" / "busy"
    first = Started(train_cmd(r), tmp_path / "out.txt", ZEROTUNE_TEST_STEP_SLEEP="1")
    first.wait_for_step(run / "metrics.jsonl", 2)
    recipe_before = (run / "recipe.yaml").stat().st_mtime_ns
    second = zerotune("train", str(r), "--nproc", "2", check=False)
    assert second.returncode == 2, second.stderr[-3000:]
    lines = second.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"zerotune: error: {run} is in use by another job (pid {first.proc.pid} on {socket.gethostname()}, since "
        f"{time.strftime('%Y-%m-%d')} ") and lines[0].endswith(
        "); wait for it to end, stop it, or give this run another name"), second.stderr
    assert (run / "recipe.yaml").stat().st_mtime_ns == recipe_before
    assert first.finish() == 0, first.text()[-3000:]
    assert sorted(train_losses(run)) == list(range(1, 9))


def holder(tmp_path, run_dir, **env):
    """Another process that takes the lock of run_dir and keeps it until killed."""
    code = ("import sys, time; from zerotune.core import runlock; runlock.acquire(sys.argv[1]); "
            "print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(run_dir), "zerotune"], stdout=subprocess.PIPE, text=True,
                         env={**os.environ, **env})
    assert p.stdout.readline().strip() == "held"
    return p


def test_lock_is_refused_while_held_taken_over_when_stale_and_shared_by_one_slurm_job(tmp_path, monkeypatch, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    other = holder(tmp_path, run_dir, SLURM_JOB_ID="77")
    try:
        monkeypatch.delenv("SLURM_JOB_ID", raising=False)
        with pytest.raises(runlock.RunBusyError, match=rf"is in use by another job \(pid {other.pid} on .*Slurm job 77"):
            runlock.acquire(run_dir)
        monkeypatch.setenv("SLURM_JOB_ID", "77")   # another node of the same job: shares it
        runlock.acquire(run_dir)
        assert str(run_dir.resolve()) not in runlock._held
    finally:
        other.kill()
        other.wait()
    monkeypatch.delenv("SLURM_JOB_ID")
    runlock.acquire(run_dir)   # its holder is gone: stale
    assert f"taking over the stale lock of {run_dir} (held by pid {other.pid}" in capsys.readouterr().err
    assert json.loads((run_dir / LOCK_FILE).read_text())["pid"] == os.getpid()
    runlock.release(run_dir)


def test_ranks_that_outlived_their_launcher_keep_the_run_folder_busy(tmp_path):
    """The launcher's lock is free (it died), but rank 0's heartbeat says running and its process lives."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    orphan = subprocess.Popen([sys.executable, "-c", "print('up', flush=True); import time; time.sleep(60)",
                               "zerotune.training"], stdout=subprocess.PIPE, text=True)
    assert orphan.stdout.readline().strip() == "up"   # started (its command line is the training's)
    try:
        (run_dir / HEARTBEAT_FILE).write_text(json.dumps({"pid": orphan.pid, "host": socket.gethostname(),
                                                          "started": time.time(), "time": time.time(),
                                                          "state": "running", "step": 3}))
        with pytest.raises(runlock.RunBusyError, match=rf"pid {orphan.pid} \(rank 0\) on "):
            runlock.acquire(run_dir)
    finally:
        orphan.kill()
        orphan.wait()
    runlock.acquire(run_dir)
    runlock.release(run_dir)
