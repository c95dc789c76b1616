"""One run folder, one job; no orphaned ranks. Real `zerotune train` processes (2 CPU ranks,
gloo): a launcher killed outright (SIGKILL to its process group) takes its ranks with it and
leaves the newest complete checkpoint intact; a second job on a live run folder is refused in one
line (exit 2) and the first runs on unharmed; a stale lock is taken over with a warning; the same
Slurm job may take over its own lock (a requeue). On a cluster's disks: NFS's flock (an exclusive
lock on a read-only descriptor is EBADF) lets a run folder train again; a flock held with an empty
record is busy; two jobs started at the same instant train once."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

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
    # the two ranks, not a child a rank forks for a moment (py-cpuinfo's probe, a compiler: CI 2026-12-07)
    assert len(job.ranks()) == 2, job.seen
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


# ----------------------------------------------------------------------------- cluster disks and races
FAKE_FS = '''"""A file system as a cluster's shared disk has it, for every Python process started with this
folder on PYTHONPATH (the command, its torchrun, the ranks)."""
import errno, fcntl, os, time
_flock = fcntl.flock
NFS = bool(os.environ.get("FAKE_FS_NFS"))
SLOW_S = float(os.environ.get("FAKE_FS_SLOW_S") or 0)


def flock(fd, op):
    fd = fd if isinstance(fd, int) else fd.fileno()
    if NFS and op & fcntl.LOCK_EX and fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY:
        raise OSError(errno.EBADF, os.strerror(errno.EBADF))   # NFSv4: flock is a POSIX lock (write access)
    out = _flock(fd, op)
    if SLOW_S and op & fcntl.LOCK_EX:
        time.sleep(SLOW_S)   # a slow server: the next call of the holder comes that much later
    return out


fcntl.flock = flock
'''


def fake_fs(tmp_path, nfs: bool = False, slow_s: float = 0.0) -> dict:
    """The env of a command that runs on that file system (a sitecustomize on PYTHONPATH)."""
    folder = tmp_path / "fake_fs"
    folder.mkdir(exist_ok=True)
    (folder / "sitecustomize.py").write_text(FAKE_FS)
    path = os.pathsep.join([str(folder), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {"PYTHONPATH": path, "FAKE_FS_NFS": "1" if nfs else "", "FAKE_FS_SLOW_S": str(slow_s)}


@pytest.mark.slow
def test_on_nfs_a_run_folder_with_a_lock_trains_again(tmp_path, data24):
    """NFSv4's flock is a POSIX lock: an exclusive one on a read-only descriptor is EBADF. The
    second `zerotune train` of a run folder (a resume) looks at its LOCK and trains on."""
    env = fake_fs(tmp_path, nfs=True)
    probe = ("import errno, fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY)\n"
             "try: fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except OSError as e: sys.exit(0 if e.errno == errno.EBADF else 1)\nsys.exit(1)")
    assert subprocess.run([sys.executable, "-c", probe, str(data24)], env={**os.environ, **env}).returncode == 0
    r = recipe(tmp_path, "nfs", 0, data24, max_steps=2)
    run = tmp_path / "runs" / "nfs"
    zerotune("train", str(r), "--nproc", "1", env=env)
    assert (run / LOCK_FILE).is_file()
    p = zerotune("train", str(r), "--nproc", "1", "--set", "train.max_steps=3", env=env, check=False)
    assert p.returncode == 0, p.stderr[-3000:]
    assert "resumed from step-000002" in p.stdout + p.stderr
    assert sorted(train_losses(run)) == [1, 2, 3]


def flock_holder(lock: Path, record: str = "") -> subprocess.Popen:
    """Another process that holds the flock of `lock` with that record (empty: between its flock
    and its write, or while it releases) until killed."""
    code = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_RDWR | os.O_CREAT); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.ftruncate(fd, 0); os.write(fd, sys.argv[2].encode()); "
            "print('held', flush=True); time.sleep(120)")
    p = subprocess.Popen([sys.executable, "-c", code, str(lock), record], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "held"
    return p


@pytest.mark.slow
def test_a_held_lock_with_an_empty_record_refuses_a_second_job_in_one_line(tmp_path, data24):
    r = recipe(tmp_path, "held", 0, data24, max_steps=2)
    run = tmp_path / "runs" / "held"
    run.mkdir(parents=True)
    other = flock_holder(run / LOCK_FILE)
    try:
        p = zerotune("train", str(r), "--nproc", "1", check=False)
    finally:
        other.kill()
        other.wait()
    assert p.returncode == 2, (p.stdout + p.stderr)[-3000:]
    assert p.stderr.splitlines() == [
        f"zerotune: error: {run} is in use by another job (its LOCK is locked but names no job yet: one is starting "
        "or ending); wait for it to end, stop it, or give this run another name"], p.stderr[-3000:]
    assert not (run / "recipe.yaml").exists() and not (run / "metrics.jsonl").exists()


def test_a_held_lock_is_never_taken_over_whatever_its_record_says(tmp_path, capsys):
    """A stale record (its job gone) under a flock someone holds: that someone is taking it over."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = json.dumps({"host": socket.gethostname(), "pid": int(dead.stdout), "started": time.time() - 99})
    for record in ("", stale, "{not json"):
        other = flock_holder(run_dir / LOCK_FILE, record)
        try:
            with pytest.raises(runlock.RunBusyError, match="is in use by another job"):
                runlock.check(run_dir)
            with pytest.raises(runlock.RunBusyError, match="is in use by another job"):
                runlock.acquire(run_dir)
        finally:
            other.kill()
            other.wait()
        assert "taking over" not in capsys.readouterr().err
        assert (run_dir / LOCK_FILE).read_text() == record
    runlock.acquire(run_dir)   # now nobody holds it
    runlock.release(run_dir)


