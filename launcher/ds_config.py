"""Fills a ds_configs/*.json template from the recipe, so RUN_DIR/ds_config.json holds no "auto".

The templates are ordinary DeepSpeed configs with "auto" where a value depends on the run
(the Hugging Face convention), so users can also hand them to HF Trainer as they are.
Communication buckets are DeepSpeed's defaults written out (reduce/allgather 5e8, prefetch 5e7):
on one H100, full 1B ZeRO-3 ran at 33,726 tok/s with them against 26,515 with HF's "auto"
formula (hidden^2 buckets), at the same peak memory (benchmarks/results-h100-2026-11-25.txt).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Optional

from zerotune.core.recipe import Recipe, RecipeError

TEMPLATES = Path(__file__).resolve().parent.parent / "ds_configs"
ONE_PROCESS_PERSISTENCE = 10 ** 12   # ZeRO-3 in one process: no parameter is ever partitioned away


def template_name(stage: int, offload_optimizer: bool, offload_params: bool) -> str:
    if stage == 3 and offload_params:
        return "zero3_offload_all.json"
    if stage == 3 and offload_optimizer:
        return "zero3_offload_optimizer.json"
    return f"zero{stage}.json"


def read_hidden_size(model_path: str) -> Optional[int]:
    """hidden_size from a local model folder's config.json (None when not local)."""
    cfg = Path(model_path) / "config.json"
    if cfg.is_file():
        c = json.loads(cfg.read_text())
        c = c.get("text_config", c)
        return c.get("hidden_size") or c.get("d_model") or c.get("n_embd")
    return None


def render(recipe: Recipe, world_size: int, stage: Optional[int] = None,
           hidden_size: Optional[int] = None) -> dict[str, Any]:
    """The DeepSpeed config for this recipe on `world_size` processes. With sequence parallelism
    (N ranks share a sequence) the batch is counted over world / N replicas, and
    "sequence_parallel_size" tells DeepSpeed's batch check so (training/long_context/sequence_parallel.py)."""
    stage = recipe.zero_stage() if stage is None else stage
    d, t = recipe.distributed, recipe.train
    cfg = json.loads((TEMPLATES / template_name(stage, d.offload_optimizer, d.offload_params)).read_text())
    replicas = d.replicas(world_size)
    gas = t.accumulation(replicas)
    hidden = hidden_size or read_hidden_size(recipe.model.path)

    zero = cfg["zero_optimization"]
    if d.offload_optimizer and stage in (1, 2):
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    values = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": gas,
        "train_batch_size": t.micro_batch_size * gas * replicas,
        "gradient_clipping": t.max_grad_norm,
    }
    cfg.update({k: v for k, v in values.items() if k in cfg})
    if d.sequence_parallel > 1:
        cfg["sequence_parallel_size"] = d.sequence_parallel
    cfg["bf16"]["enabled"] = recipe.model.dtype == "bf16"
    cfg["fp16"]["enabled"] = recipe.model.dtype == "fp16"
    if t.optimizer == "adamw":
        cfg["optimizer"]["params"] = {"lr": t.lr, "betas": list(t.betas), "eps": t.eps,
                                      "weight_decay": t.weight_decay}
    else:  # bitsandbytes optimizers are built in training/run/engine.py and handed to DeepSpeed
        cfg.pop("optimizer")
    if zero.get("stage3_param_persistence_threshold") == "auto":
        # parameters smaller than this stay whole on every rank (norms, biases): HF's 10 x hidden
        zero["stage3_param_persistence_threshold"] = 10 * hidden if hidden else 100_000
        if world_size == 1 and not d.offload_params and recipe.method.kind in ("full", "lora"):
            # One process: its partition is the whole model, so gathering a layer before each use
            # saves no memory and costs a copy and a hook per parameter. Every parameter stays whole
            # (DeepSpeed keeps its partition copy beside it: 2 bytes a parameter, core/memory.py). Not for
            # QLoRA's 4-bit weights, left to DeepSpeed's usual rule.
            zero["stage3_param_persistence_threshold"] = ONE_PROCESS_PERSISTENCE
    cfg["zero_allow_untested_optimizer"] = True
    left = find_auto(cfg)
    if left:
        raise RecipeError(f"ds_config: values left unfilled: {', '.join(left)}")
    return cfg


def find_auto(node: Any, path: str = "") -> list[str]:
    """Keys whose value is still "auto"."""
    if isinstance(node, dict):
        return [p for k, v in node.items() for p in find_auto(v, f"{path}.{k}" if path else k)]
    return [path] if node == "auto" else []


def write(recipe: Recipe, world_size: int, out: Path, stage: Optional[int] = None) -> dict[str, Any]:
    cfg = render(recipe, world_size, stage)
    out.write_text(json.dumps(cfg, indent=2) + "\n")
    return cfg
