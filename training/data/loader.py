"""Tokenized datasets (memory-mapped), packing, resumable sampling and batch collation.

A sample is {"input_ids", "labels"} (+ "position_ids" when packed): position_ids restart at 0
at each packed sample, and the first label of each sample is -100. With no attention_mask in
the batch, transformers derives the per-sample (block-diagonal causal) mask from position_ids
for sdpa, eager and flex attention, and flash-attention-2 runs varlen on the same
position_ids, so packed samples never attend to each other (tests/test_data_packing.py).
"""
from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np

from .formats import DataError
from .tokenize import IGNORE


# ----------------------------------------------------------------------------- datasets
class TokenDataset:
    """List-like samples stored as flat int32 arrays + row offsets (memory-mapped from the cache)."""

    def __init__(self, ids: np.ndarray, labels: np.ndarray, offsets: np.ndarray, positions: np.ndarray | None = None):
        self.ids, self.labels, self.offsets, self.positions = ids, labels, offsets, positions

    @classmethod
    def from_samples(cls, samples: list[tuple[list[int], list[int]]], bins: list[list[int]] | None = None) -> "TokenDataset":
        """Plain rows (bins None) or packed rows: bins[r] lists the samples packed into row r."""
        rows = bins if bins is not None else [[i] for i in range(len(samples))]
        lens = np.array([sum(len(samples[i][0]) for i in r) for r in rows], dtype=np.int64)
        offsets = np.zeros(len(rows) + 1, dtype=np.int64)
        np.cumsum(lens, out=offsets[1:])
        order = [i for r in rows for i in r]
        flat = lambda k: np.fromiter((t for i in order for t in samples[i][k]), dtype=np.int32, count=int(offsets[-1]))  # noqa: E731
        positions = None
        if bins is not None:
            positions = np.fromiter((p for i in order for p in range(len(samples[i][0]))), dtype=np.int32,
                                    count=int(offsets[-1]))
        return cls(flat(0), flat(1), offsets, positions)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("ids", "labels", "offsets", "positions"):
            if getattr(self, name) is not None:
                np.save(folder / f"{name}.npy", getattr(self, name))

    @classmethod
    def load(cls, folder: Path) -> "TokenDataset":
        load = lambda n: np.load(folder / f"{n}.npy", mmap_mode="r") if (folder / f"{n}.npy").exists() else None  # noqa: E731
        return cls(load("ids"), load("labels"), load("offsets"), load("positions"))

    @property
    def packed(self) -> bool:
        return self.positions is not None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def length(self, i: int) -> int:
        return int(self.offsets[i + 1] - self.offsets[i])

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        out = {"input_ids": self.ids[a:b], "labels": self.labels[a:b]}
        if self.positions is not None:
            out["position_ids"] = self.positions[a:b]
        return out

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def num_tokens(self) -> int:
        return int(self.offsets[-1])


def pack(lengths: list[int], max_len: int) -> list[list[int]]:
    """Best-fit-decreasing bin packing: sample indices per row, each row's total <= max_len.

    Longest first; each sample goes into the open row with the least room that still fits it
    (bisect over rows sorted by room). Deterministic: ties keep index order.
    """
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    rooms: list[int] = []      # sorted free room of open rows
    row_of: list[int] = []     # row id for each entry of rooms
    bins: list[list[int]] = []
    for i in order:
        n = lengths[i]
        if n > max_len:
            raise ValueError(f"sample {i} has {n} tokens > max_len {max_len}")
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


# ----------------------------------------------------------------------------- sampling
class ResumableSampler:
    """Shuffles indices per epoch with (seed, epoch); rank r takes every world-th index.

    The state is (epoch, consumed): `consumed` counts samples taken by each rank in the
    current epoch, so a resumed sampler yields exactly the next sample on every rank.
    """

    def __init__(self, num_samples: int, rank: int, world_size: int, seed: int, shuffle: bool = True):
        self.n, self.rank, self.world, self.seed, self.shuffle = num_samples, rank, world_size, seed, shuffle
        self.per_rank = num_samples // world_size  # drop the ragged tail so ranks stay in step
        if self.per_rank == 0:
            raise ValueError(f"{num_samples} samples cannot be split over {world_size} ranks")
        self.epoch, self.consumed = 0, 0

    def _order(self, epoch: int) -> list[int]:
        if not self.shuffle:
            idx = list(range(self.n))
        else:
            import torch  # imported here so `zerotune --help` and the launcher stay torch-free
            g = torch.Generator().manual_seed(self.seed + epoch)
            idx = torch.randperm(self.n, generator=g).tolist()
        return idx[self.rank: self.per_rank * self.world: self.world]

    def __iter__(self):
        while True:
            order = self._order(self.epoch)
            while self.consumed < self.per_rank:
                i = order[self.consumed]
                self.consumed += 1
                yield i
            self.epoch, self.consumed = self.epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "consumed": self.consumed, "num_samples": self.n, "world_size": self.world}

    def load_state_dict(self, state: dict) -> None:
        for key, mine in (("num_samples", self.n), ("world_size", self.world)):
            if key in state and int(state[key]) != mine:
                raise DataError(f"sampler state was saved with {key}={state[key]}, this run has {mine}: "
                                "the data or the number of processes changed since the checkpoint")
        self.epoch, self.consumed = int(state["epoch"]), int(state["consumed"])


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
