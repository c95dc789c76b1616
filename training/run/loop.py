"""The training loop, top to bottom. Every rank runs `train(run_dir)`:

    run = setup(run_dir)       # recipe, distributed, data, model + engine, resume point, logging
    outcome = run_steps(run)   # each step: data -> forward/backward -> optimizer -> log, eval, save
    finish(run, outcome)       # the end (final eval, checkpoint, Hugging Face export), a stop signal
                               # (save; exit 130 after Ctrl-C, 85 for a requeue after SIGTERM/SIGUSR1)
                               # or too many NaN losses (save, stop)

Rank 0 also keeps RUN_DIR/HEARTBEAT (training/run/heartbeat.py) for `zerotune status`; signals are
training/run/signals.py; an exception leaves the loop to `python -m zerotune.training` (__main__.py),
which prints it once and logs its traceback (core/failure.py).

What one step computes (the token-weighted loss over the global batch) is training/run/step.py;
checkpoints are training/checkpoint/save.py; what is logged is training/monitoring/metrics.py.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from zerotune.core import failure, runlock
from zerotune.core.io import atomic_write
from zerotune.core.layout import BAD_LOSS_EXIT_CODE, DS_CONFIG_FILE, FINAL_DIR, PREEMPT_MARKER, check_fresh_start
from zerotune.core.recipe import BatchGeometry
from zerotune.core.recipe_load import load_run_recipe
from zerotune.training.checkpoint import async_save, resume
from zerotune.training.data.loader import ResumableSampler, batches
from zerotune.training.data.build import build_data, load_tokenizer
from zerotune.training.export.write import save_final
from zerotune.training.long_context import sequence_parallel
from zerotune.training.model import long_sequence
from zerotune.training.model.build import build_model, count_parameters, kernels_report, trainable_report
from zerotune.training.model.samples import eval_samples
from zerotune.training.monitoring import profile
from zerotune.training.monitoring.metrics import Metrics
from zerotune.training.run import diagnostics, signals, step as steps
from zerotune.training.run.saves import periodic_save, save_checkpoint
from zerotune.training.run.engine import build_engine, init_distributed
from zerotune.training.run.heartbeat import Heartbeat
from zerotune.training.run.signals import INTERRUPTED, PREEMPTED, StopRequest

DONE, EARLY_STOP, BAD_LOSS = "done", "early_stop", "bad_loss"
REQUEUE_ENV = "ZEROTUNE_REQUEUE"   # set by job.sbatch: a SIGTERM/SIGUSR1 stop is requeued

@dataclass
class Run:
    """Everything the loop works with, made once by setup()."""
    run_dir: Path
    recipe: object
    rank: int
    world: int
    geometry: BatchGeometry
    total_steps: int
    tokenizer: object
    data: object
    model: object
    engine: object
    frozen: bool                 # PEFT: checkpoints hold only the trainable parameters
    sampler: ResumableSampler
    state: dict                  # checkpointed loop state: step, tokens_seen, best eval, ...
    log: Metrics
    guard: diagnostics.NanGuard  # counts steps skipped for a NaN/inf loss
    stop: StopRequest
    beat: Heartbeat | None       # rank 0 only
    sp: object = None            # sequence_parallel.SequenceParallel when N ranks share a sequence
    writer: object = None        # async_save.Writer: checkpoints written in the background
    start_step: int = 0          # the step this attempt resumed at
    last_saved: int = -1         # the newest step with a checkpoint (the resume point counts)
    warned_save_wait: bool = False
    save_due: int | None = None  # a periodic save waiting for the previous one to be written (periodic_save)
    last_eval: float | None = None


def train(run_dir: Path, stop: StopRequest | None = None, started: float | None = None) -> int:
    run = setup(Path(run_dir), stop or StopRequest().install(), started or time.time())
    try:
        outcome = run_steps(run)
        return finish(run, outcome)
    except BaseException:
        if run.beat:
            run.beat.stop("failed")
        with contextlib.suppress(Exception):
            run.log.close(finished=False)   # trackers flushed and closed: the rank exits at once (__main__)
        raise


# ----------------------------------------------------------------------------- set-up
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def batch_geometry(train, ds_config: dict, replicas: int) -> BatchGeometry:
    """The recipe's geometry over `replicas` data-parallel ranks (the world size, divided by the
    sequence-parallel degree); ds_config.json must have been written for it."""
    g = train.geometry(replicas)
    if ds_config["train_batch_size"] != g.global_batch_size:
        raise RuntimeError(f"ds_config.json was written for a global batch of {ds_config['train_batch_size']}, "
                           f"this job's is {g.global_batch_size} ({replicas} data-parallel processes): "
                           "relaunch with `zerotune train`")
    return g


def count_steps(train, n_samples: int, g: BatchGeometry) -> int:
    steps_per_epoch = n_samples // g.global_batch_size
    if steps_per_epoch == 0 and train.max_steps is None:
        raise RuntimeError(f"{n_samples} training samples are fewer than one global batch ({g.global_batch_size})")
    return train.max_steps or math.ceil(train.epochs * steps_per_epoch)


def build(recipe, ds_config: dict, tokenizer, data, total_steps: int, sp=None):
    """The model (template tokens added, no KV cache, Ulysses attention under sequence
    parallelism) inside its DeepSpeed engine."""
    model = build_model(recipe, ds_config)
    if len(tokenizer) > model.config.vocab_size:  # tokens a chat template added
        if recipe.method.is_peft:
            raise RuntimeError(f"model.chat_template adds tokens {data.stats.get('added_tokens')} that {recipe.model.path} "
                               "lacks; a PEFT run cannot train new embeddings yet: use a template made of tokens "
                               "the tokenizer has, or method.kind: full")
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.use_cache = False  # no KV cache in training; a cache also turns off packed-sequence masking
    if sp:
        sp.wrap_model(model, recipe)
    return model, build_engine(model, ds_config, recipe.train, total_steps)


def start_attempt(run_dir: Path, rank: int, state: dict, started: float) -> Heartbeat | None:
    """Rank 0: RUN_DIR/LOCK (unless its launcher holds it); earlier FAILED is history; the heartbeat."""
    if rank != 0:
        return None
    runlock.acquire(run_dir, launcher=os.getppid())
    failure.clear_stale(run_dir, started)
    return Heartbeat(run_dir, state, started).start()


def setup(run_dir: Path, stop: StopRequest, started: float) -> Run:
    recipe = load_run_recipe(run_dir)
    ds_config = json.loads((run_dir / DS_CONFIG_FILE).read_text())
    init_distributed(recipe.distributed.timeout_minutes)
    rank, world = dist.get_rank(), dist.get_world_size()
    sp = sequence_parallel.init(recipe)   # None unless distributed.sequence_parallel > 1
    replica, replicas = (sp.dp_rank, sp.dp_world) if sp else (rank, world)   # what the data sees
    state = {"step": 0, "tokens_seen": 0, "best_eval": None, "evals_without_improvement": 0}
    beat = start_attempt(run_dir, rank, state, started)
    seed_everything(recipe.train.seed)
    geometry = batch_geometry(recipe.train, ds_config, replicas)

    tokenizer = load_tokenizer(recipe)
    data = build_data(recipe, tokenizer)
    total_steps = count_steps(recipe.train, len(data.train), geometry)

    # the resume point is decided before the engine: a new world size loads a universal checkpoint
    check_fresh_start(run_dir, recipe.checkpoint.resume, recipe.checkpoint.overwrite)
    resume_from = resume.resolve_resume(run_dir, recipe.checkpoint.resume, rank)
    if resume_from is not None and resume.needs_universal(resume_from, world):
        ds_config = {**ds_config, "checkpoint": {"load_universal": True}}
    model, engine = build(recipe, ds_config, tokenizer, data, total_steps, sp)
    trainable, total = count_parameters(model)

    run = Run(run_dir, recipe, rank, world, geometry, total_steps, tokenizer, data, model, engine,
              frozen=trainable < total, sampler=ResumableSampler(len(data.train), replica, replicas, recipe.train.seed),
              state=state, log=None, guard=None, stop=stop, beat=beat, sp=sp,
              writer=async_save.Writer(engine) if recipe.checkpoint.async_save else None)
    loaded_in = restore(run, resume_from) if resume_from is not None else None
    run.start_step = state["step"]
    run.last_saved = state["step"] if resume_from is not None else -1
    run.log = Metrics(run_dir, rank, total_steps, state["step"], recipe, world_size=world)
    run.guard = diagnostics.NanGuard(recipe.train.max_bad_steps, state)
    long = ", ".join(long_sequence.options(recipe))   # sequence parallel, tiled MLP, activations on CPU
    run.log.say(f"zerotune: {recipe.name}: {len(data.train)} train / {len(data.eval)} eval samples, "
                f"{world} process(es){f' ({long})' if long else ''}, ZeRO-{ds_config['zero_optimization']['stage']}, "
                f"{kernels_report(model)}, {trainable:,} / {total:,} parameters trainable ({100 * trainable / total:.2f}%), "
                f"{total_steps} steps of {geometry.global_batch_size} samples" +
                (f", resumed from {resume_from.name} (loaded in {loaded_in:.1f}s)" if resume_from else ""))
    run.log.say(f"data: {data.summary()}")
    run.log.text("trainable_parameters", trainable_report(model, recipe))
    return run


def restore(run: Run, ckpt: Path) -> float:
    """Weights, optimizer, schedule, RNG, loop state and data position from `ckpt`; returns seconds."""
    t0 = time.perf_counter()
    saved = resume.load(run.engine, ckpt, run.rank, run.world, run.frozen)
    run.state.update(saved["loop"])
    note = run.sampler.resume(saved["sampler"], saved["world_size"])   # the same next sample on any replica count
    if note and run.rank == 0:
        print(f"zerotune: warning: {note}", file=sys.stderr, flush=True)
    run.last_eval = saved.get("eval_loss")
    return time.perf_counter() - t0


# ----------------------------------------------------------------------------- the loop
def run_steps(run: Run) -> str:
    """Train until the last step, early stopping, a stop signal or too many NaN losses."""
    t, g, engine, log = run.recipe.train, run.geometry, run.engine, run.log
    engine.train()  # from_pretrained leaves the model in eval mode: no dropout, no gradient checkpointing
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()  # the peak reported is training's, not the model load's
    stream = batches(run.data.train, run.sampler, g.micro_batch_size, run.tokenizer.pad_token_id)
    place = run.sp.shard if run.sp else steps.to_device   # SP: this rank's part of each sequence
    window = profile.Window(run.recipe.logging, run.run_dir, run.rank, run.total_steps)   # logging.profile_start
    with diagnostics.oom_guard(run.run_dir, run.recipe, run.state, run.total_steps, run.world, run.rank):
        # a signal during the set-up: agreed once, nothing to train (each step votes in its report)
        stop = signals.agreed(steps.votes_now(run.stop.vote(run.world), engine.device), run.world)
        while not stop and run.state["step"] < run.total_steps:
            t0 = time.perf_counter()
            window.before(run.state["step"] + 1)
            with log.time("data"):
                micro = [next(stream) for _ in range(g.grad_accum)]
                counts = steps.step_counts(micro, engine.device, copies=run.sp.size if run.sp else 1)
                seq_len = micro[0]["input_ids"].shape[1]
                micro = [place(b, engine.device) for b in micro]
            lr = engine.get_lr()[0]  # the rate this step uses (the scheduler steps inside engine.step)
            with log.time("fwd_bwd"):
                step_loss = steps.forward_backward(engine, micro, counts[0], run.world)
            got = steps.update_and_read(engine, step_loss, counts, lambda: votes(run), log.time)
            run.state["step"] += 1
            run.state["tokens_seen"] += int(got["real"])
            step = run.state["step"]
            log.profiled(window.after(step), step)
            if run.guard.update(got["finite"]):
                log.skipped(step, got["loss"], run.guard.in_a_row, t.max_bad_steps, run.guard.total)
                if run.guard.should_stop:
                    return BAD_LOSS
            else:
                grad_norm = got["grad_norm"]
                log.step(step, seconds=time.perf_counter() - t0, loss=got["loss"], lr=lr,
                         grad_norm=float(grad_norm) if grad_norm is not None else None, tokens=got["real"],
                         padded_tokens=got["padded"], samples=step * g.global_batch_size,
                         epoch=run.sampler.epochs_done, seq_len=seq_len, router_aux=got["router_aux"])
            # a stop signal (any rank, voted in this step's report): this step is taken; save it and stop
            stop = signals.agreed(got["votes"], run.world)
            if stop:
                return stop
            if between(step, t.eval_every, run.total_steps) and evaluate(run, step):
                log.say(f"step {step}: early stopping after {run.state['evals_without_improvement']} "
                        "evals without improvement")
                return EARLY_STOP
            if run.writer:
                run.writer.raise_error()   # a background save that failed (a full disk) stops the run here
            if run.save_due is not None or between(step, run.recipe.checkpoint.every, run.total_steps):
                periodic_save(run, step, writing=got["writing"] > 0)
    return stop or DONE


def votes(run: Run) -> tuple[float, float]:
    """This rank's share of the step's report: its stop vote, and 1 while its background writer
    still writes a checkpoint (summed over ranks: every rank sees the same "writing")."""
    return run.stop.vote(run.world), float(run.writer is not None and run.writer.busy())


def between(step: int, every: int | None, total_steps: int) -> bool:
    """A periodic event (eval, save) falls on this step; the last step has its own."""
    return bool(every) and step % every == 0 and step < total_steps


def evaluate(run: Run, step: int) -> bool:
    """Evaluate, log, and return True when early stopping says stop. Eval prompts (if any) are
    answered first, on every rank (ZeRO-3 needs all of them), and logged to every tracker."""
    run.log.samples(step, eval_samples(run.engine, run.tokenizer, run.recipe))
    if not run.data.eval:
        return False
    t = run.recipe.train
    loss = run.last_eval = steps.evaluate(run.engine, run.data.eval, run.rank, run.world,
                                          run.geometry.micro_batch_size, run.tokenizer.pad_token_id, t.eval_batches,
                                          sp=run.sp)
    run.log.eval(step, loss)  # eval/loss, eval/perplexity and a one-line summary
    es, state = t.early_stopping, run.state
    if state["best_eval"] is None or loss < state["best_eval"] - (es.min_delta if es else 0):
        state["best_eval"], state["evals_without_improvement"] = loss, 0
    else:
        state["evals_without_improvement"] += 1
    return bool(es and state["evals_without_improvement"] >= es.patience)


# ----------------------------------------------------------------------------- the end
def finish(run: Run, outcome: str) -> int:
    step = run.state["step"]
    if outcome == BAD_LOSS:  # keep a checkpoint (skipped steps changed nothing) and stop
        save_checkpoint(run, step)
        msg = run.guard.stop_message(step, run.recipe)
        run.log.say(msg)
        if run.rank == 0:
            diagnostics.write_failure(run.run_dir, msg)
        return close(run, BAD_LOSS_EXIT_CODE, BAD_LOSS, finished=False)
    if outcome in (INTERRUPTED, PREEMPTED):
        return stopped(run, outcome)
    if outcome == DONE:
        evaluate(run, step)
    save_checkpoint(run, step)
    if run.recipe.checkpoint.save_final:
        save_final(run.engine, run.model, run.recipe, run.run_dir / FINAL_DIR, run.rank)
        run.log.say(f"final model: {run.run_dir / FINAL_DIR}")
    if run.rank == 0:
        (run.run_dir / PREEMPT_MARKER).unlink(missing_ok=True)
    return close(run, 0, "finished", final_eval_loss=run.last_eval)


def stopped(run: Run, kind: str) -> int:
    """A stop signal (INTERRUPTED: Ctrl-C; PREEMPTED: SIGTERM/SIGUSR1): save where we are, unless
    this attempt took no step (its resume point is already saved), and say how to go on."""
    step, sig = run.state["step"], run.stop.signal or "a stop signal on another rank"
    if step > run.start_step:
        save_checkpoint(run, step)
        done = f"saved step {step}"
    elif step > 0:
        done = f"step {step} is saved (no step since the resume)"
    else:
        done = "stopped before the first step, nothing to save"
    marker = run.run_dir / PREEMPT_MARKER
    if run.rank == 0 and kind == PREEMPTED:
        atomic_write(marker, json.dumps({"step": step, "signal": run.stop.signal, "time": time.time()}) + "\n")
    elif run.rank == 0:
        marker.unlink(missing_ok=True)
    code = signals.exit_code(kind)
    then = (f"exiting {code} so the job script requeues the job" if kind == PREEMPTED and os.environ.get(REQUEUE_ENV)
            else "run the same command to resume")
    run.log.say(f"zerotune: {sig}: {done}; {then}")
    return close(run, code, kind, finished=False, signal=run.stop.signal)


def close(run: Run, code: int, outcome: str, signal: str | None = None, **summary) -> int:
    if run.writer:
        run.writer.wait()   # the last checkpoint is complete before the exit code says so
    run.log.close(**summary)
    if run.beat:
        run.beat.stop(outcome, exit_code=code, **({"signal": signal} if signal else {}))
    dist.barrier()
    dist.destroy_process_group()
    return code
