"""Mixture-of-experts models (Mixtral, Qwen2/3-MoE, OLMoE, ...): what training them needs.

- Under ZeRO-3 the family's sparse MoE block (core/families.py: MOE_BLOCKS) is a leaf module
  (deepspeed.utils.set_z3_leaf_modules): its parameters, every expert's, are gathered whole when
  the block runs. Without it a rank whose tokens reach no expert skips that expert's gather while
  its peers wait in theirs, and the ranks hang: a mixture of experts without a known block is
  refused at ZeRO-3 (by the launcher before torchrun: core/families.py zero3_problem; here too).
- Sequence parallelism is refused for a mixture of experts (core/long_context.py moe_problem): its
  sharded forward computes the LM loss only, without the router's loss.
- The router's load-balancing loss is on (config.output_router_logits): transformers adds
  router_aux_loss_coef x aux_loss to the loss when labels are given; training/run/step.py weighs
  it to one mean over micro-batches and ranks, keeps it out of train/loss and logs it as
  train/router_aux_loss.
"""
from __future__ import annotations

from zerotune.core.errors import RecipeError
from zerotune.core.families import is_moe, moe_block, zero3_problem


def lora_targets(model, setting):
    """LoRA's target_modules: all-linear on a mixture of experts -> the linear layers outside its
    MoE blocks (attention, dense MLP layers): the experts (fused 3-D weights in transformers 5,
    which peft would wrap per parameter), shared experts and the router stay frozen."""
    name = moe_block(model.config.to_dict()) if model is not None and setting == "all-linear" else None
    if name is None:
        return setting
    import torch
    inside = {id(m) for block in model.modules() if type(block).__name__ == name for m in block.modules()}
    return [n for n, m in model.named_modules()   # full names: a dense layer's gate_proj is not a shared expert's
            if isinstance(m, torch.nn.Linear) and id(m) not in inside and not n.endswith("lm_head")]


def prepare(model, zero_stage: int) -> list[str]:
    """Router loss on; ZeRO-3 leaf modules set. Returns the leaf classes' names ([] for dense)."""
    config = model.config
    if not is_moe(config.to_dict()):
        return []
    if hasattr(config, "output_router_logits"):
        config.output_router_logits = True
    name = moe_block(config.to_dict())
    classes = list({type(m) for m in model.modules() if type(m).__name__ == name}) if name else []
    if zero_stage == 3:
        if not classes:   # the launcher refuses an unknown family (core/families.py zero3_problem); a renamed class too
            raise RecipeError(zero3_problem(config.to_dict()) or f"distributed.zero: 3: {type(model).__name__} has no "
                              f"{name} module (core/families.py MOE_BLOCKS) to make a ZeRO-3 leaf; its ranks would "
                              "hang on the experts' gathers: use distributed.zero 0, 1 or 2")
        from deepspeed.utils import set_z3_leaf_modules
        set_z3_leaf_modules(model, classes)
    return [c.__name__ for c in classes]
