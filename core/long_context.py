"""Long context with sequence parallelism (`distributed.sequence_parallel: N`): the checks a
recipe must pass before any GPU time, and the per-GPU memory of one strategy at SP degree N.
Torch-free (the launcher and the planner import it; training/long_context/sequence_parallel.py too).

Memory with SP degree N (B x S tokens per micro-batch, each GPU of a group holds S/N of them):
  parameters, gradients, optimizer states: as without SP. ZeRO shards them over all GPUs (the
      sequence-data-parallel group DeepSpeed builds from the SP mpu is the whole world).
  activations: every per-token term of core/memory.py at S/N tokens: the kept layer inputs
      (gradient checkpointing) and one layer's working set.
  all-to-all: inside attention each GPU holds all S tokens of H/N heads: the gathered q, k, v
      (k, v replicated when N exceeds the KV heads) and the attention output before it goes
      back, as large as their S/N-token, H-head counterparts; counted twice (contiguous copies
      made around each exchange), once per layer with checkpointing, every layer without.
  logits: the chunked loss holds one chunk (<= FUSED_CHUNK tokens) whatever S/N is; the plain
      loss holds 12 bytes per logit of the S/N local tokens.
  packed rows with sdpa: transformers builds a (S/N)^2 boolean mask per row for the local
      shard (position_ids restart inside it), which SP then discards; it lives for the whole step.
      Without SP (N = 1) sdpa also gets that mask and turns it into a 2-byte additive one.
The sum is checked against the GPU, as core/memory.py does. Measured on 2 H200s (random 1B
Llama, d 2048, 16 layers, bf16, ZeRO-3, checkpointing, chunked loss, 4 packed samples a row,
benchmarks/sp_memory.py, torch.cuda.max_memory_allocated), estimate in brackets:
  N=1 64k 30.3 GiB (30.9); N=2 64k 12.6 (15.1); N=2 128k 22.2 (24.1); N=1 128k 79.6 (77.7).
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Optional

from .checkpoint_cost import snapshot_bytes_per_node
from .families import choose_attention, experts, is_moe
from .flops import shape
from .memory import Strategy, Workload, dtype_bytes, estimate_memory

SP_METHODS = ("full", "lora", "qlora", "ia3", "adapter")         # methods that keep the sequence as it is
SP_ATTENTION = ("sdpa", "flash_attention_2")                       # kernels training/long_context/sp_attention.py drives


def heads_problem(model_config: dict, n: int) -> Optional[str]:
    """Ulysses splits attention heads over the N ranks of a group."""
    s = shape(model_config)
    if s["heads"] % n:
        return f"distributed.sequence_parallel: {n} must divide the model's {s['heads']} attention heads"
    if s["kv_heads"] % n and n % s["kv_heads"]:
        return (f"distributed.sequence_parallel: {n} and the model's {s['kv_heads']} key/value heads must divide "
                "one another")
    return None


def check_sequence_parallel(recipe, gpus_per_node: int, nodes: int = 1,
                            model_config: Optional[dict] = None) -> Optional[str]:
    """One line saying why the recipe's sequence parallelism cannot run on this cluster, or None."""
    n = recipe.distributed.sequence_parallel
    if n <= 1:
        return None
    if gpus_per_node % n:
        return (f"distributed.sequence_parallel: {n} must divide the GPUs of a node ({gpus_per_node}): "
                "the ranks of one sequence exchange every layer's attention and stay inside a node")
    if recipe.method.kind not in SP_METHODS:
        return (f"distributed.sequence_parallel: method.kind {recipe.method.kind} changes the sequence "
                f"(virtual tokens); sequence parallelism runs with {', '.join(SP_METHODS)}")
    attn = recipe.model.attn_implementation
    if attn == "auto" and model_config is not None:   # a Slurm job's auto, left to the ranks: sdpa or better
        attn = choose_attention(model_config, "auto", cuda=False)
    if attn not in SP_ATTENTION and not (attn == "auto" and model_config is None):   # a rank checks the built model
        return (f"distributed.sequence_parallel: model.attn_implementation {recipe.model.attn_implementation} "
                f"is not supported{' by this model' if attn != recipe.model.attn_implementation else ''}; "
                f"use {' or '.join(SP_ATTENTION)}")
    if model_config is not None:
        return moe_problem(model_config) or heads_problem(model_config, n)
    return None


