"""The tokenized-data cache: one folder per key, written atomically, memory-mapped on load.

    folder = cache_root(recipe) / cache_key(recipe, tokenizer, template)
    tmp = staging(folder)                  # the build streams its shards into tmp/tokens
    save(tmp, train, evals, stats); commit(tmp, folder)   # rename: a reader sees all or nothing
    train, evals, stats = load(folder)

    folder/tokens/     the samples, in int32 shards + per-sample offsets (dataset.py)
    folder/train/      rows.npy (sample numbers, weights repeat them), row_ptr.npy when packed
    folder/eval/       the same for eval
    folder/stats.json  counts, warnings, timings

The key covers everything that changes the tokens: the sources' content, formats, columns and
weights, every data.* setting, the tokenizer, the resolved chat template and the seed.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

from zerotune.core.io import process_exists

from .dataset import SampleStore, TokenDataset
from .sources import content_hash

CACHE_VERSION = 3   # 2: tool calls, reasoning and train_on reach the tokens; 3: sharded tokens + row indexes


def tokenizer_fingerprint(tokenizer) -> str:
    h = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    h.update((backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))).encode())
    h.update(json.dumps([type(tokenizer).__name__, tokenizer.bos_token, tokenizer.eos_token,
                         tokenizer.pad_token, len(tokenizer)]).encode())
    return h.hexdigest()[:20]


def cache_key(recipe, tokenizer, template) -> str:
    d = recipe.data
    desc = {
        "version": CACHE_VERSION,
        "train": [{**s.model_dump(mode="json"), "hash": content_hash(s)} for s in d.train],
        "eval": [{**s.model_dump(mode="json"), "hash": content_hash(s)} for s in d.eval],
        "data": d.model_dump(mode="json", exclude={"train", "eval", "cache_dir"}),
        "tokenizer": tokenizer_fingerprint(tokenizer), "template": template, "seed": recipe.train.seed,
    }
    return hashlib.sha256(json.dumps(desc, sort_keys=True).encode()).hexdigest()[:24]


def cache_root(recipe) -> Path:
    return Path(recipe.data.cache_dir) if recipe.data.cache_dir else recipe.run_dir.parent / ".zerotune-cache"


def staging(folder: Path) -> Path:
    """An empty folder beside `folder` that only this process writes (then commit() renames it).
    Staging folders that a killed build of this host left behind (SIGKILL, out of memory: its
    process is gone) are removed first; other hosts' are left to them (a shared file system)."""
    host = socket.gethostname()
    for old in folder.parent.glob(f"*.tmp-{host}-*") if folder.parent.is_dir() else []:
        pid = old.name.rsplit("-", 1)[1]
        if pid.isdigit() and not process_exists(int(pid)):
            shutil.rmtree(old, ignore_errors=True)
    tmp = folder.with_name(f"{folder.name}.tmp-{host}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    return tmp


def save(tmp: Path, train: TokenDataset, evals: TokenDataset, stats: dict) -> None:
    """The row indexes and stats, beside the shards the build already wrote to tmp/tokens."""
    train.save(tmp / "train")
    evals.save(tmp / "eval")
    (tmp / "stats.json").write_text(json.dumps(stats, indent=1))


def commit(tmp: Path, folder: Path) -> None:
    try:
        tmp.rename(folder)            # atomic: a reader sees a complete cache or none
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)   # another process won the race: theirs is identical


def load(folder: Path) -> tuple[TokenDataset, TokenDataset, dict]:
    t0 = time.perf_counter()
    stats = json.loads((folder / "stats.json").read_text())
    store = SampleStore.load(folder / "tokens")
    train, evals = TokenDataset.load(folder / "train", store), TokenDataset.load(folder / "eval", store)
    stats.update(cache="hit", cache_path=str(folder), load_seconds=round(time.perf_counter() - t0, 3))
    return train, evals, stats
