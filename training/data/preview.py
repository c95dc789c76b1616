"""`zerotune data preview|validate|prepare RECIPE`: what the model will be trained on.

preview prints a few samples as the model sees them, with the tokens that carry loss
highlighted (green in a terminal, [[...]] otherwise), then the statistics of the whole data
set: samples, tokens, which turns train, trained fraction, a length histogram, truncated /
dropped / skipped counts, packing efficiency and whether the tokenized cache was used.
validate checks every row (validate.py); prepare fills the cache on every core (prepare.py).
"""
from __future__ import annotations

import sys

HELP = "inspect, check or pre-tokenize a recipe's data (preview, validate, prepare)"
DESCRIPTION = ("Tokenize a recipe's data exactly as training will (and fill the tokenized cache), then\n"
               "print samples with the trained tokens marked and the data statistics.\n\n"
               "  zerotune data preview recipes/demo.yaml\n"
               "  zerotune data preview recipes/demo.yaml --n 5 --set data.max_len=2048 --set data.packing=true")
VALIDATE = ("Read every row of every source and check it (fields, turn order, tool calls, empty answers);\n"
            "--tokenize also renders and tokenizes each row as training will. Nothing is cached.\n\n"
            "  zerotune data validate recipes/demo.yaml --tokenize")
PREPARE = ("Tokenize the recipe's data on every core into the cache the training job reads, so that the\n"
           "job starts without tokenizing. A cache already there is only loaded.\n\n"
           "  zerotune data prepare recipes/llama3-8b-lora.yaml --workers 32")

GREEN, RESET = "\033[42;30m", "\033[0m"


def _recipe_args(p) -> None:
    p.add_argument("recipe", help="recipe YAML file")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key; VALUE is YAML (repeatable)")


def add_arguments(p) -> None:
    sub = p.add_subparsers(dest="data_command", metavar="ACTION", required=True)
    pv = sub.add_parser("preview", help="show samples with trained tokens marked, and data statistics",
                        description=DESCRIPTION)
    _recipe_args(pv)
    pv.add_argument("--n", type=int, default=3, help="samples to show (default 3)")
    pv.add_argument("--no-cache", action="store_true", help="tokenize without reading or writing the cache")
    pv.add_argument("--color", choices=["auto", "always", "never"], default="auto",
                    help="highlight trained tokens in colour (auto: when stdout is a terminal)")
    va = sub.add_parser("validate", help="check every row of every source (no GPU, nothing cached)",
                        description=VALIDATE)
    _recipe_args(va)
    va.add_argument("--tokenize", action="store_true", help="also render and tokenize every row (loads the tokenizer)")
    pr = sub.add_parser("prepare", help="tokenize on every core into the cache the job reads", description=PREPARE)
    _recipe_args(pr)
    pr.add_argument("--workers", type=int, default=None, help="worker processes (default: every core)")


def marked_text(tokenizer, ids, labels, color: bool) -> str:
    """Decode ids, wrapping runs of trained tokens in colour or [[...]]."""
    ids = [int(i) for i in ids]
    full = tokenizer.decode(ids)
    bounds, prev = [0], 0
    for k in range(1, len(ids) + 1):   # character end of each token in the decoded text
        part = tokenizer.decode(ids[:k])
        prev = len(part) if full.startswith(part) else prev
        bounds.append(prev)
    out, open_ = [], False
    on, off = (GREEN, RESET) if color else ("[[", "]]")
    for k in range(len(ids)):
        trained = int(labels[k]) != -100
        if trained != open_:
            out.append(on if trained else off)
            open_ = trained
        out.append(full[bounds[k]:bounds[k + 1]])
    if open_:
        out.append(off)
    return "".join(out)


def _pct(x) -> str:
    return f"{100 * x:.1f}%"


def _trains(s: dict) -> str:
    """Which tokens carry loss, in words (data.train_on, train_on_reasoning, train_on_prompt)."""
    if s.get("train_on_prompt"):
        return "every token but the first (data.train_on_prompt: true)"
    turns = "the last assistant turn of each chat" if s.get("train_on") == "last_assistant" else "every assistant turn"
    reasoning = "reasoning masked" if s.get("train_on_reasoning") is False else "reasoning included"
    return f"{turns} (tool calls included, tool results not; {reasoning}; a turn's loss_weight: 0 opts out)"


