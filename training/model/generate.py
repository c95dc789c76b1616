"""`zerotune generate`: load a model (or a run's result) with zero, one or several adapters,
apply the chat template and generate; with several adapters, switch between them by name.

    zerotune generate runs/demo --prompt "Tell me a story"              # a full run: RUN_DIR/final
    zerotune generate runs/lora --prompt "..."                          # a PEFT run: base + RUN_DIR/final
    zerotune generate meta-llama/Llama-3.1-8B-Instruct \\
        --adapter math=adapters/math --adapter code=adapters/code --base --prompt "..."
"""
from __future__ import annotations

from pathlib import Path
from zerotune.core.errors import UserError
from zerotune.core.layout import FINAL_DIR, RECIPE_FILE

HELP = "generate text from a model or run, with one or several adapters switched by name"
DESCRIPTION = """Generate from MODEL_OR_RUN: a run folder (its final model, or its base plus its final
adapter, with the recipe's chat template), or a Hugging Face model folder / hub id.
--adapter NAME=DIR (repeatable) loads PEFT adapter folders (or zerotune bottleneck adapters);
every prompt is answered by each adapter in turn (--use picks some), and by the base too with --base.

  zerotune generate runs/demo --prompt "Write a story about a cat"
  zerotune generate examples/stories260K --chat-template alpaca \\
      --adapter a=runs/lora/final --adapter b=runs/ia3/final --base --prompt "Hello\""""


class GenerateError(UserError, RuntimeError):
    """A run folder or model that generate cannot use."""


def add_arguments(p) -> None:
    p.add_argument("model", metavar="MODEL_OR_RUN", help="run folder, model folder or hub id")
    p.add_argument("--adapter", action="append", default=[], metavar="[NAME=]DIR",
                   help="adapter folder to load (repeatable); NAME defaults to the folder name")
    p.add_argument("--use", action="append", default=[], metavar="NAME",
                   help="answer with these adapters only (repeatable; default: all loaded)")
    p.add_argument("--base", action="store_true", help="also answer with the base model (adapters off)")
    p.add_argument("--prompt", action="append", required=True, help="user message (repeatable)")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--chat-template", default=None,
                   help="built-in name (chatml, llama3, alpaca, plain) or Jinja string; overrides the model's")
    p.add_argument("--raw", action="store_true", help="no chat template: feed the prompt text as is")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) decodes greedily")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=["bf16", "fp16", "fp32"], default=None,
                   help="weights dtype (default: the run's, else fp32 on CPU and bf16 on GPU)")


# ----------------------------------------------------------------------------- what to load
def parse_adapters(specs: list[str]) -> list[tuple[str, Path]]:
    out, seen = [], set()
    for spec in specs:
        name, _, path = spec.rpartition("=") if "=" in spec else ("", "", spec)
        path = Path(path)
        name = name or path.name
        if not path.is_dir():
            raise GenerateError(f"--adapter {spec}: {path} is not a folder")
        if name in seen:
            raise GenerateError(f"--adapter {spec}: the name {name!r} is used twice (write NAME=DIR)")
        seen.add(name)
        out.append((name, path))
    return out


def check_model_target(target: str) -> None:
    """MODEL_OR_RUN that is not a run folder: a model folder, or a hub id in the cache or on the hub
    (with HF_HUB_OFFLINE=1 only the cache); one line otherwise, before any model code runs."""
    from zerotune.core.errors import RecipeError
    from zerotune.core.io import hub_file, looks_like_hub_id
    path = Path(target).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise GenerateError(f"{target}: neither a run folder (no {RECIPE_FILE}) nor a model folder "
                                "(no config.json)")
        return
    if path.exists():
        raise GenerateError(f"{target}: is a file, not a run folder, a model folder or a hub id")
    if not looks_like_hub_id(target):
        raise GenerateError(f"{target}: does not exist (not a run folder, a model folder or a hub id)")
    try:
        hub_file(target, "config.json")
    except RecipeError as e:
        raise GenerateError(f"{target}: no such folder, and no model of that name could be fetched from the hub "
                            f"({e})") from None


def resolve(target: str, adapter_specs: list[str]):
    """(base model path, [(name, adapter dir)], chat template or None, recipe or None)."""
    adapters = parse_adapters(adapter_specs)
    run = Path(target).expanduser()
    if not (run / RECIPE_FILE).is_file():
        check_model_target(target)
        return target, adapters, None, None
    from zerotune.core.recipe_load import load_run_recipe
    recipe = load_run_recipe(run)
    final = run / FINAL_DIR
    if not final.is_dir():
        raise GenerateError(f"{run}: no final/ folder (the run has not finished; "
                            f"`zerotune export {run} --out DIR` writes one from a checkpoint)")
    if recipe.method.kind == "full":
        return str(final), adapters, recipe.model.chat_template, recipe
    if recipe.name in {n for n, _ in adapters}:
        raise GenerateError(f"--adapter: the name {recipe.name!r} is the run's own adapter")
    return recipe.model.path, [(recipe.name, final), *adapters], recipe.model.chat_template, recipe


