"""Tokenized samples in int32 shards, written chunk by chunk, and the datasets of rows over them.

    writer = ShardWriter(folder)              # folder None: the shards stay in memory
    writer.add(ids, labels, lengths)          # one tokenized chunk, as flat int32 arrays
    store = writer.close()                    # SampleStore: sample s -> (ids, labels), memory-mapped
    TokenDataset(store, rows)                 # row i is sample rows[i]
    TokenDataset(store, rows, row_ptr)        # packed: row i is samples rows[row_ptr[i]:row_ptr[i + 1]]

A store folder holds ids-00000.bin, labels-00000.bin, ... (raw int32, a new pair once a shard
passes SHARD_TOKENS; a sample never spans two), shards.npy (int64 first token of each shard, then
the end), samples.npy (int64 first token of each sample, then the end) and targets.npy (int32
trained tokens of each sample). The tokens stay on disk and the OS pages in what batches read;
only the per-sample index arrays (8-20 bytes a sample) grow with the data set.
"""
from __future__ import annotations

import bisect
from pathlib import Path

import numpy as np

from .tokenize import IGNORE

SHARD_TOKENS = 1 << 26   # 64 Mi tokens, 256 MiB a file: few files, and each open map holds a file descriptor


class ShardWriter:
    """Appends tokenized chunks, in order, to the shard being filled; samples are numbered in order."""

    def __init__(self, folder: Path | None, shard_tokens: int | None = None):
        self.folder, self.limit = folder, shard_tokens or SHARD_TOKENS
        self.starts = [0]             # first token of each shard, then of the one being filled
        self.fill = 0                 # tokens in the shard being filled
        self.files = None             # its (ids, labels) files; in memory: lists of chunk arrays
        self.memory: list[tuple[np.ndarray, np.ndarray]] = []   # finished in-memory shards
        self.lengths: list[np.ndarray] = []
        self.targets: list[np.ndarray] = []
        self.num_samples = 0
        if folder is not None:
            folder.mkdir(parents=True, exist_ok=True)

    def add(self, ids: np.ndarray, labels: np.ndarray, lengths: np.ndarray) -> None:
        if self.fill and self.fill + len(ids) > self.limit:
            self._finish_shard()
        if len(ids):
            if self.files is None:
                k = len(self.starts) - 1
                self.files = ((open(self.folder / f"ids-{k:05d}.bin", "wb"), open(self.folder / f"labels-{k:05d}.bin", "wb"))
                              if self.folder is not None else ([], []))
            for f, a in zip(self.files, (ids, labels)):
                a = np.ascontiguousarray(a, dtype=np.int32)
                f.append(a) if isinstance(f, list) else a.tofile(f)
            self.fill += len(ids)
        ends = np.cumsum(lengths)
        trained = np.concatenate([[0], np.cumsum(np.asarray(labels) != IGNORE)])
        self.lengths.append(np.asarray(lengths, dtype=np.int64))
        self.targets.append((trained[ends] - trained[ends - lengths]).astype(np.int32))
        self.num_samples += len(lengths)

    def _finish_shard(self) -> None:
        if self.files is None:
            return
        if self.folder is None:
            self.memory.append(tuple(np.concatenate(parts) for parts in self.files))
        else:
            for f in self.files:
                f.close()
        self.starts.append(self.starts[-1] + self.fill)
        self.files, self.fill = None, 0

    def close(self) -> "SampleStore":
        self._finish_shard()
        lengths = np.concatenate(self.lengths) if self.lengths else np.zeros(0, np.int64)
        offsets = np.zeros(len(lengths) + 1, dtype=np.int64)
        np.cumsum(lengths, out=offsets[1:])
        targets = np.concatenate(self.targets) if self.targets else np.zeros(0, np.int32)
        self.lengths, self.targets, lengths = [], [], None   # 12 bytes a sample less for the rest of the build
        starts = np.array(self.starts, dtype=np.int64)
        if self.folder is None:
            return SampleStore(self.memory, offsets, starts, targets)
        for name, a in (("shards", starts), ("samples", offsets), ("targets", targets)):
            np.save(self.folder / f"{name}.npy", a)
        return SampleStore.load(self.folder)


