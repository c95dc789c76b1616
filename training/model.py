"""The model a recipe asks for: HF weights, dtype, attention kernel, gradient checkpointing.

For ZeRO-3, transformers builds the model under `deepspeed.zero.Init` (through
HfDeepSpeedConfig), so every rank only ever holds its shard of a model larger than one GPU.
"""
from __future__ import annotations

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations import HfDeepSpeedConfig

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}

_hf_ds_config = None  # must stay alive while the model is built (transformers holds a weak reference)


def load_tokenizer(recipe):
    tok = AutoTokenizer.from_pretrained(recipe.model.tokenizer or recipe.model.path,
                                        trust_remote_code=recipe.model.trust_remote_code)
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok


def build_model(recipe, ds_config: dict):
    global _hf_ds_config
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    _hf_ds_config = HfDeepSpeedConfig(ds_config) if stage == 3 else None
    # Import the model class before zero.Init patches tensor constructors: importing
    # modelling code (and torch._dynamo) under the patch fails on recent torch.
    import torch._dynamo  # noqa: F401
    config = AutoConfig.from_pretrained(recipe.model.path, trust_remote_code=recipe.model.trust_remote_code)
    try:
        AutoModelForCausalLM._model_mapping[type(config)]
    except KeyError:
        pass  # remote-code models resolve their class in from_pretrained
    if recipe.method.kind != "full":
        raise NotImplementedError(f"method.kind: {recipe.method.kind!r} is not implemented yet")
    model = AutoModelForCausalLM.from_pretrained(
        recipe.model.path,
        dtype=DTYPES[recipe.model.dtype],
        attn_implementation=recipe.model.attn_implementation,
        trust_remote_code=recipe.model.trust_remote_code,
    )
    if recipe.train.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def count_parameters(model) -> tuple[int, int]:
    """(trainable, total), counting ZeRO-3 partitioned parameters at full size."""
    def numel(p):
        return getattr(p, "ds_numel", p.numel())
    total = sum(numel(p) for p in model.parameters())
    trainable = sum(numel(p) for p in model.parameters() if p.requires_grad)
    return trainable, total
