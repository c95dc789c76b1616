"""One interrupt story for every entry point, with real signals and real processes: Ctrl-C
(SIGINT) to `zerotune train` or to RUN_DIR/launch.sh saves at the next step boundary and exits
130 with one line; a second Ctrl-C stops at once; no process outlives the command; the resumed
run's losses equal an uninterrupted run's; an error inside the ranks is one line, once."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, train_losses, zerotune
from test_checkpoint import data24, recipe, same_curve  # noqa: F401  (data24 is a fixture)
from zerotune.core.layout import INTERRUPT_EXIT_CODE, PREEMPT_MARKER, complete_checkpoints, read_state
from zerotune.launcher.agent import children, descendants

pytestmark = pytest.mark.slow
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore", TOKENIZERS_PARALLELISM="false")


def cmdline(pid: int) -> bytes:
    """A process's command line now (NUL-separated), b"" once it is gone."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


class Started:
    """A command started in its own session (as a terminal starts a foreground job), its output in
    a file, and every process it ever had below it (sampled while it runs)."""

    def __init__(self, argv: list[str], out: Path, **env):
        self.out = out
        self.proc = subprocess.Popen(argv, stdout=open(out, "w"), stderr=subprocess.STDOUT, cwd=ROOT,
                                     env={**ENV, **env}, start_new_session=True)
        self.seen: dict[int, bytes] = {}

    def sample(self) -> None:
        for pid in descendants(self.proc.pid):
            # the latest: a child sampled between fork and exec still carries its parent's line
            if line := cmdline(pid):
                self.seen[pid] = line

    def wait_for_step(self, metrics: Path, step: int, timeout: float = 400) -> None:
        deadline = time.time() + timeout
        while not (metrics.is_file() and max(train_losses(metrics.parent) or {0: 0}) >= step):
            assert self.proc.poll() is None and time.time() < deadline, self.text()[-4000:]
            self.sample()
            time.sleep(0.2)
        self.sample()

    def wait_for_text(self, text: str, timeout: float = 60) -> None:
        deadline = time.time() + timeout
        while text not in self.text():
            assert time.time() < deadline, self.text()[-4000:]
            time.sleep(0.05)

    def finish(self, timeout: float = 300) -> int:
        rc = self.proc.wait(timeout)
        time.sleep(0.5)  # let the kernel reap what was killed
        return rc

    def text(self) -> str:
        return self.out.read_text(errors="replace")

    def ranks(self) -> list[int]:
        """The training processes running now: `-m zerotune.training` on the command line, under a
        parent that is not one (a child a rank forks carries the rank's line until it execs)."""
        parent = {child: ppid for ppid, kids in children(self.proc.pid).items() for child in kids}
        rank = lambda pid: b"\0-m\0zerotune.training\0" in cmdline(pid)
        return [pid for pid in descendants(self.proc.pid) if rank(pid) and not rank(parent.get(pid, 0))]

    def survivors(self) -> list[str]:
        """Processes seen below the command that still run (the same pid with the same command line)."""
        return [f"{pid}: " + line.replace(b"\0", b" ").decode()
                for pid, line in self.seen.items() if cmdline(pid) == line]


def clean(out: str) -> None:
    """No traceback, no torchrun failure box, no requeue talk on a local run."""
    for noise in ("Traceback", "ChildFailedError", "torch.distributed.elastic", "requeue"):
        assert noise not in out, f"{noise!r} in the output:\n{out[-4000:]}"


@pytest.fixture(scope="module")
def want(tmp_path_factory, data24):
    """The uninterrupted run's losses (6 steps, 2 processes)."""
    tmp = tmp_path_factory.mktemp("straight")
    zerotune("train", str(recipe(tmp, "straight", 3, data24)), "--nproc", "2")
    return train_losses(tmp / "runs" / "straight")


def stopped_at(run: Path, out: str) -> int:
    step = read_state(complete_checkpoints(run)[-1])["loop"]["step"]
    assert 2 <= step < 6, out[-3000:]
    return step


def test_sigint_to_zerotune_train_saves_exits_130_and_resumes_exactly(tmp_path, data24, want):
    r = recipe(tmp_path, "ctrl-c", 3, data24)
    run = tmp_path / "runs" / "ctrl-c"
    cmd = Started([sys.executable, "-m", "zerotune.launcher.cli", "train", str(r), "--nproc", "2"],
                  tmp_path / "out.txt", ZEROTUNE_TEST_STEP_SLEEP="1")
    cmd.wait_for_step(run / "metrics.jsonl", 2)
    assert len(cmd.seen) >= 2   # the two training processes (torchrun runs inside `zerotune train`)
    os.kill(cmd.proc.pid, signal.SIGINT)   # the top process only
    assert cmd.finish() == INTERRUPT_EXIT_CODE, cmd.text()[-4000:]
    out = cmd.text()
    step = stopped_at(run, out)
    assert out.count(f"zerotune: SIGINT: saved step {step}; run the same command to resume") == 1, out[-3000:]
    assert "zerotune: SIGINT: saving at the next step boundary, then stopping (Ctrl-C again stops at once)" in out
    clean(out)
    assert cmd.survivors() == []
    assert not (run / PREEMPT_MARKER).exists()
    status = zerotune("status", str(run)).stdout
    assert f"state       stopped by SIGINT after step {step}: saved; run the same command to resume" in status

    p = zerotune("train", str(r), "--nproc", "2")
    assert f"resumed from step-{step:06d}" in p.stdout + p.stderr
    same_curve(train_losses(run), want, resumed_at=step)


