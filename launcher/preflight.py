"""Everything `zerotune train` / `zerotune launch` can check in the launcher process, before
torchrun starts a rank or Slurm queues a job; each failure is one line naming the key, file or
folder, and nothing in RUN_DIR is touched. In order:

  model       a local folder holds config.json, tokenizer files and weights (*.safetensors,
              *.bin or an index); a hub id is in the local cache or downloadable (with
              HF_HUB_OFFLINE=1 only the cache is looked at: no retries)
  tokenizer   its vocabulary fits the model's embedding (config.json vocab_size); growing it by
              up to max(8, 1%) rows, e.g. a chat template's special tokens, is allowed for full
              fine-tunes (the loop resizes the embedding), by none for adapter methods
  data        every row of every source read, rendered and tokenized as the ranks will
              (training/data/validate.py)
  max_len     longer than the model's context (max_position_embeddings): a warning
  resume      checkpoint.resume names a complete checkpoint (see also prepare.py: a changed recipe)
  disk        output_dir has room for one checkpoint (see checkpoint_bytes)

Heavy imports (transformers, torch) happen inside the functions that need them.
"""
from __future__ import annotations

import shutil
import sys
from pathlib import Path

from zerotune.core.errors import RecipeError
from zerotune.core.io import GIB, hub_file, read_model_config
from zerotune.core.layout import MARKER, STATE_FILE
from zerotune.core.recipe import Recipe
from zerotune.core.recipe_load import path_candidates

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model",
                   "sentencepiece.bpe.model")
WEIGHT_PATTERNS = ("*.safetensors", "*.bin", "*.index.json")
VOCAB_GROWTH = 0.01          # a tokenizer may exceed the model's vocab_size by 1% ...
VOCAB_GROWTH_TOKENS = 8      # ... or 8 tokens, whichever is more (full fine-tunes only)
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def _size(n: float) -> str:
    return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.1f} MiB"


def _text_config(config: dict) -> dict:
    return config.get("text_config") or config


# ----------------------------------------------------------------------------- model
def _hub_check(key: str, value: str, filename: str, folder: Path) -> None:
    try:
        hub_file(value, filename)
    except RecipeError as e:
        tried = ", ".join(map(str, path_candidates(value, [folder, Path.cwd()])))
        raise RecipeError(f"{key}: {value!r} is not a local folder (tried {tried}) and could not be fetched "
                          f"from the hub ({e})") from None


def check_model(recipe: Recipe, folder: Path) -> dict:
    """model.path (and model.tokenizer): local folders complete, hub ids reachable. Returns config.json."""
    m = recipe.model
    path = Path(m.path)
    if not path.exists():
        _hub_check("model.path", m.path, "config.json", folder)
    elif not (path / "config.json").is_file():
        raise RecipeError(f"model.path: {m.path!r} is a folder without config.json (not a Hugging Face model)")
    tok_key, tok = ("model.tokenizer", m.tokenizer) if m.tokenizer else ("model.path", m.path)
    if not Path(tok).exists():
        if m.tokenizer:
            _hub_check(tok_key, tok, "tokenizer_config.json", folder)
    elif not m.trust_remote_code and not any((Path(tok) / f).is_file() for f in TOKENIZER_FILES) \
            and not any(Path(tok).glob("*.tiktoken")):
        hint = "" if m.tokenizer else "; set model.tokenizer to the folder or hub id of its tokenizer"
        raise RecipeError(f"{tok_key}: {tok!r} has no tokenizer files ({', '.join(TOKENIZER_FILES[:3])}, ...){hint}")
    if path.is_dir() and not any(any(path.glob(p)) for p in WEIGHT_PATTERNS):
        raise RecipeError(f"model.path: {m.path!r} has no weights (*.safetensors, *.bin or an index)")
    return read_model_config(m.path)


def check_vocab(recipe: Recipe, tokenizer, added: list[str], config: dict) -> None:
    """A tokenizer much larger than the embedding would silently grow the model (phi-3's 32k
    tokenizer on stories260K's 512 embeddings); a few template tokens are fine."""
    vocab = _text_config(config).get("vocab_size")
    n = len(tokenizer)
    if not vocab or n <= vocab:
        return
    allowed = max(VOCAB_GROWTH_TOKENS, int(VOCAB_GROWTH * vocab))
    m, peft = recipe.model, recipe.method.is_peft
    if peft and added and n - len(added) <= vocab:
        template = m.chat_template if len(m.chat_template or "") <= 40 else m.chat_template[:37] + "..."
        raise RecipeError(
            f"model.chat_template: {template!r} adds token(s) {added} that the model's vocabulary lacks; "
            f"method.kind {recipe.method.kind} cannot train new embeddings: use a template made of tokens the "
            "tokenizer has, or method.kind: full")
    if peft or n > vocab + allowed:
        key, tok = ("model.tokenizer", m.tokenizer) if m.tokenizer else ("model.path", m.path)
        fix = (f"method.kind {recipe.method.kind} cannot train new embeddings" if peft else
               f"up to {allowed} new tokens, e.g. a chat template's, are allowed")
        raise RecipeError(
            f"{key}: the tokenizer of {tok!r} has {n:,} tokens but the model has {vocab:,} embeddings (config.json "
            f"vocab_size): training would add {n - vocab:,} embedding rows; use the model's own tokenizer ({fix})")