@pytest.mark.slow
def test_two_jobs_started_at_the_same_instant_train_once(tmp_path, data24):
    """Two `zerotune train` of one run folder at once, 20 times (on a disk whose server answers
    0.5 s late, so the loser looks while the winner's record is not written yet): exactly one passes
    the lock each time (it is stopped there: it prints its run dir before torchrun); the other is
    refused in one line, exit 2."""
    from zerotune.launcher.agent import descendants
    r = recipe(tmp_path, "race", 0, data24, max_steps=1)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore", "TOKENIZERS_PARALLELISM": "false",
           **fake_fs(tmp_path, slow_s=0.5)}
    zerotune("data", "prepare", str(r))   # the tokenized cache, once (beside the run folders)
    for i in range(20):
        run = tmp_path / "runs" / f"race{i}"
        outs = [tmp_path / f"race{i}-{k}.txt" for k in range(2)]
        jobs = [subprocess.Popen(train_cmd(r, 1) + ["--set", f"name=race{i}"], stdout=open(out, "w"),
                                 stderr=subprocess.STDOUT, env=env, start_new_session=True) for out in outs]
        passed = []
        try:
            deadline = time.time() + 300
            while True:
                texts = [out.read_text(errors="replace") for out in outs]
                passed = [k for k in range(2) if "zerotune: run dir" in texts[k]]
                done = [k for k in range(2) if k in passed or jobs[k].poll() is not None]
                if len(done) == 2:
                    break
                assert time.time() < deadline, texts
                time.sleep(0.05)
        finally:
            for job in jobs:
                for pid in [job.pid, *descendants(job.pid)]:
                    try:
                        os.kill(pid, signal.SIGKILL)
                    except ProcessLookupError:
                        pass
                job.wait(30)
        texts = [out.read_text(errors="replace") for out in outs]
        assert len(passed) == 1, (i, texts)
        loser = 1 - passed[0]
        assert jobs[loser].returncode == 2, (i, texts[loser][-3000:])
        busy = [ln for ln in texts[loser].splitlines() if ln.startswith("zerotune: error: ")]
        named = (f"(pid {jobs[passed[0]].pid} on ", "(its LOCK is locked but names no job yet")   # a winner slower still
        assert len(busy) == 1 and any(f"{run} is in use by another job {n}" in busy[0] for n in named), \
            (i, texts[loser][-3000:])
