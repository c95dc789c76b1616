"""Monitoring: TensorBoard tags read back with EventAccumulator (also across a resume), NaN-loss
skipping, the out-of-memory message, `zerotune status` and `zerotune report`.

Fast tests drive training/monitoring/metrics.py and training/run/diagnostics.py in-process. One module-scoped
pair of real `zerotune train` runs (ZeRO-3 on CPU) covers the loop: run A is stopped by an
injected OOM at step 4 after logging steps 1-3 (checkpoint at 2); run B resumes from step 2
with NaN losses injected at steps 4, 6 and 7: step 4 is skipped and training goes on, 6 and 7
in a row reach train.max_bad_steps=2 and the run stops with a checkpoint.
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from conftest import ROOT, base_recipe, write_recipe, zerotune
from zerotune.core.recipe_load import validate_recipe

TRAIN_TAGS = ["train/loss", "train/lr", "train/grad_norm", "train/tokens_per_sec", "train/samples_seen",
              "train/epoch", "data/packing_efficiency", "time/step_s", "time/data_wait_s", "time/fwd_bwd_s",
              "time/optimizer_s", "time/other_s", "train/host_rss_peak_gib"]


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """tag -> [(step, value)] exactly as TensorBoard shows them (purged events removed)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in acc.Tags()["scalars"]}


