"""Data at scale: the tokenized cache is written as int32 shards chunk by chunk, so a data set
larger than memory prepares and trains with flat memory; the sharded cache gives exactly the
batches of the in-memory build; ranks wait for rank 0's tokenizing on a gloo group with its own
long timeout, never on the training group's.

The 2,000,000-row test runs `prepare_data` in a subprocess and reads its peak RSS from
getrusage (the test process has loaded other tests' data: its own peak says nothing).
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import ALPACA, MESSAGES, ROOT, base_recipe

from zerotune.core.recipe_load import validate_recipe
from zerotune.training.data import dataset, samples
from zerotune.training.data.loader import ResumableSampler, batches
from zerotune.training.data.build import build_data
from zerotune.training.data.loader import pack
from zerotune.training.data.prepare import prepare_data
from zerotune.training.data.build import load_tokenizer

CASES = {
    "plain": {"train": [{"path": str(ALPACA), "format": "alpaca"}], "max_len": 128, "eval_split": 0.05},
    "packed, weighted": {"train": [{"path": str(ALPACA), "format": "alpaca", "weight": 1.5},
                                   {"path": str(MESSAGES), "format": "messages", "weight": 0.5}],
                         "max_len": 256, "packing": True, "eval_split": 0.1},
}


def _batches(ds, n: int, seed: int = 7) -> list[dict]:
    stream = batches(ds, ResumableSampler(len(ds), 0, 1, seed), 4, 0)
    return [next(stream) for _ in range(n)]


def _same(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys() and all((x[k] == y[k]).all() for k in x)


@pytest.mark.parametrize("case", CASES)
def test_many_shards_give_the_batches_of_one(tmp_path, monkeypatch, case):
    r = validate_recipe(base_recipe(tmp_path, model={"chat_template": "chatml"}, data=CASES[case]))
    one = build_data(r, load_tokenizer(r), use_cache=False)                # one shard, in memory
    monkeypatch.setattr(dataset, "SHARD_TOKENS", 3000)                     # ~a chunk per shard
    monkeypatch.setattr(samples, "CHUNK_ROWS", 40)
    many = build_data(r, load_tokenizer(r))                                # the cache, many shards on disk
    folder = Path(many.stats["cache_path"]) / "tokens"
    assert len(list(folder.glob("ids-*.bin"))) >= 20 and len(one.train.store.shards) == 1
    loaded = build_data(r, load_tokenizer(r))                              # what a rank loads: memory-mapped
    assert loaded.stats["cache"] == "hit" and loaded.train.packed == (case != "plain")
    for a in (many, loaded):
        assert len(a.train) == len(one.train) and len(a.eval) == len(one.eval)
        _same(_batches(a.train, 60), _batches(one.train, 60))            # > one epoch of the plain case
        _same(_batches(a.eval, 10), _batches(one.eval, 10))
        keys = ("train_samples", "train_rows", "train_tokens", "train_target_tokens", "length_histogram")
        assert json.dumps([a.stats[k] for k in keys]) == json.dumps([one.stats[k] for k in keys])


def _pack_before(lengths: list[int], max_len: int) -> list[list[int]]:
    """The list-based best-fit-decreasing packer this change replaced (the reference)."""
    import bisect
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rooms, row_of, bins = [], [], []
    for i in order:
        n = lengths[i]
        k = bisect.bisect_left(rooms, n)
        if k == len(rooms):
            bins.append([i])
            r, room = len(bins) - 1, max_len - n
        else:
            r, room = row_of.pop(k), rooms.pop(k) - n
            bins[r].append(i)
        if room > 0:
            k = bisect.bisect_left(rooms, room)
            rooms.insert(k, room)
            row_of.insert(k, r)
    return bins


def test_packing_keeps_the_rows_of_the_list_packer():
    rng = random.Random(3)
    for max_len, hi, n in ((64, 64, 3000), (1024, 300, 5000), (16, 4, 500)):   # many ties of length and room
        lengths = [rng.randint(2, hi) for _ in range(n)]
        assert pack(lengths, max_len) == _pack_before(lengths, max_len)


SCALE = """
import json, resource, sys, time
sys.path.insert(0, {tests!r})
from pathlib import Path
from conftest import base_recipe
from zerotune.core.recipe_load import validate_recipe
from zerotune.training.data.loader import ResumableSampler, batches
from zerotune.training.data.build import build_data
from zerotune.training.data.prepare import prepare_data
from zerotune.training.data.tokenize import tokenize_text
from zerotune.training.data.build import load_tokenizer

