"""Worker of tests/test_sequence_parallel.py, run by torchrun on every rank:

    python -m torch.distributed.run --nproc_per_node N tests/sp_worker.py OUT_DIR CASES_JSON

For each case: the real model (training/model/build.py build_model) wrapped for sequence parallelism,
a real DeepSpeed engine (no mpu: plain data parallel to DeepSpeed), the step of training/run/step.py on this rank's shards;
then the same micro-batches through a plain copy of the model on one process (packed rows:
each sample on its own, unpacked). Writes OUT_DIR/rank<r>.json with the loss and the largest
relative gradient difference of each case.
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
STORIES = ROOT / "examples" / "stories260K"


def recipe_for(case: dict, sp: int):
    from zerotune.core.recipe import Recipe
    return Recipe.model_validate({
        "name": "sp", "model": {"path": str(STORIES), "dtype": case.get("dtype", "fp32"),
                                "attn_implementation": case.get("attn", "sdpa")},
        "method": {"kind": case["method"], "lora": {"r": 4, "dropout": 0.0}},
        "data": {"train": [{"path": "unused.json", "format": "alpaca"}], "max_len": 128},
        "train": {"max_steps": 1, "micro_batch_size": case["mbs"], "grad_accum": case["gas"], "lr": 1e-3,
                  "gradient_checkpointing": case["ckpt"], "fused_loss": case["fused"]},
        "distributed": {"zero": case["zero"] if sp > 1 else 0, "sequence_parallel": sp}})


def samples(seed: int, n: int, lo: int, hi: int) -> list[tuple[list[int], list[int]]]:
    """Random token rows with a masked prompt (labels -100 on the first third, always on token 0)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(lo, hi + 1, (1,), generator=g))
        ids = torch.randint(3, 512, (length,), generator=g).tolist()
        labels = [-100] * max(1, length // 3) + ids[max(1, length // 3):]
        out.append((ids, labels))
    return out


def micro_batches(case: dict, seed: int):
    """(collated micro-batches for the SP engine, the samples each holds, for the reference)."""
    from zerotune.training.data.dataset import TokenDataset
    from zerotune.training.data.loader import collate
    mbs, gas = case["mbs"], case["gas"]
    per_row = 3 if case["packed"] else 1
    raw = samples(seed, mbs * gas * per_row, 5, 29)
    bins = [list(range(r * per_row, (r + 1) * per_row)) for r in range(mbs * gas)]
    ds = TokenDataset.from_samples(raw, bins if case["packed"] else None)
    micro = [collate([ds[m * mbs + j] for j in range(mbs)], pad_id=0) for m in range(gas)]
    held = [[raw[i] for r in range(m * mbs, (m + 1) * mbs) for i in bins[r]] for m in range(gas)]
    return micro, held


def build_engine(recipe, ds_config: dict, sp):
    import deepspeed
    from zerotune.training.model.build import build_model
    torch.manual_seed(0)                       # LoRA's random init: the same in the reference
    model = build_model(recipe, ds_config)
    model.config.use_cache = False
    sp.wrap_model(model, recipe)
    nonzero_lora_b(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-3)
    cfg = {k: v for k, v in ds_config.items() if k != "optimizer"}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=params, optimizer=opt, config=cfg)
    engine.train()
    return engine


def nonzero_lora_b(model) -> None:
    """peft starts lora_B at zero, so lora_A would get no gradient: give B fixed, non-random values
    (the same on every rank, set through ZeRO-3's gather when the parameters are partitioned)."""
    import deepspeed
    bs = [p for n, p in model.named_parameters() if "lora_B" in n]
    with deepspeed.zero.GatheredParameters(bs, modifier_rank=0):
        for k, p in enumerate(bs):
            p.data.copy_(0.05 * torch.sin(torch.arange(p.numel(), dtype=torch.float32) + k).reshape(p.shape))


