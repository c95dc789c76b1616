"""Model families: what zerotune knows of each, by config.json's `model_type`, without torch.

    ATTENTION[model_type]     the attention kernels transformers implements for the family's
                              *ForCausalLM (tests/test_families.py checks them against the classes'
                              _supports_sdpa / _supports_flash_attn / _supports_flex_attn)
    MOE_BLOCKS[model_type]    the sparse mixture-of-experts block class: a ZeRO-3 leaf module
                              (deepspeed.utils.set_z3_leaf_modules: its experts are gathered whole,
                              so a rank whose tokens reach no expert does not skip a gather and hang).
                              A mixture of experts (EXPERT_KEYS in config.json) missing here is
                              refused at ZeRO-3 before torchrun (zero3_problem).

`model.attn_implementation: auto` (the default) is chosen here (choose_attention) where the GPUs
are: by the launcher for a local run (recorded in RUN_DIR/recipe.yaml), by each rank for a Slurm
job (training/model/build.py; the login node has no GPU): flash_attention_2 when the family
supports it, the flash_attn package is installed and a CUDA GPU is visible; else sdpa when the
family supports it; else eager (Gemma 2: its attention logit soft-capping is in eager and flash
attention only, not in sdpa). An explicit kernel the family does not support is one line before
any rank starts.
"""
from __future__ import annotations

import importlib.util
from typing import Optional

from .errors import RecipeError

_ALL = ("flash_attention_2", "sdpa", "flex_attention", "eager")
_NO_FLEX = ("flash_attention_2", "sdpa", "eager")
_NO_SDPA = ("flash_attention_2", "flex_attention", "eager")

ATTENTION: dict[str, tuple[str, ...]] = {
    "llama": _ALL, "mistral": _ALL, "qwen2": _ALL, "qwen3": _ALL, "phi3": _ALL, "gemma": _ALL,
    "gemma2": _NO_SDPA, "gemma3_text": _ALL, "mixtral": _ALL, "qwen2_moe": _ALL, "qwen3_moe": _ALL,
    "olmoe": _NO_FLEX, "olmo2": _ALL, "granite": _ALL, "starcoder2": _ALL, "phi": _ALL, "gpt2": _NO_FLEX,
}
MOE_BLOCKS: dict[str, str] = {
    "mixtral": "MixtralSparseMoeBlock", "qwen2_moe": "Qwen2MoeSparseMoeBlock",
    "qwen3_moe": "Qwen3MoeSparseMoeBlock", "olmoe": "OlmoeSparseMoeBlock",
}


def model_type(config: dict) -> str:
    text = config.get("text_config") or {}
    return str(config.get("model_type") or text.get("model_type") or "")


def _name(config: dict) -> str:
    arch = (config.get("architectures") or [None])[0]
    return f"{arch} ({model_type(config)})" if arch else model_type(config) or "this model"


def flash_attn_usable(cuda: bool) -> bool:
    """flash_attention_2 runs: a CUDA GPU is visible and flash_attn is installed (not imported)."""
    return cuda and importlib.util.find_spec("flash_attn") is not None


def choose_attention(config: dict, setting: str, cuda: bool) -> str:
    """The kernel a run uses: `setting` checked against the family, or, for auto, the fastest it
    supports here. An unknown family: auto stays auto (transformers' own default on the rank:
    sdpa where the class has it, else eager) and explicit values go through unchecked."""
    kind = model_type(config)
    supported = ATTENTION.get(kind)
    if setting != "auto":
        if supported is not None and setting not in supported:
            raise RecipeError(f"model.attn_implementation: {setting} is not supported by {_name(config)}; "
                              f"use auto or one of {', '.join(supported)}")
        return setting
    if supported is None:
        return "auto"
    if "flash_attention_2" in supported and flash_attn_usable(cuda):
        return "flash_attention_2"
    return "sdpa" if "sdpa" in supported else "eager"


# config.json keys that count a mixture of experts' routed experts (Mixtral, Granite-MoE, Phi-MoE,
# GPT-OSS: num_local_experts; Qwen-MoE, OLMoE, Jamba: num_experts; DeepSeek V2/V3: n_routed_experts;
# DBRX: ffn_config.moe_num_experts)
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")


def moe_block(config: dict) -> Optional[str]:
    """The class name of the family's sparse MoE block (a ZeRO-3 leaf), None for dense models."""
    return MOE_BLOCKS.get(model_type(config))


def experts(config: dict) -> int:
    """Routed experts per MoE layer, read from config.json (1: a dense model)."""
    c = config.get("text_config") or config
    for where in (c, c.get("ffn_config") or {}):
        for key in EXPERT_KEYS:
            if isinstance(where.get(key), int) and where[key] > 1:
                return where[key]
    return 1


def is_moe(config: dict) -> bool:
    return moe_block(config) is not None or experts(config) > 1


def zero3_problem(config: dict) -> Optional[str]:
    """Why ZeRO-3 cannot train this model, or None: a mixture of experts whose sparse block zerotune
    does not know (no MOE_BLOCKS entry) gets no ZeRO-3 leaf module, and ranks whose tokens reach
    no expert skip that expert's gather while their peers wait in it: the job hangs."""
    if not is_moe(config) or moe_block(config) is not None:
        return None
    return (f"distributed.zero: 3 cannot train {_name(config)}: a mixture of experts ({experts(config)} experts) "
            f"whose sparse block zerotune does not know (core/families.py MOE_BLOCKS: {', '.join(MOE_BLOCKS)}); "
            f"its ranks would hang on the experts' gathers: use distributed.zero 0, 1 or 2")
