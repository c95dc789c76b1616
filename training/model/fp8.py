"""train.precision on the rank: the decoder's linear layers in FP8 through torchao's float8 training.

    model = fp8.apply(model, recipe, stage)   # in build_model, last: after compile and the method

Recipe "tensorwise" (one dynamic scale per tensor, cuBLAS's FP8 GEMM): torchao's fastest, and the one
its published Llama numbers use; rowwise scales every row (more accurate, a CUTLASS kernel that is
slower at fine-tuning sizes). Full fine-tune: every nn.Linear inside the decoder layers becomes a
Float8Linear holding the same bf16 parameter (the optimizer's master copy is unchanged; only the
GEMMs cast to e4m3/e5m2). LoRA: the frozen base linears (peft's LoraLayer.base_layer, and frozen
linears LoRA does not target) become FrozenFloat8Linear, which keeps its weight cast to FP8
(tensorwise) and whose backward computes only the input's gradient (torchao's casts the weight
every call and always computes the weight's gradient too); lora_A / lora_B stay bf16. Never
converted: lm_head, embeddings, experts of a mixture (few tokens per GEMM), and layers whose dims
are not multiples of 16 (FP8 GEMM's requirement). Converting after torch.compile is fine:
Module.compile traces at the first call. Where it may run is core/precision.py's rule.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys

import torch

from zerotune.core.precision import choose, tokens_per_micro_batch

RECIPE = "tensorwise"
SKIP_NAMES = ("lm_head", "embed_tokens", "score")     # the head and embeddings stay bf16
SKIP_PARTS = ("lora_", "modules_to_save", ".experts.")


def has_torchao() -> bool:
    return importlib.util.find_spec("torchao") is not None


def capability() -> tuple[int, int] | None:
    """This rank's GPU compute capability; None without CUDA."""
    return tuple(torch.cuda.get_device_capability()) if torch.cuda.is_available() else None


def decide(recipe, stage: int, hidden: int | None) -> tuple[str, str]:
    """(bf16 | fp8, why) on this rank: the launcher resolved auto for local GPUs; a Slurm job's
    auto (and any recipe that did not come through the launcher) is decided here."""
    t = recipe.train
    mbs = t.micro_batch_size if isinstance(t.micro_batch_size, int) else 1
    return choose(t.precision, method=recipe.method.kind, zero=stage, dtype=recipe.model.dtype,
                  capability=capability(), has_torchao=has_torchao(), hidden=hidden,
                  tokens=tokens_per_micro_batch(mbs, recipe.data.max_len, recipe.distributed.sequence_parallel))


def converts(module: torch.nn.Module, fqn: str) -> bool:
    """The module filter: an nn.Linear inside the decoder layers, not the head, an embedding, an
    adapter or an expert, with both dims multiples of 16."""
    if not isinstance(module, torch.nn.Linear):
        return False
    dotted = f".{fqn}."
    if ".layers." not in dotted or any(part in dotted for part in SKIP_PARTS):
        return False
    if fqn.rsplit(".", 1)[-1] in SKIP_NAMES:
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def convert(model: torch.nn.Module, emulate: bool = False, recipe: str = RECIPE) -> list[str]:
    """Swap the linears `converts` accepts; returns their names. A frozen weight gets
    FrozenFloat8Linear. emulate: torchao's CPU emulation of the FP8 GEMM (tests); recipe:
    torchao's tensorwise or rowwise (benchmarks/fp8_gemm.py compares them)."""
    from torchao.float8 import Float8LinearConfig
    from torchao.float8.float8_linear_utils import swap_linear_layers
    from torchao.float8.float8_linear import Float8Linear
    from zerotune.training.model.fp8_frozen import FrozenFloat8Linear
    try:   # torchao's workaround for a Triton FP8 store miscompile, as convert_to_float8_training applies it
        from torchao.float8._inductor_patch import _patch_inductor_min_max_codegen
        _patch_inductor_min_max_codegen()
    except ImportError:
        pass
    config = dataclasses.replace(Float8LinearConfig.from_recipe_name(recipe), emulate=emulate)
    names: list[str] = []

    def swap(linear):
        cls = Float8Linear if linear.weight.requires_grad else FrozenFloat8Linear
        return cls.from_float(linear, config=config)

    def keep(module, fqn):
        ok = converts(module, fqn)
        if ok:
            names.append(fqn)
        return ok
    swap_linear_layers(model, swap, module_filter_fn=keep)
    return names


def apply(model, recipe, stage: int):
    """train.precision on `model` (already wrapped by its method): FP8 linears when chosen. Rank 0
    prints the choice when it is fp8 or was decided here (auto: a Slurm job); the model keeps it
    as model._zerotune_precision."""
    value, why = decide(recipe, stage, getattr(model.config, "hidden_size", None))
    names = convert(model) if value == "fp8" else []
    model._zerotune_precision = value
    if int(os.environ.get("RANK", "0")) == 0 and (value == "fp8" or recipe.train.precision == "auto"):
        more = f", {len(names)} linear layers in FP8 ({RECIPE})" if value == "fp8" else ""
        print(f"zerotune: precision {value} ({why}{more})", file=sys.stderr, flush=True)
    return model