def format_stats(stats: dict, would_pack: float | None) -> list[str]:
    s = stats
    lines = [
        f"samples      {s['train_samples']:,} train / {s['eval_samples']:,} eval "
        f"({s['train_rows']:,} train rows{' after packing' if s['packing'] else ''})",
        f"tokens       {s['train_tokens']:,} train, {s['train_target_tokens']:,} trained "
        f"({_pct(s['trained_fraction'])} of tokens carry loss)",
    ]
    lines.append("trains       " + _trains(s))
    lines += [_source_line(src) for src in s["sources"]]
    lines.append(f"length       tokens per sample (max_len {s['max_len']}):")
    peak = max((c for _, _, c in s["length_histogram"]), default=1) or 1
    for lo, hi, c in s["length_histogram"]:
        lines.append(f"  {lo:>6}-{hi:<6} {c:>7,} {'#' * round(40 * c / peak)}")
    lines.append(f"filtered     truncated {s['truncated']:,}, dropped too long {s['dropped_too_long']:,}, "
                 f"dropped with no trained token {s['dropped_no_target']:,}, skipped bad rows {s['skipped_bad_rows']:,}")
    for src in s["sources"]:
        for ex in src.get("bad_examples", []):
            lines.append(f"  skipped    {ex}")
    for w in s.get("warnings", []):
        lines.append(f"warning      {w}")
    if s["packing"]:
        lines.append(f"packing      on: efficiency {_pct(s['packing_efficiency'])} "
                     f"({s['train_tokens']:,} tokens in {s['train_rows']:,} rows of {s['max_len']})")
    else:
        lines.append(f"packing      off (data.packing=true would fill rows of {s['max_len']} to {_pct(would_pack)})")
    if s.get("added_tokens"):
        lines.append(f"tokenizer    added special tokens {s['added_tokens']}: the model's embeddings are resized")
    if s["cache"] == "hit":
        lines.append(f"cache        hit: loaded in {s['load_seconds']:.2f} s instead of tokenizing "
                     f"({s['tokenize_seconds']:.2f} s) from {s['cache_path']}")
    elif s["cache"] == "miss":
        lines.append(f"cache        miss: tokenized in {s['tokenize_seconds']:.2f} s, saved to {s['cache_path']}")
    else:
        lines.append(f"cache        off: tokenized in {s['tokenize_seconds']:.2f} s")
    return lines


def run(args) -> int:
    if args.data_command == "validate":
        return run_validate(args)
    if args.data_command == "prepare":
        return run_prepare(args)
    return run_preview(args)


def _source_line(st: dict) -> str:
    line = (f"  source     {st['path']} ({st['format']}{', eval' if st.get('eval') else ''}): "
            f"{st['rows']:,} rows -> {st['samples']:,} samples")
    return line + (f", {st['bad_rows']:,} bad rows skipped" if st["bad_rows"] else "")


def run_validate(args) -> int:
    from zerotune.core.recipe_load import load_recipe

    from .validate import validate_sources
    recipe = load_recipe(args.recipe, args.set)
    tokenizer = None
    if args.tokenize:
        from zerotune.training.data.build import load_tokenizer
        tokenizer = load_tokenizer(recipe)
    report = validate_sources(recipe, tokenizer)
    print(f"data         {report['rows']:,} rows checked in {report['seconds']:.2f} s"
          f"{' (rendered and tokenized)' if tokenizer is not None else ''}: ok")
    print("\n".join([_source_line(st) for st in report["sources"]] + [f"warning      {w}" for w in report["warnings"]]))
    return 0


def run_prepare(args) -> int:
    from zerotune.core.recipe_load import load_recipe
    from zerotune.training.data.build import load_tokenizer

    from .prepare import prepare_data
    recipe = load_recipe(args.recipe, args.set)
    data = prepare_data(recipe, load_tokenizer(recipe), args.workers)
    s = data.stats
    if s["cache"] == "hit":
        print(f"cache        ready: {s['cache_path']} (tokenized earlier in {s['tokenize_seconds']:.2f} s)")
    else:
        print(f"cache        written: {s['cache_path']} ({s['workers']} workers, {s['tokenize_seconds']:.2f} s)")
    print("\n".join(_source_line(st) for st in s["sources"]))
    print(f"data         {data.summary()}")
    return 0


def run_preview(args) -> int:
    from zerotune.core.recipe_load import load_recipe
    from zerotune.training.data.build import load_tokenizer

    from .build import build_data, prepare_tokenizer
    from .samples import tokenize_source
    from .loader import pack_rows

    recipe = load_recipe(args.recipe, args.set)
    tokenizer = load_tokenizer(recipe)
    data = build_data(recipe, tokenizer, use_cache=not args.no_cache)
    template, _ = prepare_tokenizer(recipe, tokenizer)   # tokens already added: a no-op that returns the template
    color = args.color == "always" or (args.color == "auto" and sys.stdout.isatty())

    src = recipe.data.train[0]
    samples, _ = tokenize_source(src, tokenizer, template, recipe.data, limit=args.n)
    for k, (ids, labels) in enumerate(samples[: args.n], 1):
        trained = sum(1 for l in labels if l != -100)
        print(f"--- sample {k} of {src.path}: {len(ids)} tokens, {trained} trained")
        print(marked_text(tokenizer, ids, labels, color))
    if data.train.packed and len(data.train):
        row = data.train[0]
        n = int((row["position_ids"] == 0).sum())
        print(f"--- packed row 1: {n} samples, {len(row['input_ids'])} of {recipe.data.max_len} tokens")
    print("---")
    would = None
    if not recipe.data.packing:
        lengths = data.train.lengths()
        rows = len(pack_rows(lengths, recipe.data.max_len)[0]) - 1
        would = int(lengths.sum()) / (rows * recipe.data.max_len)
    print("\n".join(format_stats(data.stats, would)))
    return 0
