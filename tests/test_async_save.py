"""Checkpoints written in the background (checkpoint.async_save, training/checkpoint/async_save.py): the
snapshot is a copy that later training does not change, files are written in order and what a
save runs after them comes last, an error in the writer reaches the training thread, and rank 0
completes a checkpoint only once every rank's files are on disk. The crash tests of
tests/test_checkpoint.py and tests/test_interrupt.py run with it on (the default)."""
from __future__ import annotations

import json
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from conftest import zerotune
from test_checkpoint import data24, recipe  # noqa: F401  (data24 is a fixture)
from zerotune.core.layout import MARKER, STATE_FILE, complete_checkpoints
from zerotune.training.checkpoint import async_save
from zerotune.core.errors import CheckpointError
from zerotune.training.checkpoint import save as checkpoint


class FakeCheckpointEngine:
    def __init__(self, slow: float = 0.0, fail: bool = False):
        self.written, self.slow, self.fail = [], slow, fail

    def save(self, state_dict, path):
        time.sleep(self.slow)
        if self.fail:
            raise OSError(28, "No space left on device", path)
        torch.save(state_dict, path)
        self.written.append(path)


def test_the_snapshot_is_a_copy_written_in_order(tmp_path):
    ce = FakeCheckpointEngine(slow=0.2)
    writer = async_save.Writer(SimpleNamespace(checkpoint_engine=ce))
    w = torch.ones(4)
    state = {"module": {"w": w}, "optimizer": {"state": [w * 2], "param_groups": [{"lr": 1.0}]}}
    t0 = time.perf_counter()
    ce.save(state, str(tmp_path / "a.pt"))          # DeepSpeed calls the engine's save: now a snapshot
    ce.save({"x": w}, str(tmp_path / "b.pt"))
    order = []
    writer.then(lambda: order.append(list(ce.written)))
    assert time.perf_counter() - t0 < 0.15          # the writes run in the thread
    w.add_(100)                                      # training goes on: the snapshot keeps the old values
    assert writer.busy()
    writer.wait()
    assert not writer.busy() and order == [[str(tmp_path / "a.pt"), str(tmp_path / "b.pt")]]
    saved = torch.load(tmp_path / "a.pt")
    assert torch.equal(saved["module"]["w"], torch.ones(4)) and torch.equal(saved["optimizer"]["state"][0], 2 * torch.ones(4))
    assert saved["optimizer"]["param_groups"] == [{"lr": 1.0}]
    assert torch.equal(torch.load(tmp_path / "b.pt")["x"], torch.ones(4))


def test_an_error_in_the_writer_reaches_the_training_thread_and_skips_the_rest(tmp_path):
    ce = FakeCheckpointEngine(fail=True)
    writer = async_save.Writer(SimpleNamespace(checkpoint_engine=ce))
    ce.save({"x": torch.ones(1)}, str(tmp_path / "a.pt"))
    ran = []
    writer.then(lambda: ran.append(1))              # the save's completion: skipped after the failure
    deadline = time.time() + 10
    while writer.busy() and time.time() < deadline:
        time.sleep(0.01)
    with pytest.raises(OSError, match="No space left"):
        writer.raise_error()
    writer.raise_error()                             # raised once
    assert ran == [] and not (tmp_path / "a.pt").exists()
    ce.save({"x": torch.ones(1)}, str(tmp_path / "c.pt"))   # a save that says what went wrong
    writer.then(lambda: ran.append(2), on_error=lambda e: RuntimeError(f"the save failed: {e.strerror}"))
    with pytest.raises(RuntimeError, match="the save failed: No space left on device"):
        writer.wait()
    ce.fail = False                                  # the next save runs
    ce.save({"x": torch.ones(1)}, str(tmp_path / "b.pt"))
    writer.wait()
    assert (tmp_path / "b.pt").is_file() and ran == []


def test_rank_0_completes_only_after_every_rank_has_written(tmp_path):
    run_dir = tmp_path / "run"
    path = run_dir / "checkpoints" / "step-000002"
    path.mkdir(parents=True)
    (path / "shard-rank0.pt").write_bytes(b"0")
    meta = {"step": 2, "loop": {"step": 2}, "sampler": [{}, {}], "world_size": 2}
    done = threading.Event()

    def rank0():
        checkpoint.complete_later(run_dir, path, meta, keep=2, rank=0, world=2, engine=None)
        done.set()
    threading.Thread(target=rank0, daemon=True).start()
    time.sleep(0.5)
    assert not done.is_set() and not (path / MARKER).exists()      # rank 1 has not finished writing
    (path / "shard-rank1.pt").write_bytes(b"1")
    checkpoint.complete_later(run_dir, path, meta, keep=2, rank=1, world=2, engine=None)
    assert done.wait(10)
    assert (path / MARKER).is_file() and (path / STATE_FILE).is_file()
    assert not list(path.glob("written-rank*"))                     # the flags are not part of the checkpoint