class SampleStore:
    """Every tokenized sample, by number: (ids, labels) views into the shard that holds it."""

    def __init__(self, shards: list, offsets: np.ndarray, starts: np.ndarray, targets: np.ndarray):
        self.shards, self.offsets, self.targets = shards, offsets, targets
        self.starts = [int(s) for s in starts]   # a short list: bisect on it is faster than numpy per sample

    @classmethod
    def load(cls, folder: Path) -> "SampleStore":
        starts = np.load(folder / "shards.npy")
        shards = [tuple(np.memmap(folder / f"{name}-{k:05d}.bin", dtype=np.int32, mode="r") for name in ("ids", "labels"))
                  for k in range(len(starts) - 1)]
        load = lambda n: np.load(folder / f"{n}.npy", mmap_mode="r")  # noqa: E731
        return cls(shards, load("samples"), starts, load("targets"))

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def lengths(self, samples: np.ndarray) -> np.ndarray:
        samples = np.asarray(samples, dtype=np.int64)
        return self.offsets[samples + 1] - self.offsets[samples]

    def sample(self, s: int) -> tuple[np.ndarray, np.ndarray]:
        a, b = int(self.offsets[s]), int(self.offsets[s + 1])
        k = bisect.bisect_right(self.starts, a) - 1
        ids, labels = self.shards[k]
        a, b = a - self.starts[k], b - self.starts[k]
        return ids[a:b], labels[a:b]


class TokenDataset:
    """List-like rows of samples {"input_ids", "labels"[, "position_ids"]} (numpy int32).

    Plain: row i is sample rows[i] (weights repeat sample numbers, never tokens). Packed: row i is
    the samples rows[row_ptr[i]:row_ptr[i + 1]] end to end, position_ids restarting at 0 in each.
    """

    def __init__(self, store: SampleStore, rows: np.ndarray, row_ptr: np.ndarray | None = None):
        self.store, self.rows, self.row_ptr = store, rows, row_ptr

    @classmethod
    def from_samples(cls, samples: list[tuple[list[int], list[int]]], bins: list[list[int]] | None = None) -> "TokenDataset":
        """In memory, from (ids, labels) pairs: plain rows (bins None) or bins[r] = the samples of packed row r."""
        writer = ShardWriter(None)
        lengths = np.array([len(s[0]) for s in samples], dtype=np.int64)
        flat = lambda k: np.fromiter((t for s in samples for t in s[k]), dtype=np.int32, count=int(lengths.sum()))  # noqa: E731
        writer.add(flat(0), flat(1), lengths)
        store = writer.close()
        if bins is None:
            return cls(store, np.arange(len(samples), dtype=np.int64))
        row_ptr = np.zeros(len(bins) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in bins], out=row_ptr[1:])
        return cls(store, np.array([i for b in bins for i in b], dtype=np.int64), row_ptr)

    def save(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "rows.npy", self.rows)
        if self.row_ptr is not None:
            np.save(folder / "row_ptr.npy", self.row_ptr)

    @classmethod
    def load(cls, folder: Path, store: SampleStore) -> "TokenDataset":
        ptr = folder / "row_ptr.npy"
        return cls(store, np.load(folder / "rows.npy", mmap_mode="r"), np.load(ptr, mmap_mode="r") if ptr.exists() else None)

    @property
    def packed(self) -> bool:
        return self.row_ptr is not None

    def __len__(self) -> int:
        return len(self.row_ptr) - 1 if self.packed else len(self.rows)

    def _samples(self, i: int) -> np.ndarray:
        return self.rows[int(self.row_ptr[i]): int(self.row_ptr[i + 1])] if self.packed else self.rows[i: i + 1]

    def __getitem__(self, i: int) -> dict:
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self):
            raise IndexError(i)
        parts = [self.store.sample(int(s)) for s in self._samples(i)]
        if not self.packed:
            return {"input_ids": parts[0][0], "labels": parts[0][1]}   # views of the memory map
        return {"input_ids": np.concatenate([p[0] for p in parts]), "labels": np.concatenate([p[1] for p in parts]),
                "position_ids": np.concatenate([np.arange(len(p[0]), dtype=np.int32) for p in parts])}

    def __iter__(self):
        return (self[i] for i in range(len(self)))

    def length(self, i: int) -> int:
        return int(self.store.lengths(self._samples(i)).sum())

    def lengths(self) -> np.ndarray:
        """Tokens in each row (int64)."""
        per_sample = self.store.lengths(self.rows)
        if not self.packed:
            return per_sample
        return np.add.reduceat(per_sample, self.row_ptr[:-1]) if len(per_sample) else np.zeros(0, np.int64)

    def sample_lengths(self) -> np.ndarray:
        """Tokens in each sample (int64), packed or not: what unpacked rows would be."""
        return self.store.lengths(self.rows)

    def num_tokens(self) -> int:
        return int(self.store.lengths(self.rows).sum())

    def target_tokens(self) -> int:
        """Tokens that carry loss (labels other than -100), counted per sample when tokenized."""
        return int(np.asarray(self.store.targets)[np.asarray(self.rows, dtype=np.int64)].sum())
