"""One optimizer step's work on one rank, and evaluation: what the loop runs and what the
benchmarks measure (benchmarks/ call these same functions, so what is measured is what trains).

Loss is the mean over the target tokens of the whole global batch: each micro-batch's summed
token loss is divided by `n_target`, the global target-token count (all micro-batches, all
ranks), so gradient accumulation and world size do not change it. DeepSpeed averages gradients
over ranks, so the backward is scaled by the world size to undo that average.

Per optimizer step, beyond ZeRO's own communication, the loop issues two small collectives and
one host read, whatever the world size: `step_counts` (token counts of the whole accumulation
window, all-reduced before the first forward and divided by on the device), `step_report` (loss,
stop votes, background saves still writing, router aux loss, all-reduced after the backward) and `read_step` (one .tolist() of
both and the gradient norm). benchmarks/step_syncs.py counts them (tests/test_step_syncs.py).
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from zerotune.training.data.loader import collate, real_tokens, target_tokens
from zerotune.training.run import diagnostics


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def micro_loss(engine, batch: dict, n_target) -> torch.Tensor:
    """Summed token loss of one micro-batch / n_target. Only the loss is kept: the logits are
    freed before the backward. `n_target` may be a device tensor (the loop's: the all-reduced
    count, never read on the host) or a number: the model returns the summed token loss
    (num_items_in_batch=1) and the division is here, so no host sync is needed for it. A mixture
    of experts: transformers added router_aux_loss_coef x the router's load-balancing loss; that
    term is not divided and rides along as `.router_aux` (training/model/moe.py)."""
    out = engine(**batch, num_items_in_batch=1)
    if torch.is_tensor(n_target):
        n_target = n_target.to(out.loss.dtype)
    if getattr(out, "aux_loss", None) is not None:
        aux = out.aux_loss * engine.module.config.router_aux_loss_coef
        loss = (out.loss - aux) / n_target + aux
        loss.router_aux = aux
        return loss
    return out.loss / n_target


def forward_backward(engine, micro: list[dict], n_target, world: int) -> torch.Tensor:
    """Forward and backward of every micro-batch of a step (gradients accumulate in the engine;
    the update is the caller's, at the boundary). Returns this rank's share of the step's loss
    as a float64 tensor on the device (MoE: `.router_aux`, this rank's share of the router loss):
    no host sync here. `n_target`: the global target-token count, a device tensor or a number."""
    step_loss = torch.zeros((), dtype=torch.float64, device=engine.device)
    aux_sum = None
    for i, batch in enumerate(micro):
        loss = micro_loss(engine, batch, n_target)
        aux = getattr(loss, "router_aux", None)
        if aux is not None:   # MoE: the router loss counts once per step (a mean), not per micro-batch and rank
            share = aux / (len(micro) * world)
            loss = loss - aux + share
            aux_sum = share.detach().double() + (0 if aux_sum is None else aux_sum)
        engine.backward(loss * world, scale_wrt_gas=False)  # DeepSpeed averages over ranks
        step_loss += (loss.detach() - (0 if aux is None else share.detach())).double()   # train/loss: the LM loss
        if i < len(micro) - 1:
            engine.step()  # not a boundary: DeepSpeed only accumulates
    if aux_sum is not None:
        step_loss.router_aux = aux_sum
    return step_loss


def step_counts(micro: list[dict], device, copies: int = 1) -> torch.Tensor:
    """The step's first collective: the global target, real and padded token counts of the whole
    accumulation window, one all-reduce before the first forward, left on the device as float64
    [n_target, real, padded]: the loss divides by n_target there and the host reads the counts
    only with the step's one read (`read_step`). Counted on the host batches (before they move to
    the GPU, before sequence-parallel sharding). `copies`: ranks that hold each micro-batch (the
    sequence-parallel degree); the sums count each batch once (exact: integer counts over equal
    copies)."""
    counts = torch.tensor([sum(target_tokens(b) for b in micro), sum(real_tokens(b) for b in micro),
                           sum(b["input_ids"].numel() for b in micro)], dtype=torch.float64)
    counts = counts.to(device, non_blocking=True)   # a host copy: no wait on the device's queue
    dist.all_reduce(counts)
    return counts / copies if copies > 1 else counts


def step_report(step_loss: torch.Tensor, stop_vote: float, writing: float = 0.0) -> torch.Tensor:
    """The step's second and last collective: [loss, stop votes, writing, router aux loss] summed
    over ranks (the ranks' loss shares add up to the global batch's loss; votes:
    signals.StopRequest.vote, read back with signals.agreed; writing: 1 from each rank whose
    background checkpoint writer is still busy, so that every rank decides alike whether a save
    due now waits (training/run/saves.py); router aux: 0 for dense models). Stays on the device."""
    aux = getattr(step_loss, "router_aux", None)
    report = torch.stack([step_loss, torch.full_like(step_loss, stop_vote), torch.full_like(step_loss, writing),
                          aux.double() if aux is not None else torch.zeros_like(step_loss)])
    dist.all_reduce(report)
    return report


def read_step(report: torch.Tensor, counts: torch.Tensor, grad_norm=None, moe: bool = False) -> dict:
    """The step's one host sync: the report, the counts and the gradient norm (a device tensor
    under some DeepSpeed optimizers) come back in a single read. `moe`: the step had a router
    aux loss (else "router_aux" is None)."""
    parts = [report, counts]
    if torch.is_tensor(grad_norm):
        parts.append(grad_norm.detach().to(report.device, torch.float64).reshape(1))
    values = torch.cat(parts).tolist()
    if not torch.is_tensor(grad_norm):
        values.append(None if grad_norm is None else float(grad_norm))
    loss, votes, writing, aux, n_target, real, padded, norm = values
    return {"loss": loss, "votes": votes, "writing": writing, "router_aux": aux if moe else None,
            "n_target": n_target, "real": real, "padded": padded, "grad_norm": norm}


def update_and_read(engine, step_loss: torch.Tensor, counts: torch.Tensor, vote, timed) -> dict:
    """The optimizer step and the step's one host read (`read_step`: loss, stop votes, saves still
    writing, token counts, grad norm; "finite": every rank agrees whether the loss was). DeepSpeed's
    own optimizers discard a non-finite step themselves (diagnostics.checks_itself), so their update
    is queued first and the read comes after it; a plain torch optimizer must hear "skip" before
    its step. `vote()`: this rank's (stop vote, writing), asked after the update is queued (a
    signal that came during the step counts in it); `timed(name)`: the loop's phase timer."""
    checks_itself = diagnostics.checks_itself(engine)
    if checks_itself:
        with timed("optimizer"):
            applied = diagnostics.optimizer_step(engine, skip=False)
    got = read_step(step_report(step_loss, *vote()), counts, engine.get_global_grad_norm() if checks_itself else None,
                    moe=hasattr(step_loss, "router_aux"))
    got["finite"] = math.isfinite(got["loss"])
    if checks_itself:
        diagnostics.check_skipped(not got["finite"], applied)
    else:
        with timed("optimizer"):
            diagnostics.optimizer_step(engine, skip=not got["finite"])   # NaN/inf loss: the update is discarded
        got["grad_norm"] = engine.get_global_grad_norm()   # None for a plain torch optimizer
    return got


