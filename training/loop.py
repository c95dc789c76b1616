"""The training loop, top to bottom. Every rank runs `train(run_dir)`.

Loss is the mean over the target tokens of the whole global batch: each micro-batch's summed
token loss is divided by the global target-token count (all micro-batches, all ranks), so
gradient accumulation and world size do not change it.
"""
from __future__ import annotations

import json
import math
import os
import random
import signal
import time
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import checkpoint, diagnostics
from zerotune.core.io import atomic_write
from zerotune.core.layout import (BAD_LOSS_EXIT_CODE, DS_CONFIG_FILE, FINAL_DIR, PREEMPT_MARKER, REQUEUE_EXIT_CODE,
                                  check_fresh_start)
from zerotune.core.recipe import load_run_recipe
from .data import ResumableSampler, batches, build_data, collate, target_tokens
from .data import real_tokens as count_real_tokens
from .engine import build_engine
from .metrics import Metrics
from .export import save_final
from .model import build_model, count_parameters, load_tokenizer, trainable_report


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def _test_signal_hook(step: int, rank: int) -> None:
    """ZEROTUNE_TEST_SIGNAL="<step>:<rank>[:<SIGNAME>]" sends this rank a real signal after that step
    (tests use it for preemption without a cluster)."""
    spec = os.environ.get("ZEROTUNE_TEST_SIGNAL")
    if spec:
        parts = spec.split(":")
        if int(parts[0]) == step and int(parts[1]) == rank:
            os.kill(os.getpid(), getattr(signal, parts[2] if len(parts) > 2 else "SIGUSR1"))


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


@torch.no_grad()
def evaluate(engine, dataset: list[dict], rank: int, world: int, mbs: int, pad_id: int, limit: int | None) -> float:
    """Token-weighted eval loss. Every rank runs the same number of forwards (ZeRO-3 needs it):
    ranks short of samples repeat sample 0 with its labels masked out."""
    engine.eval()
    per_rank = math.ceil(len(dataset) / world)
    n_batches = math.ceil(per_rank / mbs)
    if limit:
        n_batches = min(n_batches, limit)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    tokens = torch.zeros((), dtype=torch.float64, device=engine.device)
    for b in range(n_batches):
        samples = []
        for j in range(b * mbs, (b + 1) * mbs):
            i = j * world + rank
            if i < len(dataset):
                samples.append(dataset[i])
            else:
                samples.append({"input_ids": dataset[0]["input_ids"], "labels": [-100] * len(dataset[0]["labels"])})
        batch = to_device(collate(samples, pad_id), engine.device)
        n = target_tokens(batch)
        loss_sum += engine(**batch, num_items_in_batch=max(n, 1)).loss.double() * n
        tokens += n
    dist.all_reduce(loss_sum)
    dist.all_reduce(tokens)
    engine.train()
    return (loss_sum / tokens.clamp(min=1)).item()


