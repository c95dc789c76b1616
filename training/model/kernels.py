"""model.kernels: liger-kernel's fused Triton kernels on the model instance (CUDA only).

    liger = kernels.apply(model, recipe)   # in build_model, before checkpointing and PEFT

`liger` applies, through liger's own `_apply_liger_kernel_to_instance`, its RMSNorm, SwiGLU MLP
and RoPE (forwards rebound on this instance's modules; RoPE is a module-level function of the
family's modelling file). Liger's fused linear cross entropy is NOT taken through its model
forward: zerotune's loss path stays (num_items_in_batch, sequence parallelism, packed rows), and
training/model/loss.py `enable(model, liger=True)` calls liger's FLCE from the LM-head module's
forward. Only at ZeRO 0-2: liger reads `lm_head.weight` directly and computes its gradient in the
forward, which under ZeRO-3 (a partitioned weight, DeepSpeed's reduce hooks) zerotune's own
chunked loss does right; there the loss stays train.fused_loss's.

PEFT: applied to the base before peft wraps it; the SwiGLU forward calls gate/up/down_proj as
modules, so LoRA's wrappers (and bitsandbytes' 4-bit linears) still run. torch.compile is not
combined with it (train.compile auto is off with liger; it fuses the same norms/activations).
"""
from __future__ import annotations

import importlib.util

import torch

from zerotune.core.memory import LIGER_FAMILIES
from zerotune.core.recipe import RecipeError


def installed() -> bool:
    return importlib.util.find_spec("liger_kernel") is not None


def wanted(setting: str, model_type: str) -> bool:
    """model.kernels on this rank: liger / none as given (liger needs the package, a CUDA GPU and a
    supported family: a one-line error otherwise); auto: liger when all three hold."""
    if setting == "none":
        return False
    ok_family = model_type in LIGER_FAMILIES
    if setting == "auto":
        return ok_family and torch.cuda.is_available() and installed()
    if not installed():
        raise RecipeError("model.kernels: liger needs the liger-kernel package (pip install 'zerotune[gpu]')")
    if not torch.cuda.is_available():
        raise RecipeError("model.kernels: liger needs a CUDA GPU (Triton kernels); use auto or none")
    if not ok_family:
        raise RecipeError(f"model.kernels: liger supports model_type {', '.join(LIGER_FAMILIES)} here "
                          f"(this model: {model_type}); use auto or none")
    return True


def apply(model, recipe) -> bool:
    """Liger's RMSNorm, SwiGLU and RoPE on `model` when model.kernels wants them; True if applied."""
    model_type = getattr(model.config, "model_type", "")
    if not wanted(recipe.model.kernels, model_type):
        return False
    from liger_kernel.transformers.monkey_patch import _apply_liger_kernel_to_instance
    _apply_liger_kernel_to_instance(model, rope=True, rms_norm=True, swiglu=True, cross_entropy=False,
                                    fused_linear_cross_entropy=False)
    model._zerotune_kernels = "liger"
    return True


def fused_linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                               ignore_index: int) -> torch.Tensor:
    """Liger's FLCE, summed over the tokens with a label (the caller divides by n_target)."""
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy
    out = liger_fused_linear_cross_entropy(hidden, weight, labels, ignore_index=ignore_index, reduction="sum")
    return out[0] if isinstance(out, tuple) else out
