"""One optimizer step's work on one rank, and evaluation: what the loop runs and what the
benchmarks measure (benchmarks/ call these same functions, so what is measured is what trains).

Loss is the mean over the target tokens of the whole global batch: each micro-batch's summed
token loss is divided by `n_target`, the global target-token count (all micro-batches, all
ranks), so gradient accumulation and world size do not change it. DeepSpeed averages gradients
over ranks, so the backward is scaled by the world size to undo that average.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from zerotune.training.data.loader import collate, real_tokens, target_tokens


def to_device(batch: dict, device) -> dict:
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}


def micro_loss(engine, batch: dict, n_target: float) -> torch.Tensor:
    """Summed token loss of one micro-batch / n_target. Only the loss is kept: the logits are
    freed before the backward. A mixture of experts: transformers added router_aux_loss_coef x
    the router's load-balancing loss; that term rides along as `.router_aux` (training/model/moe.py)."""
    out = engine(**batch, num_items_in_batch=n_target)
    loss = out.loss
    if getattr(out, "aux_loss", None) is not None:
        loss.router_aux = out.aux_loss * engine.module.config.router_aux_loss_coef
    return loss


def router_aux(step_loss: torch.Tensor) -> float | None:
    """The step's router aux loss (coef x load balancing, mean over micro-batches and ranks), or
    None for dense models; every rank calls it (one all-reduce, MoE only)."""
    aux = getattr(step_loss, "router_aux", None)
    if aux is None:
        return None
    dist.all_reduce(aux)
    return aux.item()


def forward_backward(engine, micro: list[dict], n_target: float, world: int) -> torch.Tensor:
    """Forward and backward of every micro-batch of a step (gradients accumulate in the engine;
    the update is the caller's, at the boundary). Returns this rank's share of the step's loss
    as a float64 tensor on the device: no host sync here."""
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


def step_counts(micro: list[dict], stop_vote: float, device, copies: int = 1) -> list[float]:
    """One all-reduce per step: global target, real and padded tokens, and the ranks' summed stop
    votes (training/run/signals.py: StopRequest.vote, read back with signals.agreed). Counted on the
    host batches (before they move to the GPU, before sequence-parallel sharding), so this costs
    no device sync beyond the all-reduce. `copies`: ranks that hold each micro-batch (the
    sequence-parallel degree); the token sums count each batch once (exact: integer counts over
    equal copies). Returns [n_target, real, padded, votes]."""
    counts = torch.tensor([sum(target_tokens(b) for b in micro), sum(real_tokens(b) for b in micro),
                           sum(b["input_ids"].numel() for b in micro), float(stop_vote)],
                          dtype=torch.float64, device=device)
    dist.all_reduce(counts)
    n_target, real, padded, votes = counts.tolist()
    return [n_target / copies, real / copies, padded / copies, votes]


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