def summaries(run_dir: Path, plugin: str) -> list[tuple[int, str]]:
    """(step, tag) of every summary of a TensorBoard plugin (text, hparams) in the event files."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    out = []
    for f in sorted((run_dir / "tensorboard").glob("events.out.tfevents.*")):
        for e in EventFileLoader(str(f)).Load():
            out += [(e.step, v.tag) for v in e.summary.value if v.metadata.plugin_data.plugin_name == plugin]
    return out


def cli(capsys, *args: str) -> tuple[int, str, str]:
    """The `zerotune` CLI in this process (a subprocess per call costs ~10 s of imports)."""
    from zerotune.launcher.cli import main
    capsys.readouterr()
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def records(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- Metrics in-process
def make_metrics(tmp_path: Path, start_step: int = 0, total: int = 6, **sections):
    from zerotune.training.monitoring.metrics import Metrics
    recipe = validate_recipe(base_recipe(tmp_path, **sections))
    run_dir = tmp_path / "run"
    run_dir.mkdir(exist_ok=True)
    (run_dir / "recipe.yaml").write_text(recipe.to_yaml())
    (run_dir / "ds_config.json").write_text('{"zero_optimization": {"stage": 3}}')
    return Metrics(run_dir, 0, total, start_step, recipe, world_size=1), run_dir


def log_steps(m, steps, loss=2.0, tokens=1000.0, seconds=0.5):
    for s in steps:
        with m.time("data"):
            pass
        with m.time("fwd_bwd"):
            pass
        with m.time("optimizer"):
            pass
        m.step(s, seconds=seconds, loss=loss, lr=1e-3, grad_norm=1.0, tokens=tokens, padded_tokens=2 * tokens,
               samples=8 * s, epoch=s / 10, seq_len=128)


def test_metrics_tags_resume_without_duplicates_and_hparams(tmp_path):
    # first attempt: steps 1-5 (logging.every=2 logs 2, 4 and the last step), a checkpoint at 3, then "crash"
    m, run_dir = make_metrics(tmp_path, logging={"every": 2, "progress": False})
    log_steps(m, [1, 2, 3])
    m.eval(3, 2.5)
    m.saved(3, run_dir / "checkpoints" / "step-000003")
    log_steps(m, [4, 5])
    m.close(finished=False)
    # resumed from step 3: steps 4-6 again; TensorBoard must show each step once
    m, _ = make_metrics(tmp_path, start_step=3, logging={"every": 2, "progress": False})
    log_steps(m, [4, 5], loss=1.5)
    m.skipped(5, float("nan"), 1, 5, total=1)
    log_steps(m, [6], loss=1.5)
    m.eval(6, 1.25)
    m.close(final_eval_loss=1.25)

    s = scalars(run_dir)
    for tag in TRAIN_TAGS:
        assert [st for st, _ in s[tag]] == [2, 4, 6], tag
    assert [v for st, v in s["train/loss"]] == [2.0, 1.5, 1.5]  # step 4 from the resumed attempt, not the old one
    assert s["train/tokens_per_sec"][0][1] == pytest.approx(2000.0)
    assert s["data/packing_efficiency"][0][1] == pytest.approx(0.5)
    assert s["eval/loss"] == [(3, 2.5), (6, 1.25)]
    assert s["eval/perplexity"][1][1] == pytest.approx(math.exp(1.25), rel=1e-5)
    assert s["train/skipped_steps"] == [(5, 1.0)]
    assert s["hparam/final_eval_loss"] == [(6, 1.25)]
    assert "train/mfu" not in s and "train/gpu_mem_allocated_gib" not in s  # CPU, no peak FLOPs: nothing made up
    assert {t for _, t in summaries(run_dir, "text")} >= {"config/recipe/text_summary", "config/ds_config/text_summary"}
    assert {t for _, t in summaries(run_dir, "hparams")} == {"_hparams_/experiment", "_hparams_/session_start_info",
                                                             "_hparams_/session_end_info"}
    events = [r.get("event") for r in records(run_dir) if "event" in r]
    assert events == ["start", "checkpoint", "start", "skipped", "end"]
    last_train = [r for r in records(run_dir) if "train/loss" in r][-1]
    assert last_train["total_steps"] == 6 and last_train["eta_s"] == pytest.approx(0.0)


def test_clear_failure_is_the_loops_not_metrics(tmp_path):
    from zerotune.training.monitoring.metrics import clear_failure
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "FAILED").write_text("zerotune: out of GPU memory at step 4/8\n")
    make_metrics(tmp_path)[0].close()
    assert (run_dir / "FAILED").is_file()                # Metrics only reports
    clear_failure(run_dir)                                # the loop calls this when an attempt starts
    clear_failure(run_dir)
    assert not (run_dir / "FAILED").exists()


def test_console_summaries_and_warnings(tmp_path, capsys):
    m, _ = make_metrics(tmp_path, total=40)
    log_steps(m, range(1, 16))                            # steady: 2000 tokens/s, grad norm 1
    m.step(16, seconds=0.5, loss=2.0, lr=1e-3, grad_norm=50.0, tokens=1000, samples=1, epoch=0.1)
    for s in (17, 18, 19):                                # 4x slower for three steps
        m.step(s, seconds=2.0, loss=2.0, lr=1e-3, grad_norm=1.0, tokens=1000, samples=1, epoch=0.1)
    m.eval(19, 1.9)
    m.saved(19, Path("checkpoints/step-000019"), 1.5)
    m.skipped(20, float("inf"), 1, 5, total=1)
    m.close(final_eval_loss=1.9)
    out = capsys.readouterr().out
    assert "WARNING: step 16: grad norm 50 is 50x the median of the last 15 steps" in out
    assert "WARNING: step 19: throughput dropped to 500 tokens/s for 3 steps (recent average 2,000)" in out
    assert "step 19/40 | eval loss 1.9000 (ppl 6.69, best 1.9000) | train loss 2.0000 | 500 tok/s | ETA" in out
    assert "step 19/40 | saved step-000019 in 1.5s" in out
    assert "WARNING: step 20: loss is inf; update skipped (1 in a row, the run stops at 5; 1 skipped in total)" in out
    assert "final eval loss 1.9000, 1 skipped steps" in out


# ----------------------------------------------------------------------------- diagnostics in-process
def test_nan_guard_and_test_hooks(monkeypatch):
    import torch
    from zerotune.training.run import diagnostics
    state = {"step": 0}
    guard = diagnostics.NanGuard(2, state)
    assert [guard.update(f) for f in (True, False, True, False)] == [False, True, False, True]
    assert not guard.should_stop and guard.total == 2
    guard.update(False)
    assert guard.should_stop and state["skipped_steps"] == 3
    from zerotune.training.run import faults   # injection itself: the crashed_and_resumed runs
    assert [s in faults.parse_steps("2,5-6") for s in range(1, 8)] == [False, True, False, False, True, True, False]
    oom = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by ZEROTUNE_TEST_OOM_STEP=3)")
    assert diagnostics.is_oom(oom) and not diagnostics.is_oom(RuntimeError("shape mismatch"))


def test_oom_message_orders_changes_by_cost(tmp_path):
    from zerotune.training.run import diagnostics
    recipe = validate_recipe(base_recipe(tmp_path, distributed={"zero": 1}, train={"micro_batch_size": 8, "grad_accum": 2}))
    (tmp_path / "checkpoints" / "step-000010").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step-000010" / "COMPLETE").write_text("{}")
    (tmp_path / "checkpoints" / "step-000020").mkdir()  # a partial save: not the one to resume from
    msg = diagnostics.oom_message(RuntimeError("CUDA out of memory. Tried to allocate 1.50 GiB"), tmp_path, recipe,
                                  step=21, total_steps=100, world=2, rank=1)
    lines = msg.splitlines()
    assert lines[0].startswith("zerotune: out of GPU memory at step 21/100 on rank 1 (")
    assert "asking for 1.50 GiB more) with micro_batch_size 8, data.max_len 128" in lines[0]
    assert "ZeRO-1" in lines[0] and "gradient checkpointing off" in lines[0]
    assert "checkpoints/step-000010, is intact" in lines[1]
    advice = [line.split(". ", 1)[1].split(" (")[0] for line in lines if line.startswith("  ")]
    assert advice == ["train.micro_batch_size: 4 with train.grad_accum: 4", "train.gradient_checkpointing: true",
                      "distributed.zero: 3", "distributed.offload_optimizer: true",
                      "distributed.offload_params: true", "method.kind: lora or qlora"]
    assert "[plan: ~" in msg  # the planner's estimate for each change (launcher/plan.py)


SKIP_SCRIPT = textwrap.dedent("""
    # One NaN step between two good ones must leave weights and optimizer state exactly as
    # if it never happened (ZeRO-0 fp32 goes through our override, ZeRO-3 through DeepSpeed's own check).
    import json, os, sys
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=sys.argv[2])
    import torch, deepspeed
    from zerotune.core.recipe_load import validate_recipe
    from zerotune.training.model.build import build_model
    from zerotune.training.run.engine import build_engine
    from zerotune.training.run.diagnostics import optimizer_step
    from zerotune.launcher.ds_config import render
    deepspeed.init_distributed()
    base = json.loads(sys.argv[1])
    result = {}
    for stage in (0, 3):
        base["distributed"] = {"zero": stage}
        recipe = validate_recipe(base)
        ds = render(recipe, 1, stage=stage)
        torch.manual_seed(0)
        engine = build_engine(build_model(recipe, ds), ds, recipe.train, 10)
        g = torch.Generator().manual_seed(1)
        def params():
            ps = list(engine.module.parameters())
            with deepspeed.zero.GatheredParameters(ps, enabled=stage == 3):
                return [p.detach().clone() for p in ps]
        def step(nan):
            for i in range(2):
                ids = torch.randint(3, 500, (2, 16), generator=g)
                loss = engine(input_ids=ids, attention_mask=torch.ones_like(ids), labels=ids).loss
                engine.backward(loss * float("nan") if nan else loss)
                optimizer_step(engine, skip=nan) if i == 1 else engine.step()
        step(False)
        before = params()
        step(True)
        after = params()
        result[stage] = {"unchanged": all(torch.equal(a, b) for a, b in zip(before, after)),
                         "skipped": engine.skipped_steps, "applied": engine.was_step_applied()}
        step(False)
        result[stage]["finite_after"] = all(bool(torch.isfinite(p).all()) for p in params())
    print("RESULT", json.dumps(result))