# ----------------------------------------------------------------------------- data
def check_data(recipe: Recipe) -> None:
    """Every row of every source read and checked as the ranks will read it, without tokenizing
    (training/data/validate.py: well under a second for thousands of rows): a truncated file or
    a row missing its response is its one-line DataError here, not inside torchrun."""
    from zerotune.training.data.validate import validate_sources
    validate_sources(recipe)


def prepare_data(recipe: Recipe, tokenizer):
    """Tokenize every row on every core into the cache the job reads (training/data/prepare.py),
    so the ranks only load it; the errors only tokenizing finds (a turn that renders empty) and
    the warnings (a data.max_len that cuts every sample) come here, one line each. Returns the
    DataBundle: the planner reads its real lengths (launcher/data_size.py). Run after every
    check that needs no plan and writes nothing."""
    from zerotune.training.data.prepare import prepare_data as fill_cache
    bundle = fill_cache(recipe, tokenizer)
    if bundle.stats.get("cache") == "hit":   # a fresh build printed them itself
        for warning in bundle.stats.get("warnings", []):
            print(f"zerotune: warning: {warning}", file=sys.stderr, flush=True)
    return bundle


def warn_context(recipe: Recipe, config: dict) -> None:
    c = _text_config(config)
    key = next((k for k in CONTEXT_KEYS if isinstance(c.get(k), int)), None)
    if key and recipe.data.max_len > c[key]:
        print(f"zerotune: warning: data.max_len {recipe.data.max_len} is longer than the model's context "
              f"(config.json {key}: {c[key]}); positions past it were never trained", file=sys.stderr, flush=True)


def check_inputs(recipe: Recipe, folder: Path) -> tuple[dict, object]:
    """Model, tokenizer, vocabulary, data, context length, in that order. Returns config.json
    and the tokenizer (prepare_data tokenizes with it once everything else passed)."""
    config = check_model(recipe, folder)
    from zerotune.training.data.build import load_tokenizer, prepare_tokenizer
    tokenizer = load_tokenizer(recipe)
    _, added = prepare_tokenizer(recipe, tokenizer)
    check_vocab(recipe, tokenizer, added, config)
    check_data(recipe)
    warn_context(recipe, config)
    return config, tokenizer


# ----------------------------------------------------------------------------- resume, disk
def check_resume(recipe: Recipe) -> None:
    """checkpoint.resume, when a path, names a complete zerotune checkpoint."""
    r = recipe.checkpoint.resume
    if r in ("auto", "never"):
        return
    p = Path(r).expanduser()
    if not p.is_dir():
        raise RecipeError(f"checkpoint.resume: {r!r} is not a folder (use auto, never or a checkpoints/step-N folder)")
    if not (p / MARKER).is_file():
        raise RecipeError(f"checkpoint.resume: {r!r} is not a complete checkpoint (no {MARKER} file)")
    if not (p / STATE_FILE).is_file():
        raise RecipeError(f"checkpoint.resume: {r!r} is not a zerotune checkpoint (no {STATE_FILE})")


def checkpoint_bytes(recipe: Recipe, config: dict) -> tuple[float, str]:
    """Bytes of one checkpoint and how they were counted, from what DeepSpeed writes per trainable
    parameter: the fp32 master copy and AdamW's m and v in the optimizer shards (12 bytes; 6 with
    an 8-bit optimizer), plus, at ZeRO 0-2, the weights in the model states (2 bytes in bf16/fp16,
    4 in fp32; ZeRO-3's model states hold no weights). A full fine-tune: 12-16 bytes a parameter
    (measured: stories260K, fp32, ZeRO-3: 12.0). Adapter methods save only the adapter."""
    from zerotune.core.flops import num_params
    from zerotune.core.memory import lora_params, workload_of
    n = num_params(config)
    weight = 0 if recipe.zero_stage() == 3 else (4 if recipe.model.dtype == "fp32" else 2)
    per = (6 if "8bit" in recipe.train.optimizer else 12) + weight
    kind = recipe.method.kind
    if kind == "full":
        trainable, what = n, "parameters"
    elif kind in ("lora", "qlora"):
        trainable, what = lora_params(workload_of(recipe, 1)), "adapter parameters"
    else:
        trainable, what = max(1, n // 100), "adapter parameters (at most ~1% of the model)"
    return trainable * per, f"{trainable:,} {what} x {per} bytes"


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


def check_disk(recipe: Recipe, config: dict) -> None:
    folder = recipe.run_dir.absolute()
    while not folder.exists():
        folder = folder.parent
    need, how = checkpoint_bytes(recipe, config)
    free = free_bytes(folder)
    if free < need:
        raise RecipeError(f"output_dir: {folder} has {_size(free)} free but one checkpoint of this run needs about "
                          f"{_size(need)} ({how}); free some space or point output_dir at a larger disk")