def test_a_rank_that_never_finishes_is_named(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "step-000001"
    path.mkdir(parents=True)
    with pytest.raises(CheckpointError, match=r"rank\(s\) \[1, 2\] did not finish writing"):
        checkpoint.complete_later(tmp_path / "run", path, {"step": 1}, keep=2, rank=0, world=3, engine=None,
                                  timeout=0.5)
    assert not (path / MARKER).exists()


def test_a_save_due_while_the_previous_one_is_written_waits_and_training_does_not(tmp_path, data24):
    """A disk slower than checkpoint.every (a save due every step; rank 1's writes take 2 s longer,
    rank 0's disk is fast): training does not wait for the disk. A due save waits for the previous
    write (both ranks agreeing: a save is collective), is taken at the first step after it, says
    once why, and the run's end waits for the last one. Before: each save blocked ~1.5 s."""
    r = recipe(tmp_path, "slow", 3, data24, every=1, max_steps=12, grad_accum=1)
    p = zerotune("train", str(r), "--nproc", "2",
                 env={"ZEROTUNE_TEST_SLOW_DISK": "2:1", "ZEROTUNE_TEST_STEP_SLEEP": "0.5"})
    run = tmp_path / "runs" / "slow"
    events = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    saves = [e for e in events if e.get("event") == "checkpoint"]
    periodic = [s for s in saves if s["step"] < 12]
    assert saves[-1]["step"] == 12 and complete_checkpoints(run)[-1].name == "step-000012"
    assert 2 <= len(periodic) <= 6, saves                       # not every step: the disk cannot keep up
    waited = [s for s in periodic if "due_step" in s]
    assert waited and all(s["due_step"] < s["step"] for s in waited), saves
    assert all(s["blocked_s"] < 1.0 for s in periodic), saves  # the snapshot only, never the previous write
    # where each save's blocked time went: the wait for the previous write (none: the save was deferred) and
    # the snapshot, both within the blocked seconds
    assert all(s["wait_s"] < 0.5 and s["wait_s"] + s["shards_s"] <= s["blocked_s"] + 2e-4 and s["snapshot_s"] <= s["shards_s"]
               for s in periodic), saves
    out = p.stdout + p.stderr
    assert out.count("waits until the previous one") == 1, out
    assert "(due at step " in out


def test_a_gpu_copy_is_staged_only_where_it_fits_beside_trainings_peak_decided_once_per_file(monkeypatch):
    """DeviceRoom's arithmetic with the GPU's numbers given: 80 GiB, 10 GiB held by another
    process, training's peak 40 GiB; the margin is 5% of the GPU (4 GiB)."""
    GiB = 2 ** 30
    peak = [40 * GiB]
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda *a: (30 * GiB, 80 * GiB))   # 40 GiB reserved by us
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda *a: 40 * GiB)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: peak[0])
    room = async_save.DeviceRoom()
    assert room.fits("optim.pt", 20 * GiB, pending=0)            # 40 + 20 + 4 <= 70
    assert not room.fits("model.pt", 20 * GiB, pending=10 * GiB)  # 40 + 10 + 20 + 4 > 70
    assert room.fits("small.pt", 1 * GiB, pending=10 * GiB)
    peak[0] = 60 * GiB        # the staged copy itself raised the peak: the next save still stages
    assert room.fits("optim.pt", 20 * GiB, pending=0) and not room.fits("model.pt", 1 * GiB, pending=0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("where", ["staged", "host"])
def test_gpu_snapshot_reuses_its_host_buffers_and_is_a_true_copy(tmp_path, monkeypatch, where):
    """On a GPU the snapshot goes to host buffers kept for the next save of the same file, and it
    is still a copy that later training does not change. With room on the GPU it is first a device
    copy (staged), which the writer moves to plain host buffers through its two small page-locked
    ones (Bounce: never gigabytes page-locked, which would hold every CUDA call of the process) and
    frees; without room (a margin larger than the GPU), the training thread copies straight to
    page-locked buffers. Tensors larger than a Bounce chunk, several tensors, odd dtypes and a
    non-contiguous one arrive whole."""
    if where == "host":
        monkeypatch.setattr(async_save.DeviceRoom, "MARGIN_MIN", 2 ** 50)
    monkeypatch.setattr(async_save.Bounce, "CHUNK", 3000)   # bytes: many chunks, both slots, a short last one
    ce = FakeCheckpointEngine()
    writer = async_save.Writer(SimpleNamespace(checkpoint_engine=ce))
    w = torch.full((1024, 1024), 3.0, device="cuda")
    t = torch.arange(6000, device="cuda").reshape(100, 60).t()   # not contiguous
    flags = torch.arange(777, device="cuda") % 3 == 0             # bool, 777 bytes: one short chunk
    half = torch.randn(5001, device="cuda", dtype=torch.bfloat16)
    base = torch.cuda.memory_allocated()
    buffers = []
    for step in (1, 2):
        (tmp_path / f"step-{step}").mkdir()
        writer.start_save()
        ce.save({"optimizer": {"state": [w, t, flags, half], "step": torch.tensor(step)}},
                str(tmp_path / f"step-{step}" / "optim.pt"))
        staged = writer.parts()["staged_gib"]
        expect = round(sum(x.numel() * x.element_size() for x in (w, t, flags, half)) / 2 ** 30, 3)
        assert staged == (expect if where == "staged" else 0), writer.parts()
        want = [x.cpu().clone() for x in (w, t, flags, half)]
        w.add_(100)                                   # the next step's update: not in the snapshot
        half.mul_(2)
        writer.wait()
        assert torch.cuda.memory_allocated() == base  # the staged copy is freed once written
        saved = torch.load(tmp_path / f"step-{step}" / "optim.pt")["optimizer"]
        assert saved["step"].item() == step
        for got, exp in zip(saved["state"], want):
            assert got.device.type == "cpu" and got.dtype == exp.dtype and torch.equal(got, exp)
        pool = writer.pools["optim.pt"]
        assert pool.pinned == (where == "host")
        buffers.append(list(pool.buffers))
    assert len(buffers[0]) == 4 and all(b.is_pinned() == (where == "host") for b in buffers[0])
    assert all(b2 is b1 for b1, b2 in zip(*buffers))  # the second save reused the first one's buffers
    if where == "staged":
        assert all(s.is_pinned() and s.numel() == 3000 for s in writer.bounce.slots)
