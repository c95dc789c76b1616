"""The launcher's own job.sbatch on a real Slurm cluster (2 simulated nodes on this machine).

tests/slurm_cluster/start_cluster.sh (a copy of ../shared/slurm-cluster) installs Debian's
Slurm if missing and starts munge, slurmctld and two slurmd; it needs root. The nodes get 2
fake GPUs each (character devices aliasing /dev/null) so `--gpus-per-node` is exercised; the
training runs on CPU with gloo.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from conftest import base_recipe, write_recipe, zerotune

HERE = Path(__file__).resolve().parent
CLUSTER = HERE / "slurm_cluster"
ENV = {"SLURM_CLUSTER_NODES": "2", "SLURM_CLUSTER_GPUS": "2", "SLURM_CLUSTER_CPUS": "2"}

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]


@pytest.fixture(scope="module")
def cluster():
    if os.geteuid() != 0:
        pytest.skip("the test Slurm cluster needs root")
    if not shutil.which("slurmctld") and not shutil.which("apt-get"):
        pytest.skip("no Slurm and no apt-get to install it")
    proc = subprocess.run(["bash", str(CLUSTER / "start_cluster.sh")], capture_output=True, text=True,
                          env={**os.environ, **ENV}, timeout=600)
    assert proc.returncode == 0, f"start_cluster.sh failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    yield
    # leave the cluster up for the next test module / run; tests/slurm_cluster/stop_cluster.sh stops it


def job(job_id: str) -> dict:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(item.split("=", 1) for item in out.split() if "=" in item)


def wait_for(job_id: str, states: tuple, timeout: float = 400) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job(job_id)
        if info.get("JobState") in states:
            return info
        time.sleep(1)
    raise AssertionError(f"job {job_id} not in {states} after {timeout}s: {job(job_id)}")


def slurm_recipe(tmp_path: Path, nodes: int, gpus: int, **extra) -> Path:
    r = base_recipe(tmp_path, cluster={"nodes": nodes, "gpus_per_node": gpus, "time": "00:15:00"},
                    checkpoint={"every": 2, "keep": 2, "save_final": False},
                    logging={"progress": False, "tensorboard": False})
    r["train"].update(max_steps=6, lr=3e-3)
    for k, v in extra.items():
        r[k].update(v)
    return write_recipe(tmp_path, r)


def submit(recipe: Path) -> str:
    job_id = zerotune("launch", str(recipe), "--slurm", "--submit").stdout.strip()
    assert job_id.isdigit(), job_id
    return job_id


def logs(run_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(run_dir.glob("slurm-*")))


def losses(run_dir: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r}


def check_finished(run_dir: Path, job_id: str, steps: int) -> None:
    info = wait_for(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"))
    assert info["JobState"] == "COMPLETED" and info["ExitCode"] == "0:0", f"{info}\n{logs(run_dir)[-6000:]}"
    loss = losses(run_dir)
    assert max(loss) == steps
    assert loss[steps] < loss[1], loss
    done = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step-*/COMPLETE"))
    assert done and done[-1] == f"step-{steps:06d}", done
    assert (run_dir / "slurm_job_id").read_text().strip() == job_id


def test_one_node_two_processes(cluster, tmp_path):
    recipe = slurm_recipe(tmp_path, nodes=1, gpus=2)
    job_id = submit(recipe)
    run_dir = tmp_path / "runs" / "t"
    check_finished(run_dir, job_id, 6)
    assert "2 process(es)" in logs(run_dir)


def test_two_nodes_one_process_each(cluster, tmp_path):
    recipe = slurm_recipe(tmp_path, nodes=2, gpus=1)
    job_id = submit(recipe)
    run_dir = tmp_path / "runs" / "t"
    check_finished(run_dir, job_id, 6)
    assert "on 2 node(s) x 1 process(es)" in logs(run_dir)
    from zerotune.launcher.submit import slurm_job_state
    state = slurm_job_state(run_dir)
    assert state["job_id"] == job_id and state["state"] == "COMPLETED" and state["exit_code"] == "0:0"


def test_time_limit_signal_saves_requeues_and_completes(cluster, tmp_path):
    """USR1 to the batch shell (what --signal=B:USR1@grace sends before the time limit): the
    training saves at the next step and exits, the job requeues itself and finishes from there."""
    steps = 100
    recipe = slurm_recipe(tmp_path, nodes=1, gpus=1, train={"max_steps": steps, "lr": 1e-3},
                          checkpoint={"every": 1000}, distributed={"zero": 1})
    job_id = submit(recipe)
    run_dir = tmp_path / "runs" / "t"
    deadline = time.time() + 300
    while not ((run_dir / "metrics.jsonl").is_file() and losses(run_dir) and max(losses(run_dir)) >= 3):
        assert time.time() < deadline, f"no training steps logged\n{logs(run_dir)[-4000:]}"
        assert job(job_id).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), logs(run_dir)[-4000:]
        time.sleep(0.5)
    subprocess.run(["scancel", "--signal=USR1", "--batch", job_id], check=True)

    info = wait_for(job_id, ("PENDING", "COMPLETED", "FAILED"), timeout=300)
    assert info["JobState"] == "PENDING" and info.get("Restarts") == "1", f"{info}\n{logs(run_dir)[-6000:]}"
    saved = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step-*/COMPLETE"))
    assert saved, logs(run_dir)[-4000:]
    stopped_at = int(saved[-1].split("-")[1])
    assert 3 <= stopped_at < steps
    assert (run_dir / "PREEMPTED").is_file()
    time.sleep(2.5)  # a requeued job may be released 2 s after the requeue at the earliest
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)

    check_finished(run_dir, job_id, steps)
    text = logs(run_dir)
    assert "requeueing job" in text and f"resumed from step-{stopped_at:06d}" in text, text[-6000:]
    assert not (run_dir / "PREEMPTED").exists()


def wait_for_steps(run_dir: Path, job_id: str, step: int, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not ((run_dir / "metrics.jsonl").is_file() and losses(run_dir) and max(losses(run_dir)) >= step):
        assert time.time() < deadline, f"no training steps logged\n{logs(run_dir)[-4000:]}"
        assert job(job_id).get("JobState") in ("PENDING", "RUNNING", "CONFIGURING"), logs(run_dir)[-4000:]
        time.sleep(0.5)


def release(job_id: str, restarts: int) -> dict:
    """Wait for the requeued job (Restarts=restarts, pending) and let it start now."""
    deadline = time.time() + 300
    while True:  # a job that has not started yet is PENDING too, with fewer restarts
        info = job(job_id)
        if info.get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"):
            break
        if info.get("JobState") == "PENDING" and info.get("Restarts") == str(restarts):
            break
        assert time.time() < deadline, f"job {job_id} not requeued {restarts} time(s) after 300s: {info}"
        time.sleep(1)
    assert info["JobState"] == "PENDING" and info.get("Restarts") == str(restarts), info
    time.sleep(2.5)  # a requeued job may be released 2 s after the requeue at the earliest
    subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True)
    return info


def test_sigterm_preemption_saves_requeues_and_completes(cluster, tmp_path):
    """SIGTERM to the job's steps, as Slurm sends it on preemption (`scancel --signal=TERM`: every
    process of the steps, not the batch shell): the supervisor and the training processes get it,
    the training saves at the next step and exits 85, job.sbatch requeues, the job finishes."""
    steps = 60
    recipe = slurm_recipe(tmp_path, nodes=1, gpus=2, train={"max_steps": steps, "lr": 1e-3},
                          checkpoint={"every": 1000}, distributed={"zero": 1},
                          cluster={"env": {"ZEROTUNE_TEST_STEP_SLEEP": "0.5"}})
    job_id = submit(recipe)
    run_dir = tmp_path / "runs" / "t"
    wait_for_steps(run_dir, job_id, 3)
    subprocess.run(["scancel", "--signal=TERM", job_id], check=True)
    release(job_id, 1)
    saved = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step-*/COMPLETE"))
    stopped_at = int(saved[-1].split("-")[1])
    text = logs(run_dir)
    assert f"zerotune: SIGTERM: saved step {stopped_at}; exiting 85 so the job script requeues the job" in text, text[-4000:]
    assert "zerotune: exit 85: requeueing job" in text and "Traceback" not in text

    check_finished(run_dir, job_id, steps)
    assert f"resumed from step-{stopped_at:06d}" in logs(run_dir)
    assert losses(run_dir)[stopped_at + 1] and not (run_dir / "PREEMPTED").exists()


def test_requeue_stops_when_attempts_end_the_same_way(cluster, tmp_path):
    """A crash that comes back at the same point (rank 0 killed inside the save of step 2, so no
    new checkpoint): requeued once, then, with cluster.max_requeues 2, not again, saying why."""
    recipe = slurm_recipe(tmp_path, nodes=1, gpus=1, distributed={"zero": 1},
                          cluster={"max_requeues": 2, "env": {"ZEROTUNE_TEST_CRASH": "start:2:0"}})
    job_id = submit(recipe)
    run_dir = tmp_path / "runs" / "t"
    release(job_id, 1)
    info = wait_for(job_id, ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT"), timeout=400)
    text = logs(run_dir)
    assert info["JobState"] == "FAILED" and info["Restarts"] == "1", f"{info}\n{text[-4000:]}"
    assert text.count("zerotune: rank 0 (pid ") == 2 and "died of SIGKILL" in text
    assert text.count(f"zerotune: exit 137: requeueing job {job_id}") == 1, text[-4000:]
    assert (f"zerotune: not requeueing job {job_id}: the last 2 attempts ended the same way (exit 137, "
            "no reason in RUN_DIR/FAILED, no newer checkpoint than none); cluster.max_requeues is 2") in text
    assert (run_dir / "attempts.tsv").read_text() == f"{job_id}\t137\tnone\t-\n" * 2
