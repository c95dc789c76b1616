"""Packing, resumable sampling and batch collation (the memory-mapped TokenDataset: dataset.py).

A sample is {"input_ids", "labels"} (+ "position_ids" when packed): position_ids restart at 0
at each packed sample, and the first label of each sample is -100. With no attention_mask in
the batch, transformers derives the per-sample (block-diagonal causal) mask from position_ids
for sdpa, eager and flex attention, and flash-attention-2 runs varlen on the same
position_ids, so packed samples never attend to each other (tests/test_data_packing.py).
"""
from __future__ import annotations

import bisect
from array import array

import numpy as np

from .formats import DataError
from .tokenize import IGNORE


# ----------------------------------------------------------------------------- packing
def pack_rows(lengths, max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Best-fit-decreasing bin packing, as (row_ptr, members): row r holds the samples
    members[row_ptr[r]:row_ptr[r + 1]], in the order they went in; every row's total <= max_len.

    Longest first (ties in index order); each sample goes into the open row with the least room
    that still fits it, and of equally roomy rows into the one that got that room last. Rows are
    kept in one stack per room value, and the room values in a sorted list of at most max_len
    entries, so packing costs the same per sample however many rows there are; memory is a few
    int64 arrays of one entry per sample. Deterministic.
    """
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and lengths.max() > max_len:
        i = int(np.argmax(lengths))          # the first one packing meets
        raise ValueError(f"sample {i} has {int(lengths[i])} tokens > max_len {max_len}")
    order = np.argsort(-lengths, kind="stable")
    row_of = np.empty(len(lengths), dtype=np.int64)
    stacks: dict[int, array] = {}            # room -> rows with that much room, the latest last
    rooms: list[int] = []                    # sorted room values that have a row
    n_rows = 0
    for block in range(0, len(order), 1 << 16):   # Python ints a block at a time: the loop is faster on them
        idx = order[block: block + (1 << 16)]
        for i, n in zip(idx.tolist(), lengths[idx].tolist()):
            k = bisect.bisect_left(rooms, n)
            if k == len(rooms):
                r, room = n_rows, max_len - n
                n_rows += 1
            else:
                have = rooms[k]
                r, room = stacks[have].pop(), have - n
                if not stacks[have]:
                    del stacks[have], rooms[k]
            row_of[i] = r
            if room > 0:
                if room not in stacks:
                    stacks[room] = array("q")
                    bisect.insort(rooms, room)
                stacks[room].append(r)
    row_ptr = np.zeros(n_rows + 1, dtype=np.int64)
    np.cumsum(np.bincount(row_of, minlength=n_rows), out=row_ptr[1:])
    row_of = row_of[order]
    return row_ptr, order[np.argsort(row_of, kind="stable")]   # by row, then in the order they went in


def pack(lengths: list[int], max_len: int) -> list[list[int]]:
    """pack_rows as lists: sample indices per row."""
    row_ptr, members = pack_rows(lengths, max_len)
    m, ptr = members.tolist(), row_ptr.tolist()
    return [m[a:b] for a, b in zip(ptr[:-1], ptr[1:])]


# ----------------------------------------------------------------------------- sampling
class ResumableSampler:
    """Shuffles indices per epoch with (seed, epoch); the epoch's order is one global stream that
    the ranks take in turn: rank r's k-th sample is order[offset + k * world + r].

    The state is (epoch, consumed, offset): `consumed` counts samples taken by each rank since
    `offset` (the global position in the epoch where this world size took over: 0, or where a
    resume on another replica count continued), so a resumed sampler yields exactly the next
    sample on every rank, on any replica count (`continue_at`). The ragged tail of an epoch (fewer
    than `world` samples left) is dropped so ranks stay in step.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        self.n, self.rank, self.world, self.seed, self.shuffle = num_samples, rank, world_size, seed, shuffle
        if num_samples // world_size == 0:
            raise ValueError(f"{num_samples} samples cannot be split over {world_size} ranks")
        self.epoch, self.consumed, self.offset = 0, 0, 0

    @property
    def per_rank(self) -> int:
        """Samples each rank takes in this epoch from `offset` on."""
        return (self.n - self.offset) // self.world

    @property
    def epochs_done(self) -> float:
        """Epochs trained, as a fraction (the global position in this epoch over its length)."""
        return self.epoch + (self.offset + self.consumed * self.world) / (self.n - self.n % self.world)

    def _order(self, epoch: int) -> np.ndarray:
        """This rank's indices for `epoch`: an int64 array (8 bytes a row, not a Python list)."""
        if not self.shuffle:
            idx = np.arange(self.n, dtype=np.int64)
        else:
            import torch  # imported here so `zerotune --help` and the launcher stay torch-free
            g = torch.Generator().manual_seed(self.seed + epoch)
            idx = torch.randperm(self.n, generator=g).numpy()
        return idx[self.offset + self.rank: self.offset + self.per_rank * self.world: self.world]

    def __iter__(self):
        while True:
            order = self._order(self.epoch)
            while self.consumed < self.per_rank:
                i = int(order[self.consumed])
                self.consumed += 1
                yield i
            self.epoch, self.consumed, self.offset = self.epoch + 1, 0, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "offset": self.offset, "num_samples": self.n,
                "world_size": self.world}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("num_samples", self.n), ("world_size", self.world)):
            if key in state and int(state[key]) != mine:
                raise DataError(f"sampler state was saved with {key}={state[key]}, this run has {mine}: "
                                "the data or the number of processes changed since the checkpoint")
        self.epoch, self.consumed, self.offset = int(state["epoch"]), int(state["consumed"]), int(state.get("offset", 0))

    def resume(self, saved: list[dict], saved_world: int) -> str | None:
        """Continue where a checkpoint's samplers (one state per saved rank) stopped, on this
        sampler's replica count, which may differ from the saved one: the next sample is the same
        global sample of the epoch either way. Returns a warning when the end of that epoch differs
        from the saved run's (each replica count drops its own ragged tail), else None."""
        saved_replicas = int(saved[0].get("world_size", saved_world))
        if saved_replicas == self.world:
            # same replicas on another world size (sequence parallel groups): all replicas share the state
            self.load_state_dict(saved[self.rank] if saved_world == len(saved) == self.world else saved[0])
            return None
        if "num_samples" not in saved[0]:   # a checkpoint from before the sampler saved its size
            self.load_state_dict({"epoch": saved[0]["epoch"], "consumed": saved[0]["consumed"] * saved_replicas // self.world})
            return None
        state, differ = continue_at({"world_size": saved_replicas, **saved[0]}, self.world)
        self.load_state_dict(state)
        if not differ:
            return None
        return (f"resuming on {self.world} replicas (saved on {saved_replicas}): {abs(differ)} sample(s) at the end "
                f"of epoch {state['epoch']} are {'trained' if differ > 0 else 'skipped'} that the saved run would have "
                f"{'dropped' if differ > 0 else 'trained'} (each replica count drops its own ragged tail)")


def continue_at(saved: dict, replicas: int) -> tuple[dict, int]:
    """A sampler state saved on another replica count -> the state that continues at the same
    global sample on `replicas`, and how many samples of that epoch the two runs treat differently
    (the ragged tail dropped: > 0 trained now that the saved run would have dropped, < 0 the other
    way round). `saved` is any rank's state (all ranks share epoch, consumed and offset)."""
    n, world, offset = int(saved["num_samples"]), int(saved["world_size"]), int(saved.get("offset", 0))
    at = offset + int(saved["consumed"]) * world
    state = {"epoch": int(saved["epoch"]), "consumed": 0, "offset": at, "num_samples": n, "world_size": replicas}
    differ = (n - at) // replicas * replicas - (n - at) // world * world
    if (n - at) // replicas == 0:   # the epoch's samples are used up: the next epoch starts
        state.update(epoch=state["epoch"] + 1, offset=0)
    return state, differ


# ----------------------------------------------------------------------------- batches
def collate(samples: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pad to the longest sample. Every key is a causal-LM forward argument.

    Plain samples: input_ids, labels (-100 on padding), attention_mask (0 on padding).
    Packed samples: input_ids, labels, position_ids and NO attention_mask (transformers then
    masks per packed sample); padding gets position 0 for every token, i.e. attends only to
    itself, and -100 labels.
    """
    import torch
    T = max(len(s["input_ids"]) for s in samples)
    B = len(samples)
    ids = torch.full((B, T), pad_id, dtype=torch.long)
    labels = torch.full((B, T), IGNORE, dtype=torch.long)
    packed = any("position_ids" in s for s in samples)
    if packed:
        pos = torch.zeros((B, T), dtype=torch.long)
    else:
        mask = torch.zeros((B, T), dtype=torch.long)
    for b, s in enumerate(samples):
        n = len(s["input_ids"])
        ids[b, :n] = torch.as_tensor(np.asarray(s["input_ids"], dtype=np.int64))
        labels[b, :n] = torch.as_tensor(np.asarray(s["labels"], dtype=np.int64))
        if packed:
            p = s.get("position_ids")
            pos[b, :n] = torch.as_tensor(np.asarray(p, dtype=np.int64)) if p is not None else torch.arange(n)
        else:
            mask[b, :n] = 1
    if packed:
        return {"input_ids": ids, "labels": labels, "position_ids": pos}
    return {"input_ids": ids, "labels": labels, "attention_mask": mask}


def batches(dataset, sampler: ResumableSampler, micro_batch_size: int, pad_id: int):
    """Endless micro-batches in sampler order."""
    it = iter(sampler)
    while True:
        yield collate([dataset[next(it)] for _ in range(micro_batch_size)], pad_id)


def target_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss after the causal shift."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Non-padding tokens (for tokens/s). Packed rows: padding is the trailing run of position 0
    (a real sample has >= 2 tokens, so its last position is > 0)."""
    if "attention_mask" in batch:
        return int(batch["attention_mask"].sum())
    pad = (batch["position_ids"] == 0).flip(-1).long().cumprod(-1).sum(-1)
    return int(batch["position_ids"].numel() - pad.sum())