def votes_now(vote: float, device) -> float:
    """The ranks' summed stop votes, read at once (before the first step only: a signal that
    came during the set-up)."""
    total = torch.tensor([vote], dtype=torch.float64).to(device)
    dist.all_reduce(total)
    return total.item()


@torch.no_grad()
def evaluate(engine, dataset, rank: int, world: int, micro_batch_size: int, pad_id: int,
             limit: int | None, sp=None) -> float:
    """Token-weighted eval loss. Every rank runs the same number of forwards (ZeRO-3 needs it):
    ranks short of samples repeat sample 0 with its labels masked out. With sequence parallelism
    (`sp`) the ranks of a group evaluate the same batch, each its shard (long rows fit as in
    training): rank and world are then the data-parallel replica and the replica count."""
    engine.eval()
    copies = sp.size if sp else 1
    if sp:
        rank, world = sp.dp_rank, sp.dp_world
    per_rank = math.ceil(len(dataset) / world)
    n_batches = math.ceil(per_rank / micro_batch_size)
    if limit:
        n_batches = min(n_batches, limit)
    loss_sum = torch.zeros((), dtype=torch.float64, device=engine.device)
    tokens = torch.zeros((), dtype=torch.float64, device=engine.device)
    for b in range(n_batches):
        samples = []
        for j in range(b * micro_batch_size, (b + 1) * micro_batch_size):
            i = j * world + rank
            if i < len(dataset):
                samples.append(dataset[i])
            else:
                samples.append({"input_ids": dataset[0]["input_ids"], "labels": [-100] * len(dataset[0]["labels"])})
        batch = collate(samples, pad_id)
        n = target_tokens(batch)
        if sp:   # the forward returns this shard's summed token loss / num_items_in_batch
            loss_sum += engine(**sp.shard(batch, engine.device), num_items_in_batch=1).loss.double()
        else:
            loss = micro_loss(engine, to_device(batch, engine.device), max(n, 1))
            loss_sum += (loss - getattr(loss, "router_aux", 0)).double() * n   # the LM loss only
        tokens += n
    dist.all_reduce(loss_sum)   # with SP the shards of a batch sum to its loss; its tokens were counted N times
    dist.all_reduce(tokens)
    engine.train()
    return (loss_sum / (tokens / copies).clamp(min=1)).item()
