"""Generations of `train.eval_prompts` at each evaluation, so a run shows what the model writes,
not only its loss. Every rank calls (ZeRO-3 needs all of them for each forward); rank 0 logs:

    pairs = eval_samples(engine, tokenizer, recipe)    # [(prompt, completion)], [] without prompts
    log.samples(step, pairs)                           # every tracker + metrics.jsonl

or, in pieces:

    texts = render_prompts(recipe, tokenizer, prompts)            # what the model sees
    completions = generate_samples(engine, tokenizer, texts, max_new_tokens=32)

Decoding is greedy (the same text for the same weights), one prompt at a time (no padding to
get wrong). No torch import at module level.
"""
from __future__ import annotations


def render_prompts(recipe, tokenizer, prompts: list[str]) -> list[str]:
    """The exact text the model sees for each prompt: with the recipe's chat template (a user
    turn, data.system_prompt as the system turn, and the generation prompt) when its data is
    chat-formatted, as training renders it; with raw-text data, BOS + the prompt."""
    sources = [*recipe.data.train, *recipe.data.eval]
    if all(s.format == "text" for s in sources):
        return [(tokenizer.bos_token or "") + p for p in prompts]
    from zerotune.training.data.tokenize import render, resolve_template
    template = resolve_template(tokenizer, recipe.model.chat_template)
    system = [{"role": "system", "content": recipe.data.system_prompt}] if recipe.data.system_prompt else []
    return [render(tokenizer, template, system + [{"role": "user", "content": p}], add_generation_prompt=True)
            for p in prompts]


def _unwrap(engine_or_model):
    """The model inside a DeepSpeed engine (its own module otherwise)."""
    if hasattr(engine_or_model, "zero_optimization_stage") and hasattr(engine_or_model, "module"):
        return engine_or_model.module
    return engine_or_model


def is_zero3(model) -> bool:
    """ZeRO-3 partitions parameters: each carries a ds_id."""
    return any(hasattr(p, "ds_id") for p in model.parameters())


def generate_samples(engine_or_model, tokenizer, prompts: list[str], max_new_tokens: int = 32, *,
                     synced_gpus: bool | None = None, device=None) -> list[str]:
    """Greedy completions of `prompts` (exact input text, e.g. from render_prompts).

    Every rank must call it with the same prompts. Under ZeRO-3 on several ranks a forward
    gathers each layer's parameters from every rank, so ranks must run the same number of
    forwards: synced_gpus (default: ZeRO-3 and world size > 1) keeps a rank that finished
    running forwards until every rank has. The model is put in eval mode and back."""
    import torch
    import torch.distributed as dist
    model = _unwrap(engine_or_model)
    if synced_gpus is None:
        synced_gpus = dist.is_initialized() and dist.get_world_size() > 1 and is_zero3(model)
    device = device or getattr(engine_or_model, "device", None) or next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.no_grad():
            for text in prompts:
                ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
                gen = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                                     max_length=None, do_sample=False, temperature=None, top_p=None, top_k=None,
                                     pad_token_id=pad, synced_gpus=synced_gpus, use_cache=True)
                out.append(tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip())
    finally:
        model.train(was_training)
    return out


def eval_samples(engine, tokenizer, recipe) -> list[tuple[str, str]]:
    """(prompt, completion) for each of train.eval_prompts; [] when there are none."""
    prompts = recipe.train.eval_prompts
    if not prompts:
        return []
    texts = render_prompts(recipe, tokenizer, prompts)
    return list(zip(prompts, generate_samples(engine, tokenizer, texts, recipe.train.eval_max_new_tokens)))
