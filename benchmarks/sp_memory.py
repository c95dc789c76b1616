"""Peak GPU memory of one training step with sequence parallelism against core/long_context.py's
estimate (run under torchrun, one process per GPU; a random-initialised Llama of `--size`):

    torchrun --nproc_per_node 2 benchmarks/sp_memory.py --sp 2 --seq 32768

Prints one line `RESULT {...}` from rank 0: measured peak (torch.cuda.max_memory_allocated) and
the estimate's total and parts, in GiB.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

SIZES = {"1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                    num_key_value_heads=8, vocab_size=32064, tie_word_embeddings=True)}


def random_model(size: str, path: str) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig
    cfg = LlamaConfig(max_position_embeddings=131072, **SIZES[size])
    if int(os.environ.get("RANK", 0)) == 0 and not os.path.exists(os.path.join(path, "config.json")):
        with torch.device("cuda"):
            AutoModelForCausalLM.from_config(cfg, dtype=torch.bfloat16).save_pretrained(path)
    return cfg.to_dict()


def packed_batch(seq: int, samples: int) -> dict:
    g = torch.Generator().manual_seed(0)
    n = seq // samples
    ids = torch.randint(3, 32000, (1, seq), generator=g)
    pos = torch.arange(seq).remainder(n)[None]
    labels = ids.clone()
    labels[pos == 0] = -100
    return {"input_ids": ids, "labels": labels, "position_ids": pos}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--sp", type=int, default=2)
    p.add_argument("--seq", type=int, default=32768)
    p.add_argument("--size", default="1b")
    p.add_argument("--samples", type=int, default=4, help="packed samples per row")
    a = p.parse_args()
    import deepspeed
    import torch.distributed as dist
    from zerotune.core.long_context import sp_memory
    from zerotune.core.memory import Strategy, Workload
    from zerotune.core.recipe import Recipe
    from zerotune.launcher.ds_config import render
    from zerotune.training.long_context import sequence_parallel
    from zerotune.training.run import step as steps
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    deepspeed.init_distributed("nccl")
    world = dist.get_world_size()
    path = f"/tmp/llama-{a.size}-random"
    cfg = random_model(a.size, path)
    dist.barrier()
    recipe = Recipe.model_validate({
        "name": "spmem", "model": {"path": path, "dtype": "bf16"},
        "data": {"train": [{"path": "unused.json", "format": "text"}], "max_len": a.seq},
        "train": {"max_steps": 1, "micro_batch_size": 1, "grad_accum": 1, "gradient_checkpointing": True},
        "distributed": {"zero": 3, "sequence_parallel": a.sp}})
    sp = sequence_parallel.init(recipe)
    ds_config = render(recipe, world, hidden_size=cfg["hidden_size"])
    from zerotune.training.run.engine import build_engine
    from zerotune.training.model.build import build_model
    model = build_model(recipe, ds_config)
    model.config.use_cache = False
    if sp:
        sp.wrap_model(model, recipe)
    engine = build_engine(model, ds_config, recipe.train, 1)
    engine.train()
    batch = packed_batch(a.seq, a.samples)
    torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    micro = [batch]
    if sp:
        n_target = steps.step_counts(micro, engine.device, copies=sp.size)[0]
        micro = [sp.shard(b, engine.device) for b in micro]
    else:
        n_target = steps.step_counts(micro, engine.device)[0]
        micro = [steps.to_device(b, engine.device) for b in micro]
    loss = steps.forward_backward(engine, micro, n_target, world)
    engine.step()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    peak = torch.cuda.max_memory_allocated() / 2 ** 30
    w = Workload(model=cfg, dtype="bf16", micro_batch_size=1, seq_len=a.seq, gpus_per_node=world, fused_loss=True)
    est = sp_memory(w, Strategy("full", 3), a.sp, packed=True, attn="sdpa")
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps({"sp": a.sp, "seq": a.seq, "world": world, "loss": loss.item(),
                                      "seconds": round(seconds, 2), "peak_gib": round(peak, 2),
                                      **{f"est_{k}": round(v / 2 ** 30, 2) for k, v in est.items()
                                         if k != "local_tokens" and k != "trainable"}}), flush=True)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