def load(target: str, adapter_specs: list[str], dtype_name: str | None):
    """The model with its adapters loaded, the tokenizer, the chat template, the adapter kind."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from zerotune.training.model import adapters as bottleneck
    from zerotune.training.model.build import DTYPES, keep_4bit_cpu_layout, quantization_config
    base_path, adapters, template, recipe = resolve(target, adapter_specs)
    dtype = DTYPES[dtype_name or (recipe.model.dtype if recipe else ("bf16" if torch.cuda.is_available() else "fp32"))]
    quant = quantization_config(recipe) if recipe is not None else None
    model = AutoModelForCausalLM.from_pretrained(
        base_path, dtype=dtype, quantization_config=quant,
        device_map="auto" if torch.cuda.is_available() else None,
        trust_remote_code=bool(recipe and recipe.model.trust_remote_code))
    keep_4bit_cpu_layout(model)
    # the tokenizer: the first adapter folder's (it carries the run's chat template), else the model's
    tok_path = next((str(p) for _, p in adapters if (p / "tokenizer_config.json").is_file()), base_path)
    tokenizer = AutoTokenizer.from_pretrained(tok_path)
    kinds = {"bottleneck" if bottleneck.is_adapter_folder(p) else "peft" for _, p in adapters}
    if len(kinds) > 1:
        raise GenerateError("--adapter: bottleneck adapters and PEFT adapters cannot be loaded together")
    kind = kinds.pop() if kinds else None
    for i, (name, path) in enumerate(adapters):
        if kind == "bottleneck":
            bottleneck.load_adapter(model, path, name=name)
        elif not (path / "adapter_config.json").is_file():
            raise GenerateError(f"--adapter {name}: {path} holds no adapter_config.json (not a PEFT adapter)")
        elif i == 0:
            from peft import PeftModel
            model = PeftModel.from_pretrained(model, str(path), adapter_name=name)
        else:
            try:
                model.load_adapter(str(path), adapter_name=name)
            except ValueError as e:  # peft holds adapters of one type together (e.g. LoRA with LoRA)
                raise GenerateError(f"--adapter {name}: {e}") from None
    return model.eval(), tokenizer, template, kind, [n for n, _ in adapters]


# ----------------------------------------------------------------------------- generating
def switch(model, kind: str | None, name: str | None):
    """Make adapter `name` the active one (None: the base alone); returns a context manager."""
    import contextlib

    from zerotune.training.model import adapters as bottleneck
    if kind == "bottleneck":
        bottleneck.set_active(model, name)
        return contextlib.nullcontext()
    if kind == "peft":
        if name is None:
            return model.disable_adapter()
        model.set_adapter(name)
    return contextlib.nullcontext()


def prompt_ids(tokenizer, template: str | None, prompt: str, system: str | None):
    if template is None:
        return tokenizer(prompt, return_tensors="pt")["input_ids"]
    from zerotune.training.data.tokenize import render
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
    text = render(tokenizer, template, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"]


def generate(model, tokenizer, ids, max_new_tokens: int, temperature: float, top_p: float) -> str:
    import torch
    ids = ids.to(next(model.parameters()).device)
    sample = temperature > 0
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                             do_sample=sample, temperature=temperature if sample else None,
                             top_p=top_p if sample else None, top_k=None,
                             pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)


def run(args) -> int:
    resolve(args.model, args.adapter)   # what to load exists: one line if not, before torch is imported
    import torch
    from transformers.utils import logging as hf_logging
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    from zerotune.training.data.tokenize import resolve_template
    model, tokenizer, template_name, kind, names = load(args.model, args.adapter, args.dtype)
    template = None
    if not args.raw:
        try:
            template = resolve_template(tokenizer, args.chat_template or template_name)
        except Exception as e:
            raise GenerateError(f"{e} (or pass --chat-template NAME, or --raw)") from None
    unknown = [u for u in args.use if u not in names]
    if unknown:
        raise GenerateError(f"--use {unknown[0]}: no adapter of that name (loaded: {', '.join(names) or 'none'})")
    answer_with = ([None] if args.base or not names else []) + (args.use or names)
    for prompt in args.prompt:
        ids = prompt_ids(tokenizer, template, prompt, args.system)
        for name in answer_with:
            torch.manual_seed(args.seed)
            with switch(model, kind, name):
                text = generate(model, tokenizer, ids, args.max_new_tokens, args.temperature, args.top_p)
            label = "base" if name is None else name
            print(f"[{label}] {text.strip()}" if len(answer_with) > 1 else text.strip(), flush=True)
    return 0