def moe_problem(model_config: dict) -> Optional[str]:
    """A mixture of experts under sequence parallelism: the sharded forward (training/model/loss.py
    decoder_loss) returns the LM loss only, so the router's load-balancing loss would be dropped."""
    if not is_moe(model_config):
        return None
    return (f"distributed.sequence_parallel: a mixture of experts ({experts(model_config)} experts) does not "
            "train with sequence parallelism (its router's load-balancing loss would be lost); "
            "use distributed.sequence_parallel: 1")


def sp_memory(w: Workload, st: Strategy, sp: int, packed: bool = False, attn: str = "sdpa") -> dict:
    """core.memory.estimate_memory's dict for one GPU of an SP group of `sp` (module docstring),
    with the extra keys all_to_all and mask (bytes) and local_tokens (per micro-batch)."""
    s = shape(w.model)
    local = math.ceil(w.seq_len / sp)
    m = estimate_memory(replace(w, seq_len=local), st)
    act = dtype_bytes(w.dtype)
    tokens = w.micro_batch_size * local
    kept, held, working = m["kept"], m["held"], m["working"]   # core.memory.activation_bytes
    q = s["heads"] * s["head_dim"]
    kv = (max(s["kv_heads"], sp) if sp > 1 else s["kv_heads"]) * s["head_dim"]
    a2a = 2 * (2 * q + 2 * kv) * act * tokens if sp > 1 else 0.0   # one layer's
    k = m["ckpt_layers"]                 # uncheckpointed layers keep theirs, a recompute holds one
    held, working = held + a2a * (s["layers"] - k), working + (a2a if k else 0.0)
    mask = float(w.micro_batch_size * local * local) * (1 if sp > 1 else 3) if packed and attn == "sdpa" else 0.0
    base = m["params"] + m["grads"] + m["optimizer"] + m["temporary"] + mask
    total = base + kept + max(held + m["logits"], working)
    return {**m, "activations": kept + held + working, "held": held, "working": working,
            "all_to_all": a2a * ((s["layers"] - k) + (1 if k else 0)), "mask": mask, "total": total,
            "local_tokens": tokens}


def gpu_memory_of(w: Workload, st: Strategy) -> dict:
    """Per-GPU memory of `st` at the workload's own SP degree: what the planner shows and checks.
    At N = 1 without packing it is core.memory.estimate_memory's; packed rows with sdpa add the
    mask. CPU memory per node also holds a background save's snapshot (checkpoint.async_save)."""
    m = sp_memory(w, st, w.sequence_parallel, w.packed, w.attn)
    if w.async_save:
        m["cpu_per_node"] += snapshot_bytes_per_node(w, st)
    return m


def sp_candidates(w: Workload) -> list[int]:
    """SP degrees to try: divisors of the GPUs of a node that also split the attention heads."""
    return [n for n in range(1, w.gpus_per_node + 1)
            if w.gpus_per_node % n == 0 and (n == 1 or heads_problem(w.model, n) is None)]


def layer_options(recipe) -> list[str]:
    """What makes a decoder layer more than plain compute in this (resolved) run: sequence parallelism,
    the tiled MLP, attention kept through checkpointing, checkpoints offloaded to CPU memory (training/model/long_sequence.py). The rank logs
    them; train.compile leaves such layers alone (launcher/prepare.py compile_choice, build.py)."""
    sp, t = recipe.distributed.sequence_parallel, recipe.train
    o = t.offload_activations
    return ([f"sequence parallel {sp}"] if sp > 1 else []) + \
        (["tiled MLP"] if recipe.uses_tiled_mlp() else []) + \
        (["attention kept, not recomputed"] if t.recompute_attention is False and t.gradient_checkpointing not in (False, 0)
         else []) + \
        ([f"checkpointed activations on CPU{'' if o is True else f' (first {o} layers)'}"]
         if o is True or (type(o) is int and o > 0 and t.gradient_checkpointing not in (False, 0)) else [])
