"""Sequence parallelism (`distributed.sequence_parallel: N`): DeepSpeed Ulysses for HF models.

N consecutive ranks (a group inside one node) share each micro-batch: every rank of the group
reads the same rows, pads them to a multiple of N and keeps its N-th of the sequence (tokens,
position_ids and the already shifted labels). Inside each attention layer DeepSpeed's
all-to-all gives every rank all S tokens of H/N heads and back (training/long_context/sp_attention.py, which
also keeps packed samples apart). Data parallelism runs across groups: the sampler and the batch
geometry see dp_world = world / N replicas; ZeRO shards parameters, gradients and optimizer
states over all `world` ranks.

    sp = sequence_parallel.init(recipe)                # after deepspeed.init_distributed; None if N == 1
    sp.wrap_model(model, recipe)                       # after build_model, before deepspeed.initialize
    counts = steps.step_counts(micro, device, copies=sp.size)   # full batches: [n_target, real, padded]
    micro = [sp.shard(b, device) for b in micro]
    steps.forward_backward(engine, micro, counts[0], world)                         # unchanged
    steps.evaluate(engine, data.eval, rank, world, mbs, pad_id, limit, sp=sp)        # sharded too

training/run/loop.py does exactly this; ds_config.json carries "sequence_parallel_size" (launcher/ds_config.py).

Loss: each rank's shard loss is its summed token loss / n_target (the global target count),
so the sum over all ranks is the mean over the global batch, as without SP.
Gradients: DeepSpeed is NOT given an SP mpu. To DeepSpeed every rank is a data-parallel rank
that averages gradients over the world, and step.py's backward of loss x world undoes that
average, so each parameter gets the sum over all ranks of their shard-loss gradients: the
gradient of the global loss (the all-to-all's backward carries each rank's part to the ranks
that own the tokens). With `mpu=` DeepSpeed 0.19.8 would average over world / N on some paths
(ZeRO-1/2 all-reduce, ZeRO-3 contiguous) and over world on ZeRO-3's default reduce-scatter
path (coalesced_collectives.reduce_scatter_coalesced): measured 0.5x gradients at N=2 there.
ds_config carries "sequence_parallel_size": N so that its train_batch_size (micro x accumulation
x world / N) passes DeepSpeed's batch check (runtime/config.py reads it when no mpu is given).
"""
from __future__ import annotations

import os
import types
from dataclasses import dataclass

import torch.distributed as dist
import torch.nn.functional as F

from zerotune.core.long_context import check_sequence_parallel, heads_problem, moe_problem

from zerotune.training.long_context import sp_attention
from zerotune.training.model.loss import decoder_loss
from zerotune.training.data.tokenize import IGNORE
from zerotune.training.long_context.sp_attention import segments_of


@dataclass
class SequenceParallel:
    size: int          # N: ranks that share one sequence
    rank: int          # this rank's place in its group (which N-th of the sequence it keeps)
    group: object      # the SP process group (N consecutive global ranks)
    dp_rank: int       # which data-parallel replica this group is: the sampler's rank
    dp_world: int      # world / N: the sampler's world and the batch geometry's
    attention: object = None   # sp_attention.UlyssesAttention once wrap_model ran
    flash: bool = False

    # ------------------------------------------------------------------ model
    def wrap_model(self, model, recipe) -> None:
        """Register the Ulysses attention and let the causal LM take pre-shifted labels
        (`shift_labels`): labels shift across shard borders, so they are shifted before sharding."""
        lm = model.get_base_model() if hasattr(model, "get_base_model") else model
        impl = lm.config._attn_implementation   # what the rank built (model.attn_implementation: auto decided there)
        problem = moe_problem(lm.config.to_dict()) or heads_problem(lm.config.to_dict(), self.size)
        if problem:
            raise RuntimeError(problem)
        self.attention = sp_attention.register(lm.config, self.group, impl)
        self.flash = impl.startswith("flash")
        accept_shift_labels(lm)

    # ------------------------------------------------------------------ data
    def shard(self, batch: dict, device) -> dict:
        """This rank's part of a collated micro-batch (CPU tensors), moved to `device`: the keys
        the model's forward takes (input_ids, position_ids, shift_labels, sp_segments)."""
        full = full_sequences(batch, self.size)
        seg = segments_of(full["position_ids"], self.flash, device)
        chunk = full["input_ids"].shape[1] // self.size
        part = slice(self.rank * chunk, (self.rank + 1) * chunk)
        out = {k: v[:, part].contiguous().to(device, non_blocking=True) for k, v in full.items()}
        out["sp_segments"] = seg
        return out


def init(recipe) -> SequenceParallel | None:
    """The SP groups of `distributed.sequence_parallel` (None when it is 1). Every rank calls it,
    after deepspeed.init_distributed; N must divide the processes of a node (LOCAL_WORLD_SIZE)."""
    n = recipe.distributed.sequence_parallel
    if n <= 1:
        return None
    world = dist.get_world_size()
    local = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    problem = check_sequence_parallel(recipe, gpus_per_node=local, nodes=max(1, world // local))
    if problem:
        raise RuntimeError(problem)
    rank, group = dist.get_rank(), None
    for first in range(0, world, n):          # every rank creates every group, in the same order
        g = dist.new_group(list(range(first, first + n)))
        if first <= rank < first + n:
            group = g
    return SequenceParallel(size=n, rank=rank % n, group=group, dp_rank=rank // n, dp_world=world // n)


def full_sequences(batch: dict, n: int) -> dict:
    """The micro-batch as SP needs it, unsharded: position_ids (a plain batch's from its
    attention_mask: 0..len-1, padding 0), labels shifted (position i holds the label of token
    i+1, as transformers' loss shifts them), every row padded to a multiple of n with padding
    (position 0, no label)."""
    ids, labels = batch["input_ids"], batch["labels"]
    if "position_ids" in batch:
        pos = batch["position_ids"]
    else:
        mask = batch["attention_mask"]
        if bool((mask[:, 1:] > mask[:, :-1]).any()):
            raise ValueError("sequence parallelism needs right-padded rows")
        pos = (mask.cumsum(-1) - 1).clamp(min=0) * mask
    shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE)
    extra = -ids.shape[1] % n
    if extra:
        ids = F.pad(ids, (0, extra), value=0)
        pos = F.pad(pos, (0, extra), value=0)
        shifted = F.pad(shifted, (0, extra), value=IGNORE)
    return {"input_ids": ids, "position_ids": pos.long(), "shift_labels": shifted}


def accept_shift_labels(lm) -> None:
    """Let the causal LM's forward take `shift_labels` (already shifted, this rank's shard) and
    return the summed token loss / num_items_in_batch, through the chunked loss when it is on
    (training/model/loss.py); without shift_labels the forward is the one it had."""
    if getattr(lm, "_zerotune_sp", False):
        return
    previous = lm.forward

    def forward(self, input_ids=None, labels=None, shift_labels=None, num_items_in_batch=None, **kwargs):
        if shift_labels is None:
            return previous(input_ids=input_ids, labels=labels, num_items_in_batch=num_items_in_batch, **kwargs)
        if num_items_in_batch is None:
            raise ValueError("sequence parallel forward needs num_items_in_batch (the global target count)")
        return decoder_loss(self, shift_labels, num_items_in_batch, input_ids=input_ids, **kwargs)

    lm.forward = types.MethodType(forward, lm)
    lm._zerotune_sp = True