""")


def test_nan_step_leaves_weights_untouched_zero0_and_zero3(tmp_path):
    recipe = base_recipe(tmp_path, train={"micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 0,
                                          "gradient_checkpointing": False, "scheduler": "constant"})
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT), PYTHONWARNINGS="ignore")
    with socket.socket() as sock:  # a free port for the one-process gloo group
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", SKIP_SCRIPT, json.dumps(recipe), str(port)],
                          capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
    assert line, proc.stdout[-3000:] + proc.stderr[-3000:]
    result = json.loads(line[0][7:])
    for stage in ("0", "3"):
        assert result[stage] == {"unchanged": True, "skipped": 1, "applied": False, "finite_after": True}, (stage, result)


# ----------------------------------------------------------------------------- status and report in-process
def test_status_and_report_from_files(tmp_path, capsys):
    m, run_dir = make_metrics(tmp_path, total=10)
    log_steps(m, [1, 2, 3, 4])
    m.eval(4, 1.75)
    m.skipped(5, float("nan"), 1, 5, total=1)
    m.close(finished=False)  # still "running": no end record
    ckpt = run_dir / "checkpoints" / "step-000004"
    ckpt.mkdir(parents=True)
    (ckpt / "COMPLETE").write_text("{}")
    (run_dir / "checkpoints" / "step-000005").mkdir()  # partial

    rc, out, _ = cli(capsys, "status", str(run_dir))
    assert rc == 0 and "state       running" in out
    assert "step        5/10 (50%)" in out
    assert "loss        2.0000" in out and "eval loss   1.7500 at step 4 (best 1.7500)" in out
    assert "speed       2,000 tokens/s" in out
    assert "ETA" in out and "skipped     1 step(s)" in out
    assert "checkpoint  checkpoints/step-000004 (" in out and "old); 1 incomplete (ignored by resume)" in out
    s = json.loads(cli(capsys, "status", str(run_dir), "--json")[1])
    assert s["step"] == 5 and s["checkpoint"] == "checkpoints/step-000004" and s["job"] is None

    png = tmp_path / "r.png"
    assert cli(capsys, "report", str(run_dir), "--out", str(png))[0] == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 20_000
    assert cli(capsys, "report", "--compare", str(run_dir), str(run_dir), "--out", str(tmp_path / "c.png"))[0] == 0
    assert (tmp_path / "c.png").stat().st_size > 20_000
    rc, _, err = cli(capsys, "report", str(tmp_path))
    assert rc == 2 and "no TensorBoard event files" in err


# ----------------------------------------------------------------------------- the real loop
@pytest.fixture(scope="module")
def crashed_and_resumed(tmp_path_factory):
    """Run A: OOM injected at step 4 (steps 1-3 logged, checkpoint at 2). Run B: resumes from step 2;
    NaN at 4 (skipped, continues) and at 6, 7 (two in a row: stops with a checkpoint at 7)."""
    tmp = tmp_path_factory.mktemp("monitoring")
    recipe = write_recipe(tmp, base_recipe(
        tmp, data={"max_len": 64, "eval_split": 0.02},
        train={"max_steps": 8, "micro_batch_size": 2, "grad_accum": 2, "lr": 1e-3, "warmup_steps": 0,
               "gradient_checkpointing": False, "eval_every": 2, "eval_batches": 1, "max_bad_steps": 2},
        checkpoint={"every": 2, "save_final": False}))
    run_dir = Path(yaml.safe_load(recipe.read_text())["output_dir"]) / "t"
    a = zerotune("train", str(recipe), check=False, env={"ZEROTUNE_TEST_OOM_STEP": "4"})
    failed_a = (run_dir / "FAILED").read_text() if (run_dir / "FAILED").is_file() else None
    ckpts_a = sorted(p.name for p in (run_dir / "checkpoints").glob("step-*"))
    b = zerotune("train", str(recipe), check=False, env={"ZEROTUNE_TEST_NAN_STEPS": "4,6-7"})
    return {"run_dir": run_dir, "a": a, "b": b, "failed_a": failed_a, "ckpts_a": ckpts_a}


def test_oom_ends_run_with_one_message_and_keeps_checkpoint(crashed_and_resumed):
    a = crashed_and_resumed["a"]
    assert a.returncode != 0
    assert "zerotune: out of GPU memory at step 4/8 on rank 0" in a.stderr
    assert "checkpoints/step-000002, is intact" in a.stderr
    assert "1. train.micro_batch_size: 1 with train.grad_accum: 4" in a.stderr
    assert crashed_and_resumed["failed_a"].startswith("zerotune: out of GPU memory at step 4/8")
    assert crashed_and_resumed["ckpts_a"] == ["step-000002"]  # complete, nothing written after the OOM


def test_nan_steps_are_skipped_counted_and_stop_after_max_bad_steps(crashed_and_resumed):
    b, run_dir = crashed_and_resumed["b"], crashed_and_resumed["run_dir"]
    out = b.stdout + b.stderr
    assert b.returncode != 0
    assert "WARNING: step 4: loss is nan; update skipped (1 in a row, the run stops at 2; 1 skipped in total)" in out
    assert "WARNING: step 7: loss is nan; update skipped (2 in a row, the run stops at 2; 3 skipped in total)" in out
    assert "stopped: the loss was NaN/inf for 2 steps in a row (steps 6-7; train.max_bad_steps is 2)" in out
    done = sorted(p.parent.name for p in (run_dir / "checkpoints").glob("step-*/COMPLETE"))
    assert done[-1] == "step-000007"
    assert json.loads((run_dir / "checkpoints" / "step-000007" / "zerotune_state.json").read_text()
                      )["loop"]["skipped_steps"] == 3


def test_tensorboard_tags_after_resume(crashed_and_resumed):
    s = scalars(crashed_and_resumed["run_dir"])
    for tag in TRAIN_TAGS:  # run A logged 1-3, run B re-did 3 (purged old one), skipped 4, 6 and 7
        assert [st for st, _ in s[tag]] == [1, 2, 3, 5], tag
    assert [st for st, _ in s["eval/loss"]] == [2, 4, 6]
    assert [st for st, _ in s["eval/perplexity"]] == [2, 4, 6]
    assert s["train/skipped_steps"] == [(4, 1.0), (6, 2.0), (7, 3.0)]
    assert all(math.isfinite(v) for _, v in s["train/loss"] + s["eval/loss"])
    assert s["train/samples_seen"][-1] == (5, 20.0)
    texts = summaries(crashed_and_resumed["run_dir"], "text")
    assert (0, "config/recipe/text_summary") in texts and (2, "config/recipe/text_summary") in texts


def test_status_and_report_of_the_real_run(crashed_and_resumed, tmp_path, capsys):
    run_dir = crashed_and_resumed["run_dir"]
    out = zerotune("status", str(run_dir)).stdout  # the real CLI, as on a login node
    assert "state       failed: stopped: the loss was NaN/inf for 2 steps in a row" in out
    assert "step        7/8 (88%)" in out and "skipped     3 step(s)" in out
    assert "checkpoint  checkpoints/step-000007" in out
    png = tmp_path / "report.png"
    assert cli(capsys, "report", str(run_dir), "--out", str(png))[0] == 0
    assert png.read_bytes()[:4] == b"\x89PNG"


@pytest.mark.gpu
def test_real_cuda_oom_message_names_peak_memory(tmp_path, capsys):
    """On the GPU machine: a real CUDA OOM (memory capped to 1 GiB) inside oom_guard.
    Run: python -m pytest tests/test_monitoring.py -m gpu -q"""
    import torch
    from zerotune.training.run import diagnostics
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    import gc
    recipe = validate_recipe(base_recipe(tmp_path))
    gc.collect()               # tensors of earlier tests in this process (pytest -m gpu runs them all in one)
    torch.cuda.empty_cache()   # a cached block from an earlier test would serve the allocation under any cap
    torch.cuda.reset_peak_memory_stats()   # the message's peak is this process's: start it here
    before = torch.cuda.memory_allocated()
    torch.cuda.set_per_process_memory_fraction(2 ** 30 / torch.cuda.get_device_properties(0).total_memory)
    try:
        keep = torch.empty(2 ** 27, device="cuda")  # 0.5 GiB of fp32 in use when the OOM comes
        with pytest.raises(SystemExit) as e:
            with diagnostics.oom_guard(tmp_path, recipe, {"step": 6}, 10, 1, 0):
                torch.empty(2 ** 30, device="cuda")
        assert e.value.code == diagnostics.OOM_EXIT_CODE
        err = capsys.readouterr().err
        peak = f"{(before + 2 ** 29) / 2 ** 30:.1f}"
        assert f"zerotune: out of GPU memory at step 7/10 on rank 0 (peak {peak} GiB allocated" in err, err
        assert "asking for 4.00 GiB more" in err and (tmp_path / "FAILED").is_file()
        del keep
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
