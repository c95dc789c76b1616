"""Data layer: sources -> conversations -> tokens + loss mask -> (packed) rows -> batches.

    from zerotune.training.data.build import build_data     # import the module you need: this file imports nothing
    data = build_data(recipe, tokenizer)       # on every rank; rank 0 tokenizes and caches
    data.train[i] -> {"input_ids", "labels"[, "position_ids"]}   (numpy int32 views)
    for batch in batches(data.train, ResumableSampler(len(data.train), rank, world, seed), mbs, pad_id): ...

The modules, in the order data flows through them:

    sources.py    files, folders, saved and hub datasets -> (where, row)
    formats.py    rows of each format -> one conversation form (turns.py: one chat turn)
    templates.py  built-in chat templates;  chat_template.py: resolve, render, fallbacks
    tokenize.py   conversation -> text + the character spans that train -> labels
    samples.py    one source -> [(input_ids, labels)] + counts, chunk by chunk
    dataset.py    int32 token shards written chunk by chunk; TokenDataset: rows over them
    build.py      all sources -> train/eval TokenDatasets + stats (cache.py: the on-disk cache)
    validate.py   every row of every source checked, no model, no GPU (before torchrun)
    loader.py     packing, ResumableSampler, batches
    preview.py    `zerotune data preview`;  prepare.py: `zerotune data prepare` (parallel tokenizing)

Tokenized data is cached under data.cache_dir (default RUN_DIR/../.zerotune-cache), keyed by
everything that changes the tokens: the sources' content, formats, columns and weights, the
tokenizer, the chat template, every data.* setting, the seed.
"""
