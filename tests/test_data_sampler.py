"""Deterministic, resumable sampling; and, in one real 2-process torchrun job, the
distributed cache (rank 0 tokenizes, rank 1 waits and memory-maps) and exact resume on
every rank."""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from zerotune.training.data.loader import ResumableSampler, batches

ROOT = Path(__file__).resolve().parent.parent


def test_sampler_partitions_and_reshuffles_per_epoch():
    n, world = 23, 3
    ranks = [ResumableSampler(n, r, world, seed=7) for r in range(world)]
    iters = [iter(s) for s in ranks]
    per_rank = n // world
    epoch0 = [[next(it) for _ in range(per_rank)] for it in iters]
    epoch1 = [[next(it) for _ in range(per_rank)] for it in iters]
    for ep in (epoch0, epoch1):
        flat = [i for r in ep for i in r]
        assert len(set(flat)) == len(flat) == per_rank * world   # disjoint, ragged tail dropped
    assert epoch0 != epoch1 and all(s.epoch == 1 for s in ranks)
    again = ResumableSampler(n, 1, world, seed=7)
    it = iter(again)
    assert [next(it) for _ in range(per_rank)] == epoch0[1]        # same seed, same order


def global_stream(samplers: list, steps: int) -> list[int]:
    """What the ranks train, step by step (one sample per rank a step), in global order."""
    its = [iter(s) for s in samplers]
    return [next(it) for _ in range(steps) for it in its]


@pytest.mark.parametrize("n,first,second", [(24, 2, 3), (24, 3, 2), (23, 3, 2), (25, 2, 4), (24, 4, 1)])
def test_resume_on_another_replica_count_continues_at_the_same_global_sample(n, first, second):
    """Every stop point of the first epoch: the samples trained before and after a resume on
    another count are the uninterrupted order's, none twice, none skipped (up to the epoch end,
    where each count drops its own ragged tail)."""
    straight = global_stream([ResumableSampler(n, r, 1, seed=5) for r in range(1)], n)
    for stop in range(n // first):
        before = [ResumableSampler(n, r, first, seed=5) for r in range(first)]
        head = global_stream(before, stop)
        saved = [s.state_dict() for s in before]
        after = [ResumableSampler(n, r, second, seed=5) for r in range(second)]
        notes = {s.resume(saved, first) for s in after}
        rest = (n - len(head)) // second
        tail = global_stream(after, rest)
        assert head + tail == straight[:len(head) + len(tail)], (stop, head, tail)
        left = n - len(head)   # a warning exactly when the epoch ends elsewhere than the saved count's would
        assert (notes == {None}) == (left // second * second == left // first * first), (stop, notes)
        assert rest == 0 or all(s.consumed == s.per_rank for s in after)   # the epoch is used up


def test_resume_in_process_across_epoch_boundary():
    ref = ResumableSampler(10, 0, 2, seed=3)
    it = iter(ref)
    head = [next(it) for _ in range(4)]
    state = ref.state_dict()
    tail = [next(it) for _ in range(9)]                     # crosses into epoch 2
    resumed = ResumableSampler(10, 0, 2, seed=3)
    resumed.load_state_dict(json.loads(json.dumps(state)))  # survives a JSON/torch.save round trip
    it2 = iter(resumed)
    assert [next(it2) for _ in range(9)] == tail
    assert len(set(head + tail[:1])) == 5
    with pytest.raises(ValueError, match="world_size=2, this run has 4"):
        ResumableSampler(10, 0, 4, seed=3).load_state_dict(state)


def _digest(batch) -> str:
    h = hashlib.sha256()
    for k in sorted(batch):
        h.update(k.encode() + batch[k].numpy().tobytes())
    return h.hexdigest()[:16]


def worker(out_dir: str, recipe_path: str) -> None:
    """Runs on each rank under torchrun (see the test below)."""
    import torch.distributed as dist

    from zerotune.core.recipe_load import load_recipe
    from zerotune.training.data.build import build_data
    from zerotune.training.data.build import load_tokenizer
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    recipe = load_recipe(recipe_path)
    tok = load_tokenizer(recipe)
    data = build_data(recipe, tok)
    mbs, K, M = 2, int(os.environ["ZT_K"]), int(os.environ["ZT_M"])

    sampler = ResumableSampler(len(data.train), rank, world, recipe.train.seed)
    stream = batches(data.train, sampler, mbs, tok.pad_token_id)
    head = [_digest(next(stream)) for _ in range(K)]
    states = [None] * world
    dist.all_gather_object(states, sampler.state_dict())     # what the checkpoint layer saves
    rest = [_digest(next(stream)) for _ in range(M)]

    resumed = ResumableSampler(len(data.train), rank, world, recipe.train.seed)
    resumed.load_state_dict(states[rank])
    stream2 = batches(data.train, resumed, mbs, tok.pad_token_id)
    rest2 = [_digest(next(stream2)) for _ in range(M)]
    # a data error on rank 0 reaches every rank as the same one-line error (no rank hangs at the barrier)
    from zerotune.training.data.formats import DataError
    bad = recipe.model_copy(deep=True)
    bad.data.train[0].path = str(ROOT / "tests/fixtures/data/sharegpt_unknown_role.jsonl")
    bad.data.train[0].format = "sharegpt"
    try:
        build_data(bad, tok)
        error = None
    except DataError as e:
        error = str(e)
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps({
        "error": error, "cache": data.stats["cache"], "rows": len(data.train), "head": head, "rest": rest, "resumed": rest2,
        "epoch_after": sampler.epoch, "first": data.train[0]["input_ids"].tolist()}))
    dist.barrier()
    dist.destroy_process_group()


def test_two_ranks_share_the_cache_and_resume_exactly(tmp_path):
    from conftest import ALPACA, base_recipe, write_recipe
    rows = json.loads(ALPACA.read_text())[:160]
    data = tmp_path / "alpaca160.json"
    data.write_text(json.dumps(rows))
    recipe = write_recipe(tmp_path, base_recipe(tmp_path, data={
        "train": [{"path": str(data), "format": "alpaca"}], "max_len": 128, "packing": True}))
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", PYTHONWARNINGS="ignore",
               ZT_K="30", ZT_M="12", PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(Path(__file__)), str(tmp_path), str(recipe)],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r0, r1 = (json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (r0["cache"], r1["cache"]) == ("miss", "hit")        # rank 1 waited and memory-mapped rank 0's cache
    assert r0["rows"] == r1["rows"] and r0["first"] == r1["first"]
    per_rank_batches = r0["rows"] // 2 // 2
    assert 30 < per_rank_batches < 42, "K + M must cross an epoch boundary"
    assert r0["epoch_after"] == r1["epoch_after"] == 1
    for r in (r0, r1):
        assert r["resumed"] == r["rest"]                          # exact next batches after resume
    assert not set(r0["head"]) & set(r1["head"])                 # ranks see different samples
    assert r0["error"] == r1["error"] and "sharegpt_unknown_role.jsonl line 2: turn 2 has unknown role" in r0["error"]


if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
