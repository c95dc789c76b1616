"""deepspeed.initialize behind one small call: optimizer, LR schedule, ZeRO from ds_config."""
from __future__ import annotations

import math
import os
from datetime import timedelta

import deepspeed
import torch


def init_distributed(timeout_minutes: int) -> None:
    """The process group, with this rank's GPU made the current device first: NCCL groups are
    bound to LOCAL_RANK's GPU, and a collective before deepspeed.initialize (which sets the device
    itself) would otherwise put its tensors on cuda:0 ("Tensor found on device cuda:0 but backend
    constrained to cuda:3", seen on 4 GPUs in resolve_resume's broadcast)."""
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    deepspeed.init_distributed(timeout=timedelta(minutes=timeout_minutes))


def lr_lambda(train, total_steps: int):
    """Multiplier of train.lr at each step: linear warmup, then cosine / linear / constant."""
    warmup = train.warmup_steps if train.warmup_steps is not None else int(train.warmup_ratio * total_steps)
    floor = train.min_lr_ratio

    def f(step: int) -> float:
        if step < warmup:
            return (step + 1) / (warmup + 1)
        if train.scheduler == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        if train.scheduler == "linear":
            return floor + (1 - floor) * (1 - progress)
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def bnb_optimizer(train, params):
    import bitsandbytes as bnb
    cls = {"adamw_8bit": bnb.optim.AdamW8bit, "paged_adamw": bnb.optim.PagedAdamW,
           "paged_adamw_8bit": bnb.optim.PagedAdamW8bit}[train.optimizer]
    return cls(params, lr=train.lr, betas=train.betas, eps=train.eps, weight_decay=train.weight_decay)


def torch_fused_adamw(ds_config: dict, params):
    """On CUDA without optimizer offload: torch's fused AdamW (one kernel over all tensors, as
    fast as DeepSpeed's FusedAdam, and no C++ extension to compile at the first start). None
    where DeepSpeed's own optimizer is needed (offload: its CPU Adam) or on CPU."""
    zero = ds_config.get("zero_optimization", {})
    opt = ds_config.get("optimizer", {})
    if not torch.cuda.is_available() or opt.get("type") != "AdamW" or "offload_optimizer" in zero:
        return None
    p = opt["params"]
    return torch.optim.AdamW(params, lr=p["lr"], betas=tuple(p["betas"]), eps=p["eps"],
                             weight_decay=p["weight_decay"], fused=True)


def build_engine(model, ds_config: dict, train, total_steps: int):
    """Returns the DeepSpeed engine; its lr_scheduler steps once per optimizer step."""
    params = [p for p in model.parameters() if p.requires_grad]
    if "optimizer" in ds_config:
        optimizer = torch_fused_adamw(ds_config, params)
        if optimizer is not None:
            ds_config = {k: v for k, v in ds_config.items() if k != "optimizer"}
    else:
        optimizer = bnb_optimizer(train, params)
    schedule = lr_lambda(train, total_steps)
    engine, _, _, _ = deepspeed.initialize(
        model=model, model_parameters=params, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, schedule))
    return engine