def train(run_dir: Path) -> int:
    run_dir = Path(run_dir)
    recipe = load_run_recipe(run_dir)
    ds_config = json.loads((run_dir / DS_CONFIG_FILE).read_text())
    t = recipe.train

    # --- distributed -------------------------------------------------------------------
    import deepspeed
    from datetime import timedelta
    deepspeed.init_distributed(timeout=timedelta(minutes=recipe.distributed.timeout_minutes))
    rank, world = dist.get_rank(), dist.get_world_size()
    seed_everything(t.seed)

    # --- data --------------------------------------------------------------------------
    tokenizer = load_tokenizer(recipe)
    data = build_data(recipe, tokenizer)
    mbs = ds_config["train_micro_batch_size_per_gpu"]
    gas = ds_config["gradient_accumulation_steps"]
    if ds_config["train_batch_size"] != mbs * gas * world:
        raise RuntimeError(f"ds_config.json was written for {ds_config['train_batch_size'] // (mbs * gas)} "
                           f"processes, this job has {world}: relaunch with `zerotune train`")
    samples_per_step = mbs * gas * world
    steps_per_epoch = len(data.train) // samples_per_step
    if steps_per_epoch == 0 and t.max_steps is None:
        raise RuntimeError(f"{len(data.train)} training samples are fewer than one global batch ({samples_per_step})")
    total_steps = t.max_steps or math.ceil(t.epochs * steps_per_epoch)

    # --- resume point (decided before the engine: a new world size loads a universal checkpoint)
    check_fresh_start(run_dir, recipe.checkpoint.resume, recipe.checkpoint.overwrite)
    resume_from = checkpoint.resolve_resume(run_dir, recipe.checkpoint.resume)
    if resume_from is not None and checkpoint.needs_universal(resume_from, world):
        ds_config = {**ds_config, "checkpoint": {"load_universal": True}}

    # --- model and engine ---------------------------------------------------------------
    model = build_model(recipe, ds_config)
    if len(tokenizer) > model.config.vocab_size:  # tokens a chat template added
        if recipe.method.is_peft:
            raise RuntimeError(f"model.chat_template adds tokens {data.stats.get('added_tokens')} that {recipe.model.path} "
                               "lacks; a PEFT run cannot train new embeddings yet: use a template made of tokens "
                               "the tokenizer has, or method.kind: full")
        model.resize_token_embeddings(len(tokenizer), mean_resizing=True)
    model.config.use_cache = False  # no KV cache in training; a cache also turns off packed-sequence masking
    engine = build_engine(model, ds_config, t, total_steps)
    trainable, total = count_parameters(model)
    frozen = trainable < total  # PEFT: checkpoints hold only the trainable parameters

    # --- state, resume --------------------------------------------------------------------
    sampler = ResumableSampler(len(data.train), rank, world, t.seed)
    state = {"step": 0, "tokens_seen": 0, "best_eval": None, "evals_without_improvement": 0}
    last_eval = None
    if resume_from is not None:
        t_load = time.perf_counter()
        saved = checkpoint.load(engine, resume_from, rank, world, frozen)
        t_load = time.perf_counter() - t_load
        state.update(saved["loop"])
        sampler.load_state_dict(saved["sampler"])
        last_eval = saved.get("eval_loss")

    # --- preemption: SIGUSR1 (Slurm's warning before the time limit) or SIGTERM asks for a
    # save at the next step boundary; all ranks agree through the per-step all-reduce.
    stop_requested = {"signal": None}

    def request_stop(signum, frame):
        stop_requested["signal"] = signal.Signals(signum).name
    signal.signal(signal.SIGUSR1, request_stop)
    signal.signal(signal.SIGTERM, request_stop)

    log = Metrics(run_dir, rank, total_steps, state["step"], recipe, world_size=world)
    guard = diagnostics.NanGuard(t.max_bad_steps, state)  # counts steps skipped for a NaN/inf loss
    log.say(f"zerotune: {recipe.name}: {len(data.train)} train / {len(data.eval)} eval samples, "
            f"{world} process(es), ZeRO-{ds_config['zero_optimization']['stage']}, "
            f"{trainable:,} / {total:,} parameters trainable ({100 * trainable / total:.2f}%), "
            f"{total_steps} steps of {samples_per_step} samples" +
            (f", resumed from {resume_from.name} (loaded in {t_load:.1f}s)" if resume_from else ""))
    log.say(f"data: {data.summary()}")

    def save(step: int) -> None:
        t_save = time.perf_counter()
        path = checkpoint.save(engine, run_dir, step, state, sampler.state_dict(), keep=recipe.checkpoint.keep,
                               rank=rank, world=world, eval_loss=last_eval, recipe_digest=recipe.digest(),
                               frozen_params=frozen)
        log.saved(step, path, time.perf_counter() - t_save)

    def run_eval(step: int) -> bool:
        """Evaluate, log, and return True when early stopping says stop."""
        nonlocal last_eval
        if not data.eval:
            return False
        loss = last_eval = evaluate(engine, data.eval, rank, world, mbs, tokenizer.pad_token_id, t.eval_batches)
        log.eval(step, loss)  # eval/loss, eval/perplexity and a one-line summary
        es = t.early_stopping
        if state["best_eval"] is None or loss < state["best_eval"] - (es.min_delta if es else 0):
            state["best_eval"], state["evals_without_improvement"] = loss, 0
        else:
            state["evals_without_improvement"] += 1
        return bool(es and state["evals_without_improvement"] >= es.patience)

    def finish(code: int, **close) -> int:
        log.close(**close)
        dist.barrier()
        dist.destroy_process_group()
        return code

    # --- the loop -----------------------------------------------------------------------
    log.text("trainable_parameters", trainable_report(model, recipe))
    engine.train()  # from_pretrained leaves the model in eval mode: no dropout, no gradient checkpointing
    stream = batches(data.train, sampler, mbs, tokenizer.pad_token_id)
    stop_early = preempted = too_many_bad = False
    with diagnostics.oom_guard(run_dir, recipe, state, total_steps, world, rank):  # CUDA OOM: one clear message
        while state["step"] < total_steps and not stop_early:
            t0 = time.perf_counter()
            sampler_before = sampler.state_dict()
            with log.time("data"):
                micro = [to_device(next(stream), engine.device) for _ in range(gas)]
            # one all-reduce per step: global target, real and padded tokens, and "did any rank get a signal"
            counts = torch.tensor([sum(target_tokens(b) for b in micro), sum(count_real_tokens(b) for b in micro),
                                   sum(b["input_ids"].numel() for b in micro),
                                   float(stop_requested["signal"] is not None)], dtype=torch.float64, device=engine.device)
            dist.all_reduce(counts)
            n_target, real_tokens, padded_tokens = counts[0].item(), counts[1].item(), counts[2].item()
            if counts[3].item() > 0:
                preempted = True
                break
            lr = engine.get_lr()[0]  # the rate this step uses (the scheduler steps inside engine.step)
            diagnostics.inject_oom(state["step"] + 1)  # test hook: ZEROTUNE_TEST_OOM_STEP
            step_loss = torch.zeros((), dtype=torch.float64, device=engine.device)
            for i, b in enumerate(micro):
                with log.time("fwd_bwd"):
                    # loss = summed token loss / n_target; keep only the loss, so the logits are freed before backward
                    loss_i = engine(**b, num_items_in_batch=n_target).loss
                    loss_i = diagnostics.inject_nan(loss_i, state["step"] + 1)  # test hook: ZEROTUNE_TEST_NAN_STEPS
                    engine.backward(loss_i * world, scale_wrt_gas=False)  # DeepSpeed averages over ranks
                    step_loss += loss_i.detach().double()
                    if i < gas - 1:
                        engine.step()  # accumulates; the update comes at the boundary below
            dist.all_reduce(step_loss)  # before the update: every rank agrees whether the loss is finite
            finite = bool(torch.isfinite(step_loss))
            with log.time("optimizer"):
                diagnostics.optimizer_step(engine, skip=not finite)  # NaN/inf loss: the update is discarded
            state["step"] += 1
            state["tokens_seen"] += int(real_tokens)
            step = state["step"]
            dt = time.perf_counter() - t0
            loss = step_loss.item()
            if guard.update(finite):
                log.skipped(step, loss, guard.in_a_row, t.max_bad_steps, guard.total)
                if guard.should_stop:
                    too_many_bad = True
                    break
            else:
                grad_norm = engine.get_global_grad_norm()
                log.step(step, seconds=dt, loss=loss, lr=lr, grad_norm=float(grad_norm) if grad_norm is not None else None,
                         tokens=real_tokens, padded_tokens=padded_tokens, samples=step * samples_per_step,
                         epoch=sampler.epoch + sampler.consumed / sampler.per_rank, seq_len=micro[0]["input_ids"].shape[1])
            _test_signal_hook(step, rank)
            if t.eval_every and step % t.eval_every == 0 and step < total_steps:
                stop_early = run_eval(step)
                if stop_early:
                    log.say(f"step {step}: early stopping after {state['evals_without_improvement']} evals without improvement")
            if recipe.checkpoint.every and step % recipe.checkpoint.every == 0 and step < total_steps and not stop_early:
                save(step)

    # --- too many NaN/inf losses in a row: keep a checkpoint (skipped steps changed nothing) and stop
    if too_many_bad:
        save(state["step"])
        msg = guard.stop_message(state["step"], recipe)
        log.say(msg)
        if rank == 0:
            diagnostics.write_failure(run_dir, msg)
        return finish(BAD_LOSS_EXIT_CODE, finished=False)

    # --- preempted: save where we are and ask the job script to requeue ------------------------
    if preempted:
        sampler.load_state_dict(sampler_before)  # the micro-batches drawn for the step not taken come again
        save(state["step"])
        if rank == 0:
            atomic_write(run_dir / PREEMPT_MARKER, json.dumps({"step": state["step"], "signal": stop_requested["signal"],
                                                               "time": time.time()}) + "\n")
        log.say(f"step {state['step']}: stopped by {stop_requested['signal'] or 'a signal on another rank'}; "
                f"checkpoint saved, exiting with {REQUEUE_EXIT_CODE} so the job is requeued")
        return finish(REQUEUE_EXIT_CODE, finished=False)

    # --- the end: final eval, checkpoint, Hugging Face export -------------------------------
    step = state["step"]
    if not stop_early:
        run_eval(step)
    save(step)
    if recipe.checkpoint.save_final:
        save_final(engine, model, recipe, run_dir / FINAL_DIR, rank)
        log.say(f"final model: {run_dir / 'final'}")
    if rank == 0:
        (run_dir / PREEMPT_MARKER).unlink(missing_ok=True)
    return finish(0, final_eval_loss=last_eval)
