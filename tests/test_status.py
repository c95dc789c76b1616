"""`zerotune status` knows a dead run (RUN_DIR/HEARTBEAT: a pid check on its host, a stale time
elsewhere), a stopped one and a failed one, and a failed resume never reads as finished."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import base_recipe, write_recipe, zerotune
from zerotune.core.layout import HEARTBEAT_FILE, MARKER, complete_checkpoints
from zerotune.launcher.status import collect
from zerotune.core.runlock import STALE_AFTER_S
from zerotune.training.run.heartbeat import Heartbeat, read


def finished_metrics(run_dir: Path, step: int = 4) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    rows = [{"time": now - 60, "step": 0, "event": "start", "total_steps": step},
            {"time": now - 30, "step": step, "train/loss": 2.0, "total_steps": step},
            {"time": now - 20, "step": step, "event": "end"}]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def beat(run_dir: Path, **fields) -> None:
    record = {"pid": os.getpid(), "host": os.uname().nodename, "started": time.time() - 10, "time": time.time(),
              "step": 3, "state": "running", **fields}
    (run_dir / HEARTBEAT_FILE).write_text(json.dumps(record))


@pytest.fixture
def dead_pid():
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_heartbeat_writes_at_start_every_interval_and_at_the_end(tmp_path):
    state = {"step": 0}
    hb = Heartbeat(tmp_path, state, started=123.0, every=0.05).start()
    first = read(tmp_path)
    assert first["state"] == "running" and first["pid"] == os.getpid() and first["started"] == 123.0
    state["step"] = 7
    time.sleep(0.3)
    assert read(tmp_path)["step"] == 7 and read(tmp_path)["time"] > first["time"]
    hb.stop("interrupted", signal="SIGINT")
    last = read(tmp_path)
    time.sleep(0.15)
    assert read(tmp_path) == last and last["state"] == "interrupted" and last["signal"] == "SIGINT"


def test_a_run_whose_process_is_gone_is_stopped_at_once(tmp_path, dead_pid):
    finished_metrics(tmp_path)  # an earlier attempt finished; a newer one started and died
    beat(tmp_path, pid=dead_pid)
    s = collect(tmp_path)
    assert s["state"].startswith(f"stopped: its process ({dead_pid} on {os.uname().nodename}) is gone "
                                 "(last heartbeat "), s["state"]
    assert s["state"].endswith(", step 3)")


def test_a_live_process_is_running(tmp_path):
    finished_metrics(tmp_path)
    proc = subprocess.Popen([sys.executable, "-c", "import time; print('up', flush=True); time.sleep(60)",
                             "zerotune.training"], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline() == "up\n"
        beat(tmp_path, pid=proc.pid)
        assert collect(tmp_path)["state"] == "running"
    finally:
        proc.kill()
        proc.wait()
    assert collect(tmp_path)["state"].startswith("stopped: its process")


def test_another_hosts_run_is_stopped_once_its_heartbeat_is_stale(tmp_path):
    finished_metrics(tmp_path)
    beat(tmp_path, host="gpu-node-17", pid=1, time=time.time() - 10)
    assert collect(tmp_path)["state"] == "running"
    beat(tmp_path, host="gpu-node-17", pid=1, time=time.time() - STALE_AFTER_S - 30)
    assert collect(tmp_path)["state"].startswith(f"stopped: no heartbeat from gpu-node-17 for {STALE_AFTER_S + 30:.0f}s")


def test_stopped_preempted_finished_and_failed(tmp_path):
    finished_metrics(tmp_path)
    beat(tmp_path, state="interrupted", signal="SIGINT", step=5)
    assert collect(tmp_path)["state"] == "stopped by SIGINT after step 5: saved; run the same command to resume"
    beat(tmp_path, state="preempted", signal="SIGTERM", step=5)
    assert collect(tmp_path)["state"] == "stopped by SIGTERM after step 5: saved; run the same command to resume"
    beat(tmp_path, state="finished", step=4)
    assert collect(tmp_path)["state"] == "finished"
    (tmp_path / "FAILED").write_text("no checkpoint in x can be resumed: ...\n")
    assert collect(tmp_path)["state"] == "failed: no checkpoint in x can be resumed: ..."


@pytest.mark.slow
def test_a_failed_resume_is_failed_not_finished(tmp_path):
    """A finished run whose checkpoints are all damaged: the rerun fails with one line, and
    status says failed, not finished (its metrics.jsonl still ends with the first run's end)."""
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, train={"max_steps": 2}, distributed={"zero": 1},
                                                checkpoint={"every": 1, "save_final": False}))
    run_dir = tmp_path / "runs" / "t"
    zerotune("train", str(recipe))
    assert zerotune("status", str(run_dir)).stdout.splitlines()[1] == "state       finished"
    gone = {}
    for ckpt in complete_checkpoints(run_dir):
        shard = next(ckpt.glob("*optim_states.pt"))
        shard.unlink()
        gone[ckpt.name] = shard.name
    p = zerotune("train", str(recipe), check=False)
    errors = [ln for ln in p.stderr.splitlines() if "error" in ln.lower()]
    assert p.returncode == 2 and errors == [
        f"zerotune: error: no checkpoint in {run_dir / 'checkpoints'} can be resumed: "
        f"step-000002: {gone['step-000002']} is missing; step-000001: {gone['step-000001']} is missing; "
        "set checkpoint.resume: never with checkpoint.overwrite: true to start over"], p.stderr
    out = zerotune("status", str(run_dir)).stdout
    assert out.splitlines()[1].startswith("state       failed: no checkpoint in"), out
    assert all((c / MARKER).is_file() for c in (run_dir / "checkpoints").glob("step-*"))  # none set aside
