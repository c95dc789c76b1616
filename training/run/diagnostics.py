"""When a step goes wrong: a non-finite loss, or the GPU running out of memory.

Non-finite loss (NaN/inf). The loop all-reduces the step's loss, so every rank agrees, and reads
it once per step (training/run/step.py: read_step). Under DeepSpeed's own optimizers
(`checks_itself`) the step is queued first and the read comes after it (`check_skipped` then
holds that a non-finite loss was not applied); a plain torch optimizer reads first and calls
`optimizer_step(engine, skip=not finite)`. `NanGuard` counts the
skipped steps and says when too many came in a row (train.max_bad_steps): the loop then saves
a checkpoint (skipped steps never changed the weights) and stops.

How a step is skipped (checked against deepspeed 0.19.8, tests/test_monitoring.py): a NaN loss
makes NaN gradients, and DeepSpeed's ZeRO 1/2/3 optimizers and its bf16/fp16 wrappers already
discard a step whose gradients are not finite (they clear the gradients, count it in
engine.skipped_steps, leave the LR schedule alone, and engine.was_step_applied() is False). The
one gap is ZeRO-0 in fp32, where the engine steps a plain torch optimizer: there we route the
step through the same engine path, by making the optimizer report an overflow for that call.

Out of memory. `oom_guard(...)` wraps the training loop: a CUDA out-of-memory error (or one a
test injects) ends the run with one message naming the step, the peak memory, the recipe's
micro-batch and sequence length, and what to change, cheapest first, with the planner's memory
estimate for each change when the memory model (core/memory.py) can compute it. Nothing is saved after an OOM,
so the newest complete checkpoint stays the one a resume uses. The message also goes to
RUN_DIR/FAILED, which `zerotune status` shows.

No torch import at module level. Tests inject NaN losses and OOM errors through
training/run/faults.py, never through this module.
"""
from __future__ import annotations

import dataclasses
import re
import sys
from contextlib import contextmanager
from pathlib import Path

from zerotune.core import memory
from zerotune.core.io import GIB, atomic_write
from zerotune.core.layout import FAILED_FILE, OOM_EXIT_CODE, RECIPE_FILE, latest_complete


# ----------------------------------------------------------------------------- non-finite loss
def checks_itself(engine) -> bool:
    """DeepSpeed's own optimizers (ZeRO 1/2/3, the bf16/fp16 wrappers) discard a step whose
    gradients are not finite by themselves: the loop may queue their step before it reads the
    loss. A plain torch optimizer (ZeRO-0, fp32) must be told to skip."""
    return hasattr(engine.optimizer, "overflow")


def optimizer_step(engine, skip: bool) -> bool:
    """engine.step() at the accumulation boundary; with skip=True the update is discarded.
    Returns whether the optimizer applied an update."""
    opt = engine.optimizer
    if not skip or hasattr(opt, "overflow"):  # DeepSpeed's own optimizers check the gradients
        engine.step()
    else:  # a plain torch optimizer (ZeRO-0, fp32): report an overflow and do nothing
        saved = opt.__dict__.get("step")  # LR schedulers wrap `step` on the instance: keep it
        opt.step, opt.overflow = (lambda *a, **k: None), True
        try:
            engine.step()
        finally:
            del opt.overflow
            if saved is not None:
                opt.step = saved
            else:
                del opt.step
    applied = engine.was_step_applied()
    check_skipped(skip, applied)
    return applied


def check_skipped(skip: bool, applied: bool) -> None:
    """A step whose loss was not finite must not have been applied."""
    if skip and applied:
        raise RuntimeError("the loss was not finite but DeepSpeed applied the update anyway; "
                           "the weights may hold NaN: resume from the last checkpoint")


class NanGuard:
    """Counts optimizer steps whose loss was not finite. `state` is the loop's checkpointed dict:
    the run's total lives in state["skipped_steps"], so it survives a resume."""

    def __init__(self, max_bad_steps: int, state: dict):
        self.max_bad_steps, self.state, self.in_a_row = max_bad_steps, state, 0
        state.setdefault("skipped_steps", 0)

    def update(self, finite: bool) -> bool:
        """Record one step; True when it was bad (its update skipped)."""
        if finite:
            self.in_a_row = 0
            return False
        self.in_a_row += 1
        self.state["skipped_steps"] += 1
        return True

    @property
    def total(self) -> int:
        return self.state["skipped_steps"]

    @property
    def should_stop(self) -> bool:
        return self.in_a_row >= self.max_bad_steps

    def stop_message(self, step: int, recipe) -> str:
        dtype_hint = " or use bf16 instead of fp16" if recipe.model.dtype == "fp16" else ""
        return (f"stopped: the loss was NaN/inf for {self.in_a_row} steps in a row (steps "
                f"{step - self.in_a_row + 1}-{step}; train.max_bad_steps is {self.max_bad_steps}). "
                f"The checkpoint of step {step} holds the weights from before them (skipped steps change "
                f"nothing). Lower train.lr (now {recipe.train.lr:g}), raise warmup or check the data around "
                f"these steps{dtype_hint}, then resume.")


# ----------------------------------------------------------------------------- out of memory
def is_oom(e: BaseException) -> bool:
    import torch
    return isinstance(e, torch.OutOfMemoryError) or (isinstance(e, RuntimeError) and "out of memory" in str(e))