n, tmp = {rows}, Path({tmp!r})
words = ["cat", "dog", "sun", "tree", "ran", "big", "red", "home", "play", "sky"]
text = lambda i: " ".join(words[i // 10 ** j % 10] for j in range(5)) + f" {{i}}"
t0 = time.perf_counter()
with open(tmp / "big.jsonl", "w") as fh:
    fh.writelines(json.dumps({{"text": text(i)}}) + "\\n" for i in range(n))
r = validate_recipe(base_recipe(tmp, data={{"train": [{{"path": str(tmp / "big.jsonl"), "format": "text",
                                                        "weight": 1.5}}], "max_len": 64, "packing": True}}))
tok = load_tokenizer(r)
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t1 = time.perf_counter()
ready = prepare_data(r, tok, workers=2)
t2 = time.perf_counter()
peak, children = (resource.getrusage(w).ru_maxrss for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
data = build_data(r, tok)   # what a rank does: load the cache
ds, ok = data.train, []
for seed in (1, 2):         # two batches of 8 packed rows, each row checked against its lines tokenized alone
    batch = next(batches(ds, ResumableSampler(len(ds), 0, 1, seed), 8, tok.pad_token_id))
    for b, i in enumerate(ResumableSampler(len(ds), 0, 1, seed)._order(0)[:8].tolist()):
        lines = ds.rows[ds.row_ptr[i]: ds.row_ptr[i + 1]].tolist()       # sample number = line number
        want = [t for s in lines for t in tokenize_text(tok, text(s))[0]]
        pos = [p for s in lines for p in range(len(tokenize_text(tok, text(s))[0]))]
        ok.append(batch["input_ids"][b, :len(want)].tolist() == want and batch["position_ids"][b, :len(want)].tolist() == pos)
print(json.dumps({{"rows": n, "base_kb": base, "peak_kb": peak, "children_kb": children, "seconds": t2 - t1,
                  "write_seconds": t1 - t0, "cache": data.stats["cache"], "tokens": ready.stats["train_tokens"],
                  "samples": ready.stats["train_samples"], "packed_rows": len(ds), "batches_ok": ok,
                  "cache_path": ready.stats["cache_path"],
                  "disk": sum(f.stat().st_size for f in Path(ready.stats["cache_path"]).rglob("*") if f.is_file())}}))
"""


def test_two_million_rows_prepare_with_flat_memory(tmp_path):
    """2,000,000 raw-text rows, weight 1.5 (3,000,000 samples), packed, through the real prepare path."""
    script = SCALE.format(tests=str(ROOT / "tests"), rows=2_000_000, tmp=str(tmp_path))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    m = json.loads(proc.stdout.strip().splitlines()[-1])
    print(m)
    assert m["cache"] == "hit" and m["samples"] == 3_000_000 and m["batches_ok"] == [True] * 16
    # The same tokens as Python lists (what the build held before): ids and labels, at least an
    # 8-byte pointer a token each (957 MB here), before any int objects or list headers. The
    # build's own growth holds only per-sample index arrays (offsets, targets, sample numbers,
    # packing's order and rows: measured 225 MB, 75 bytes a sample); the tokens stay on disk.
    as_lists = 2 * 8 * m["tokens"]
    grown = (m["peak_kb"] - m["base_kb"]) * 1024
    assert grown < as_lists / 3 and grown < 100 * m["samples"], (grown, as_lists)
    assert m["children_kb"] < m["base_kb"] + 100_000                  # a worker holds a few chunks, no more


RANK = """
import json, sys, time
from datetime import timedelta
from pathlib import Path
sys.path.insert(0, {tests!r})
import torch.distributed as dist
from zerotune.core.recipe_load import validate_recipe
from zerotune.training.data import build
from zerotune.training.data.formats import DataError
from zerotune.training.data.build import build_data
from zerotune.training.data.build import load_tokenizer

rank, out = int(sys.argv[1]), Path({tmp!r})
# the training group: a 3 s timeout stands for NCCL's, far shorter than rank 0's tokenizing
dist.init_process_group("gloo", init_method="file://" + str(out / "pg"), rank=rank, world_size=2,
                        timeout=timedelta(seconds=3))
build.WAIT_SECONDS = {wait}
real = build.build_datasets
def slow(*a, **k):
    time.sleep(8)
    return real(*a, **k)
build.build_datasets = slow
r = validate_recipe(json.loads((out / "recipe.json").read_text()))
try:
    data = build_data(r, load_tokenizer(r))
    res = {{"cache": data.stats["cache"], "path": data.stats["cache_path"], "rows": len(data.train),
           "first": data.train[0]["input_ids"].tolist()}}
except DataError as e:
    res = {{"error": str(e)}}
(out / f"rank{{rank}}.json").write_text(json.dumps(res))
if {control} and "error" not in res:   # control: the 3 s timeout is real (a barrier on it gives up)
    try:
        time.sleep(6) if rank == 0 else None
        dist.barrier()
        (out / f"barrier{{rank}}").write_text("passed")
    except Exception as e:
        (out / f"barrier{{rank}}").write_text("timed out")
"""


def _two_ranks(tmp_path: Path, wait: int, control: bool) -> list[dict]:
    r = base_recipe(tmp_path, data={"train": [{"path": str(ALPACA), "format": "alpaca"}], "max_len": 128})
    (tmp_path / "recipe.json").write_text(json.dumps(r))
    script = RANK.format(tests=str(ROOT / "tests"), tmp=str(tmp_path), wait=wait, control=control)
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, "-c", script, str(k)], env=env, stderr=subprocess.PIPE, text=True)
             for k in (0, 1)]
    for p in procs:
        try:
            p.wait(timeout=120)
        except subprocess.TimeoutExpired:
            p.kill()
    return [json.loads((tmp_path / f"rank{k}.json").read_text()) if (tmp_path / f"rank{k}.json").exists() else
            {"stderr": procs[k].stderr.read()[-2000:]} for k in (0, 1)]


def test_ranks_wait_for_rank_0s_tokenizing_past_the_training_timeout(tmp_path):
    """Rank 0 tokenizes for 8 s; the training group times out after 3 s; rank 1 still gets the cache."""
    r0, r1 = _two_ranks(tmp_path, wait=600, control=True)
    assert r0["cache"] == "miss" and r1["cache"] == "hit", (r0, r1)
    assert r0["path"] == r1["path"] and r0["rows"] == r1["rows"] == 999 and r0["first"] == r1["first"]
    assert (tmp_path / "barrier1").read_text() == "timed out"     # the same wait on the training group fails


def test_a_rank_that_gives_up_waiting_names_the_cache_folder(tmp_path):
    r0, r1 = _two_ranks(tmp_path, wait=2, control=False)
    assert r1.get("error", "").startswith("rank 1: gave up waiting for rank 0 to build the tokenized data cache "), r1
    folder = r1["error"].split("data cache ")[1].split(" ")[0]
    assert Path(folder).parent == tmp_path / "runs" / ".zerotune-cache" and "zerotune data prepare" in r1["error"]