def trainable_values(module) -> dict:
    """Full values of the trainable parameters (gathered under ZeRO-3), on the CPU."""
    import deepspeed
    named = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    with deepspeed.zero.GatheredParameters([p for _, p in named]):
        return {n: p.detach().float().cpu().clone() for n, p in named}


def reference(case: dict, held, n_target: float, device, values: dict):
    """Loss and gradients of the plain model, every sample unpacked, loss / n_target summed."""
    from zerotune.training.model.build import build_model
    torch.manual_seed(0)
    model = build_model(recipe_for(case, 1), {"zero_optimization": {"stage": 0}}).to(device)
    model.config.use_cache = False
    model.train()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n in values:
                p.copy_(values[n].to(p.dtype))
    total = torch.zeros((), dtype=torch.float64, device=device)
    for group in held:
        for ids, labels in group:
            batch = {"input_ids": torch.tensor([ids], device=device), "labels": torch.tensor([labels], device=device)}
            loss = model(**batch, num_items_in_batch=n_target).loss
            loss.backward()
            total += loss.detach().double()
    return total.item(), {n: p.grad for n, p in model.named_parameters() if p.requires_grad}


def run_case(case: dict, sp, world: int, device) -> dict:
    import torch.distributed as dist
    from deepspeed.utils import safe_get_full_grad
    from zerotune.launcher.ds_config import render
    from zerotune.training.run import step as steps
    recipe = recipe_for(case, sp.size)
    ds_config = render(recipe, world)                     # what the launcher writes
    assert ds_config["sequence_parallel_size"] == sp.size
    engine = build_engine(recipe, ds_config, sp)
    values = trainable_values(engine.module)
    micro, held = micro_batches(case, seed=100 + sp.dp_rank)
    counts = steps.step_counts(micro, engine.device, copies=sp.size)
    n_target, real, padded = counts.tolist()
    shards = [sp.shard(b, engine.device) for b in micro]
    if case.get("no_exchange"):                # negative control: each rank attends within its shard only
        shards = [{k: v for k, v in b.items() if k != "sp_segments"} for b in shards]
    calls_before = sp.attention.calls
    loss = steps.forward_backward(engine, shards, n_target, world)
    dist.all_reduce(loss)
    grads = {n: safe_get_full_grad(p) for n, p in engine.module.named_parameters() if p.requires_grad}
    # the reference sees the whole global batch: every data-parallel group's micro-batches
    everything = [None] * world
    dist.all_gather_object(everything, held)
    all_held = [g for r in range(0, world, sp.size) for g in everything[r]]
    ref_loss, ref_grads = reference(case, all_held, n_target, device, values)
    if os.environ.get("ZT_DEBUG"):
        for n, g in ref_grads.items():
            print("GRAD", n, (grads[n].float().norm() / g.float().norm()).item(),
                  ((grads[n].float() - g.float()).norm() / g.float().norm()).item(), flush=True)
    worst = max(((grads[n].float() - g.float()).norm() / g.float().norm().clamp(min=1e-12)).item()
                for n, g in ref_grads.items())
    engine.destroy()
    return {"ulysses_calls": sp.attention.calls - calls_before, "loss": loss.item(), "ref_loss": ref_loss, "worst_grad_rel": worst, "n_grads": len(ref_grads),
            "n_target": n_target, "real": real, "padded": padded}


def main(out_dir: str, cases_json: str) -> None:
    import deepspeed
    import torch.distributed as dist
    from zerotune.training.long_context import sequence_parallel
    backend = os.environ.get("ZT_BACKEND", "gloo")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if backend == "nccl" else torch.device("cpu")
    if backend == "nccl":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    deepspeed.init_distributed(dist_backend=backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    cases = json.loads(cases_json)
    groups, results = {}, {}
    for c in cases:                            # SP groups of each size once (every rank, same order)
        n = c.get("sp", 2)
        if n not in groups:
            groups[n] = sequence_parallel.init(recipe_for(c, n))
        results[c["name"]] = run_case(c, groups[n], world, device)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