def test_ctrl_c_to_launch_sh_saves_exits_130_and_running_it_again_resumes_exactly(tmp_path, data24, want):
    r = recipe(tmp_path, "sh", 3, data24)
    run = tmp_path / "runs" / "sh"
    zerotune("launch", str(r), "--dry-run", "--nproc", "2")
    cmd = Started(["bash", str(run / "launch.sh")], tmp_path / "out.txt", ZEROTUNE_TEST_STEP_SLEEP="1")
    cmd.wait_for_step(run / "metrics.jsonl", 2)
    os.killpg(cmd.proc.pid, signal.SIGINT)  # what a terminal's Ctrl-C does: the whole foreground group
    assert cmd.finish() == INTERRUPT_EXIT_CODE, cmd.text()[-4000:]
    out = cmd.text()
    step = stopped_at(run, out)
    assert out.count(f"zerotune: SIGINT: saved step {step}; run the same command to resume") == 1, out[-3000:]
    clean(out)
    assert cmd.survivors() == []

    again = subprocess.run(["bash", str(run / "launch.sh")], capture_output=True, text=True, env=ENV, timeout=600)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    same_curve(train_losses(run), want, resumed_at=step)


def test_a_second_ctrl_c_stops_at_once(tmp_path, data24):
    r = recipe(tmp_path, "twice", 3, data24)
    run = tmp_path / "runs" / "twice"
    cmd = Started([sys.executable, "-m", "zerotune.launcher.cli", "train", str(r), "--nproc", "1"],
                  tmp_path / "out.txt", ZEROTUNE_TEST_STEP_SLEEP="4")
    cmd.wait_for_step(run / "metrics.jsonl", 3)   # step-000002 is saved
    os.killpg(cmd.proc.pid, signal.SIGINT)
    cmd.wait_for_text("Ctrl-C again stops at once")
    os.killpg(cmd.proc.pid, signal.SIGINT)
    assert cmd.finish(60) == INTERRUPT_EXIT_CODE, cmd.text()[-4000:]
    out = cmd.text()
    assert "zerotune: a second Ctrl-C: stopping at once; a resume starts from step-000002" in out, out[-3000:]
    clean(out)
    assert cmd.survivors() == []
    assert [c.name for c in complete_checkpoints(run)] == ["step-000002"]
    status = zerotune("status", str(run)).stdout
    assert "state       stopped: its process (" in status and ") is gone (last heartbeat " in status, status


def test_an_error_inside_the_ranks_is_one_line_once(tmp_path, data24):
    """A damaged checkpoint named by checkpoint.resume: every rank raises the same CheckpointError;
    the console shows it once, the tracebacks go to RUN_DIR/logs, exit 2."""
    first = recipe(tmp_path, "src", 3, data24, max_steps=2)
    zerotune("train", str(first), "--nproc", "2")
    ckpt = tmp_path / "runs" / "src" / "checkpoints" / "step-000002"
    (ckpt / "rng-rank1.safetensors").unlink()
    r = recipe(tmp_path, "err", 3, data24)
    run = tmp_path / "runs" / "err"
    p = zerotune("train", str(r), "--nproc", "2", "--set", f"checkpoint.resume={ckpt}", check=False)
    want_line = f"zerotune: error: checkpoint.resume: '{ckpt}' is damaged: rng-rank1.safetensors is missing"
    assert p.returncode == 2 and p.stderr.count(want_line) == 1, p.stderr[-4000:]
    assert [ln for ln in p.stderr.splitlines() if "error" in ln.lower()] == [want_line]
    clean(p.stdout + p.stderr)
    assert (run / "FAILED").read_text() == want_line.removeprefix("zerotune: error: ") + "\n"
    for rank in (0, 1):
        log = (run / "logs" / f"rank-{rank}.log").read_text()
        assert "Traceback (most recent call last)" in log and "CheckpointError: checkpoint.resume:" in log
    assert zerotune("status", str(run)).stdout.splitlines()[1] == "state       " + "failed: " + \
        want_line.removeprefix("zerotune: error: ")