def _suggestions(recipe, world: int) -> list[tuple[str, dict, dict]]:
    """What to change, cheapest first: (advice, recipe overrides, planner changes) for each
    change that is not already in effect."""
    t, d, m = recipe.train, recipe.distributed, recipe.method
    zero = recipe.zero_stage()
    out = []
    if t.micro_batch_size > 1:
        mbs = max(1, t.micro_batch_size // 2)
        acc = t.accumulation(d.replicas(world)) * t.micro_batch_size // mbs
        batch = (f"train.global_batch_size stays {t.global_batch_size}" if t.global_batch_size
                 else f"train.grad_accum: {acc}")
        out.append((f"train.micro_batch_size: {mbs} with {batch} (same global batch, a little slower)",
                    {"micro_batch_size": mbs}, {}))
    if not t.gradient_checkpointing:
        out.append(("train.gradient_checkpointing: true (recomputes activations, ~25% slower)", {}, {"grad_ckpt": True}))
    if m.kind != "qlora" and zero < 3:
        out.append(("distributed.zero: 3 (shards parameters too; more communication)", {}, {"zero": 3}))
    if m.kind != "qlora" and not d.offload_optimizer:
        out.append(("distributed.offload_optimizer: true (optimizer states and step on CPU; needs CPU memory)",
                    {}, {"zero": max(zero, 1), "offload_optimizer": True}))
    if m.kind != "qlora" and not d.offload_params:
        out.append(("distributed.offload_params: true (parameters on CPU; slowest)", {},
                    {"zero": 3, "offload_optimizer": True, "offload_params": True}))
    if m.kind == "full":
        out.append(("method.kind: lora or qlora (trains adapters instead of every weight)", {},
                    {"method": "lora", "zero": 0, "offload_optimizer": False, "offload_params": False}))
    elif m.kind == "lora":
        out.append(("method.kind: qlora (4-bit base weights)", {},
                    {"method": "qlora", "zero": 0, "offload_optimizer": False, "offload_params": False}))
    return out


def _planner_estimates(recipe, world: int, changes: list[tuple[str, dict, dict]]) -> tuple[float | None, list]:
    """Planner estimate (bytes per GPU) of the current setup and after each cumulative change;
    (None, [None, ...]) when the memory model cannot model this run."""
    try:
        w = memory.workload_of(recipe, world)
        st = memory.Strategy(recipe.method.kind, recipe.zero_stage(), recipe.distributed.offload_optimizer,
                             recipe.distributed.offload_params, recipe.train.gradient_checkpointing)
        now = memory.estimate_memory(w, st)["total"]
        after = []
        for _, wl, strat in changes:  # each change keeps the ones before it
            w = dataclasses.replace(w, **wl)
            st = dataclasses.replace(st, **strat)
            after.append(memory.estimate_memory(w, st)["total"])
        return now, after
    except Exception:
        return None, [None] * len(changes)


def _size(b: float) -> str:
    return f"{b / GIB:.1f} GiB" if b >= GIB else f"{b / 2 ** 20:.0f} MiB"


def _memory_line(torch_message: str) -> str:
    import torch
    asked = re.search(r"Tried to allocate ([0-9.]+ [KMGT]i?B)", torch_message)
    asked = f", asking for {asked.group(1)} more" if asked else ""
    if not torch.cuda.is_available():
        return f"peak memory unknown (no CUDA device){asked}"
    dev = torch.cuda.current_device()
    total = torch.cuda.get_device_properties(dev).total_memory
    return (f"peak {torch.cuda.max_memory_allocated(dev) / GIB:.1f} GiB allocated, "
            f"{torch.cuda.max_memory_reserved(dev) / GIB:.1f} GiB reserved of {total / GIB:.1f} GiB on cuda:{dev}{asked}")


def oom_message(e: BaseException, run_dir: Path, recipe, step: int, total_steps: int, world: int, rank: int) -> str:
    t = recipe.train
    head = (f"zerotune: out of GPU memory at step {step}/{total_steps} on rank {rank} ({_memory_line(str(e))}) "
            f"with micro_batch_size {t.micro_batch_size}, data.max_len {recipe.data.max_len}"
            f"{' (packed)' if recipe.data.packing else ''}, {recipe.method.kind}, ZeRO-{recipe.zero_stage()}, "
            f"{recipe.model.dtype}, gradient checkpointing {'on' if t.gradient_checkpointing else 'off'}.")
    ckpt = latest_complete(run_dir)
    keep = (f"The last complete checkpoint, {ckpt.relative_to(run_dir)}, is intact: rerun the same command "
            f"after a change and it resumes from there." if ckpt else "No checkpoint was saved yet.")
    changes = _suggestions(recipe, world)
    now, after = _planner_estimates(recipe, world, changes)
    lines = [head, keep, "Change, cheapest first (estimates include the changes above each line):"]
    for i, ((advice, _, _), est) in enumerate(zip(changes, after), 1):
        lines.append(f"  {i}. {advice}" + (f"  [plan: ~{_size(est)} per GPU]" if est else ""))
    if now is not None:
        lines.append(f"The planner estimated ~{_size(now)} per GPU for the current setup; "
                     f"`zerotune plan {run_dir / RECIPE_FILE}` compares every strategy.")
    return "\n".join(lines)


def write_failure(run_dir: Path, message: str) -> None:
    """RUN_DIR/FAILED: why the run stopped, for `zerotune status` (removed when a new attempt starts)."""
    try:
        atomic_write(Path(run_dir) / FAILED_FILE, message.rstrip() + "\n")
    except OSError:
        pass


@contextmanager
def oom_guard(run_dir: Path, recipe, state: dict, total_steps: int, world: int, rank: int):
    """Turn a CUDA out-of-memory error inside the block into one message and exit OOM_EXIT_CODE."""
    try:
        yield
    except Exception as e:
        if not is_oom(e):
            raise
        step = min(state["step"] + 1, total_steps)
        msg = oom_message(e, Path(run_dir), recipe, step, total_steps, world, rank)
        print(msg, file=sys.stderr, flush=True)
        write_failure(run_dir, msg)
        raise SystemExit(OOM_EXIT_CODE) from None
